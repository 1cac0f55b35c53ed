r"""All the math of normalization, in ``torch.nn.functional``'s signatures.

Read top to bottom in the book's order. Every norm is "standardize over a statistics set, then
an affine": the statistics set comes from :func:`normcode.statistics_set`, the one place
that says which axes each norm reduces; ``_moments`` computes mean and variance (three
reductions: a mean, a corrective mean of the residuals, a mean square); ``_inverse_std``
turns the variance into :math:`1/\sqrt{\mathrm{Var} + \epsilon}`. Each public function opens
with one call into ``normcode._checks`` (bad input raises as in torch) and is math from then
on. None of this calls torch's own normalization routines.
"""
import torch
from torch._prims_common import suggest_memory_format   # the output layout rule of torch's kernels

from . import _checks as check
from ._axes import set_size, statistics_set

#: The dtype each input dtype is computed in. normcode computes a float32 norm in float64 and
#: rounds once at the end, to serve as a reference answer: tests/test_numerics.py measures its
#: float32 output within half a float32 ulp of the exact result, plus the float64 computation's
#: own error (about 1e-15 relative to the input's magnitude over its spread). This is normcode's
#: choice, not torch's: torch's CPU kernels accumulate float32 statistics in float32 (its errors
#: are in the numerics chapter). float16/bfloat16 accumulate in float32, as torch.nn does.
COMPUTE_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
                 torch.float32: torch.float64, torch.float64: torch.float64}


def _compute_dtype(input):
    return COMPUTE_DTYPE[input.dtype]


# --------------------------------------------------------------------------------------------
# The shared core: moments, the inverse standard deviation, the affine, the running estimates
# --------------------------------------------------------------------------------------------
def _centred_sum_of_squares(x, dims, count=None, where=None):
    r"""Mean and :math:`M_2 = \sum_i (x_i - \mu)^2` of ``x`` over ``dims`` (kept).

    .. math:: \mu = \frac{1}{M}\sum_i x_i, \qquad M_2 = \sum_i (x_i - \mu)^2

    Three reductions, never :math:`\mathrm{E}[x^2] - \mathrm{E}[x]^2`, which cancels
    catastrophically once the mean is large next to the standard deviation. The first mean
    carries a rounding error that grows with the mean; a corrective mean of the residuals
    removes it; then the centred sum of squares. ``count`` is M (by default the number of
    elements reduced); ``where``, a boolean mask broadcasting against ``x``, counts only the
    elements where it is True (``count`` is then theirs).
    """
    if count is None:
        count = set_size(x, dims)

    def total(values):
        return (values if where is None else torch.where(where, values, 0)).sum(dims, keepdim=True)

    mean = total(x) / count
    mean = mean + total(x - mean) / count          # the corrective pass
    centred = x - mean
    return mean, total(centred * centred)


def _moments(x, dims, count=None, where=None):
    r"""Mean and biased variance of ``x`` over ``dims`` (kept).

    .. math:: \mu = \frac{1}{M}\sum_i x_i, \qquad \sigma^2 = \frac{1}{M}\sum_i (x_i - \mu)^2

    By :func:`_centred_sum_of_squares`, which says why and takes the same ``count`` and ``where``.
    """
    if count is None:
        count = set_size(x, dims)
    mean, m2 = _centred_sum_of_squares(x, dims, count, where)
    return mean, m2 / count


def _inverse_std(var, eps, name, *, constant_is_zero=False):
    r""":math:`r = 1 / \sqrt{\mathrm{Var} + \epsilon}`, refusing the sets where it is inf or NaN.

    Any eps computes, negative included, as in torch; only a set with
    :math:`\mathrm{Var} + \epsilon \le 0` raises (:func:`normcode._checks.denominator`), where
    torch returns inf or NaN. ``constant_is_zero`` is InstanceNorm's rule with instance
    statistics: torch's kernel defines :math:`1/\sqrt{0 + 0}` as 0 there, so a constant
    instance normalizes to 0 (the output is beta), not NaN.
    """
    if constant_is_zero and eps == 0:
        zero = var == 0            # the safe denominator keeps autograd finite
        return torch.where(zero, 0.0, torch.rsqrt(torch.where(zero, 1.0, var)))
    check.denominator(var, eps, name)
    return torch.rsqrt(var + eps)


def _affine(x_hat, weight, bias, shape):
    """``x_hat * weight + bias`` with both parameters viewed as ``shape`` (either may be None)."""
    if weight is not None:
        x_hat = x_hat * weight.to(x_hat.dtype).reshape(shape)
    if bias is not None:
        x_hat = x_hat + bias.to(x_hat.dtype).reshape(shape)
    return x_hat


def _channel_shape(input):
    return (1, input.shape[1]) + (1,) * (input.dim() - 2)          # (1, C, 1, ...)


def _running_moments(running_mean, running_var, x):
    """The running estimates as moments of ``x``: (1, C, 1, ...) in ``x``'s dtype.

    Copies outside autograd: they are constants of this call (torch does not differentiate
    through them), and the buffers may move on before a backward reads the copies.
    """
    shape = _channel_shape(x)
    return tuple(t.detach().to(x.dtype, copy=True).reshape(shape) for t in (running_mean, running_var))


def _exponential_update_(running_mean, running_var, mean, var, n, momentum):
    r"""Move the running estimates toward this batch's, in place and outside autograd:

    .. math:: \hat\mu \leftarrow (1 - m)\,\hat\mu + m\,\mu_B, \qquad
              \hat\sigma^2 \leftarrow (1 - m)\,\hat\sigma^2 + m\,\sigma^2_B \frac{n}{n - 1}

    ``var`` is the biased variance over ``n`` values; Bessel's correction n / (n - 1) makes the
    running variance estimate the population's. torch's convention: ``momentum`` is the weight
    of the new value (TensorFlow's is 1 - m). Either estimate may be None. Every layer with
    running statistics updates them here.
    """
    unbiased_var = var * (n / (n - 1))
    with torch.no_grad():
        for running, batch in ((running_mean, mean), (running_var, unbiased_var)):
            if running is not None:
                running.mul_(1 - momentum).add_(batch.reshape(-1).to(running.dtype), alpha=momentum)


def _in_layout_of(y, input):
    """``y`` in the memory format torch's batch, group and RMS norms return for ``input``:
    channels_last (3d) when ``input``'s strides are channels_last-like, contiguous otherwise."""
    return y.contiguous(memory_format=suggest_memory_format(input))


def _rms_eps(eps, input):
    """RMSNorm's ``eps=None``: the machine epsilon of the dtype torch accumulates in, float32's
    for a float16, bfloat16 or float32 input, float64's for float64."""
    if eps is not None:
        return eps
    return torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps


# --------------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------------
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    r"""Batch normalization, as ``torch.nn.functional.batch_norm``.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Statistics per channel, over the batch and every position: for ``(N, C, *)`` one mean and one
    (biased) variance per channel. In training the batch's statistics normalize, and the
    running estimates move toward them: ``running <- (1 - momentum) running + momentum batch``,
    with the unbiased variance ``var * n / (n - 1)``. Otherwise the running estimates normalize.
    """
    check.batch_norm(input, running_mean, running_var, weight, bias, training, eps)
    if input.dim() < 2:                 # an empty 1-D input: torch returns it as it is
        return input.clone()
    x = input.to(_compute_dtype(input))
    if training:
        view, dims, n = statistics_set(x, "batch")
        mean, var = _moments(view, dims, n)
        if n > 0:      # an empty batch (N = 0) has nothing to learn from: the estimates stay
            _exponential_update_(running_mean, running_var, mean, var, n, momentum)
    else:
        mean, var = _running_moments(running_mean, running_var, x)
    x_hat = (x - mean) * _inverse_std(var, eps, "batch_norm")
    y = _affine(x_hat, weight, bias, _channel_shape(input))
    return _in_layout_of(y.to(input.dtype), input)


# --------------------------------------------------------------------------------------------
# InstanceNorm
# --------------------------------------------------------------------------------------------
def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    r"""Instance normalization, as ``torch.nn.functional.instance_norm``.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Statistics per sample and per channel, over every position. With running estimates and
    ``use_input_stats``, they move toward the batch average of the per-instance mean and
    unbiased variance; without ``use_input_stats`` the running estimates normalize instead.
    """
    check.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats)
    x = input.to(_compute_dtype(input))
    if use_input_stats:
        view, dims, L = statistics_set(x, "instance")
        mean, var = _moments(view, dims, L)                            # (N, C, 1, ...)
        if input.numel() > 0:
            # The batch's average of per-instance means and variances, each over L positions.
            N_C = input.shape[:2]
            _exponential_update_(running_mean, running_var, mean.reshape(N_C).mean(0),
                                 var.reshape(N_C).mean(0), L, momentum)
    else:
        mean, var = _running_moments(running_mean, running_var, x)
    x_hat = (x - mean) * _inverse_std(var, eps, "instance_norm", constant_is_zero=use_input_stats)
    y = _affine(x_hat, weight, bias, _channel_shape(input))
    return y.to(input.dtype).contiguous()     # torch returns instance norm contiguous, always


# --------------------------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------------------------
def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    r"""Layer normalization, as ``torch.nn.functional.layer_norm``.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Statistics per sample, over the trailing ``normalized_shape``; ``weight`` and ``bias`` have
    that shape: one gamma and beta per element, not per channel.
    """
    normalized_shape = check.layer_norm(input, normalized_shape, weight, bias)
    x = input.to(_compute_dtype(input))
    view, dims, M = statistics_set(x, "layer", normalized_ndim=len(normalized_shape))
    mean, var = _moments(view, dims, M)
    x_hat = (x - mean) * _inverse_std(var, eps, "layer_norm")
    return _affine(x_hat, weight, bias, normalized_shape).to(input.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# GroupNorm
# --------------------------------------------------------------------------------------------
def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    r"""Group normalization, as ``torch.nn.functional.group_norm``.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Statistics per sample and per group of C // G contiguous channels, over the group's channels
    and every position. G = C gives InstanceNorm's statistics; G = 1 gives LayerNorm's over
    ``(C, *)``. The affine stays per channel whatever G is.
    """
    check.group_norm(input, num_groups, weight, bias)
    x = input.to(_compute_dtype(input))
    view, dims, M = statistics_set(x, "group", num_groups=num_groups)   # (N, G, C//G * prod(spatial))
    mean, var = _moments(view, dims, M)
    x_hat = ((view - mean) * _inverse_std(var, eps, "group_norm")).reshape(input.shape)
    y = _affine(x_hat, weight, bias, _channel_shape(input)).to(input.dtype)
    return _in_layout_of(y, input)            # channels_last stays channels_last, as in torch


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------
def rms_norm(input, normalized_shape, weight=None, eps=None):
    r"""Root-mean-square normalization, as ``torch.nn.functional.rms_norm``.

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \gamma

    LayerNorm without the centring: the statistic is the mean square over the trailing
    ``normalized_shape``. ``eps=None`` means the machine epsilon of the dtype torch accumulates
    in: float32 for a float16, bfloat16 or float32 input, float64 for float64. ``weight`` may have
    any floating dtype (torch accepts that too); the output has the input's.
    """
    normalized_shape = check.rms_norm(input, normalized_shape, weight)
    x = input.to(_compute_dtype(input))
    view, dims, M = statistics_set(x, "rms", normalized_ndim=len(normalized_shape))
    mean_square = (view * view).sum(dims, keepdim=True) / M
    y = _affine(x * _inverse_std(mean_square, _rms_eps(eps, input), "rms_norm"), weight, None,
                normalized_shape)
    return _in_layout_of(y.to(input.dtype), input)


# --------------------------------------------------------------------------------------------
# LocalResponseNorm
# --------------------------------------------------------------------------------------------
def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    r"""Local response normalization, as ``torch.nn.functional.local_response_norm``.

    .. math:: b_c = a_c \left(k + \frac{\alpha}{n} \sum_{c'} a_{c'}^2\right)^{-\beta}

    AlexNet's normalization across neighbouring channels: the sum runs over a window of ``size``
    channels centred on c, zeros beyond the edges counted in, and is always divided by ``size``.
    """
    check.local_response_norm(input, size)
    if input.numel() == 0:
        return input.clone()
    x = input.to(_compute_dtype(input))
    squares = x * x
    before, after = size // 2, (size - 1) // 2                 # the window c - size//2 .. c + (size-1)//2
    pad = lambda n: squares.new_zeros((squares.shape[0], n) + squares.shape[2:])
    padded = torch.cat([pad(before), squares, pad(after)], dim=1)   # (N, C + size - 1, *)
    window_sum = padded.unfold(1, size, 1).sum(-1)             # (N, C, *)
    div = (k + alpha / size * window_sum) ** beta
    return (x / div).to(input.dtype)

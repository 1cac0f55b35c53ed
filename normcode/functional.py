r"""All the math of normalization, in ``torch.nn.functional``'s signatures.

Read top to bottom in the book's order. Every norm is "standardize over a statistics set, then
an affine": the statistics set comes from :func:`normcode.statistics_set`, the one place
that says which axes each norm reduces; ``_shifted_sums`` computes the mean and variance
from the values less one of them (a shift, so that no term is large); ``_inverse_std`` turns
the variance into :math:`1/\sqrt{\mathrm{Var} + \epsilon}`. Where gamma and beta are per
channel (BatchNorm, InstanceNorm, GroupNorm), the output is one multiply-add of the shifted
values, with a scale and an offset per channel or per (sample, channel)
(``_scale_and_offset``); LayerNorm, with a gamma per element, standardizes the centred values
(``_centred_moments``) and then applies its affine.
Each public function opens with one call into ``normcode._checks`` (bad input raises as in
torch) and is math from then on. None of this calls torch's own normalization routines.

The formulation is written for ``torch.compile`` as much as for the reader: the statistics of a
float32 input on the CPU take one pass over it (two reductions that inductor fuses into one
loop), the normalization a second, and no pass over the input is a correction whose
derivative is identically zero (the one correction left, a guard on each set's M2 against
rounding below 0, is kept outside the derivative).
"""
import torch
from torch._prims_common import suggest_memory_format   # the output layout rule of torch's kernels

from . import _checks as check
from ._axes import set_size, statistics_set

#: The dtype each input dtype is computed in on the CPU. normcode computes a float32 norm in
#: float64 there and rounds once at the end, to serve as a reference answer:
#: tests/test_numerics.py measures its float32 output within half a float32 ulp of the exact
#: result, plus the float64 computation's own error. This is normcode's choice, not torch's:
#: torch's CPU kernels accumulate float32 statistics in float32 with their own summation orders
#: (the numerics chapter measures their errors). float16/bfloat16 accumulate in float32, as
#: torch.nn does.
COMPUTE_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
                 torch.float32: torch.float64, torch.float64: torch.float64}

#: The same on CUDA (and any other accelerator): float32 is computed in float32. float64 runs at
#: 1/32 to 1/64 of the float32 rate on consumer GPUs, so widening would make normcode unusable
#: there; torch's CUDA kernels accumulate in float32 too. What should keep normcode's error at
#: or below theirs is the formulation (``_shifted_sums``): a mean held as a shift plus a small
#: remainder, and two passes. tests/test_numerics.py checks it on CUDA where a GPU is present
#: (none has run it yet), and runs this table's formulation on the CPU too (swapped in for the
#: CPU's): within about ten float32 ulps of the output's scale at means up to 1e6 (the test
#: allows 32).
ACCELERATOR_COMPUTE_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
                             torch.float32: torch.float32, torch.float64: torch.float64}


def _compute_dtype(input):
    """The per-device rule: float64 for float32 where float64 is cheap (the CPU), float32 on
    accelerators (:data:`COMPUTE_DTYPE`, :data:`ACCELERATOR_COMPUTE_DTYPE`)."""
    table = COMPUTE_DTYPE if input.device.type == "cpu" else ACCELERATOR_COMPUTE_DTYPE
    return table[input.dtype]


# --------------------------------------------------------------------------------------------
# The shared core: moments, the inverse standard deviation, the affine, the running estimates
# --------------------------------------------------------------------------------------------
def _shift(x, dims):
    """One element of each statistics set (its first), outside autograd, kept as (1, ...).

    The moments are computed from ``x - shift``. Mean and variance move with a shift and are
    unchanged by it, so it is a constant of the derivative (hence detached: its derivative
    through the formulas below is identically zero). It makes every term small: an element
    of the set is within a few standard deviations of its mean, whatever the mean is."""
    x = x.detach()
    if x.numel() == 0:
        return x.new_zeros([1 if d in dims else n for d, n in enumerate(x.shape)])
    for d in dims:
        x = x.narrow(d, 0, 1)
    return x.clone()                # its own memory: the set may be centred in place


def _shifted_sums(x, dims, count, where, exact_terms):
    r"""``(shift, mean of d, M2, d)`` with :math:`d = x - \text{shift}`: the mean is
    ``shift + mean_d`` and :math:`M_2 = \sum_i (x_i - \mu)^2`. ``d`` itself is handed back
    for the output to reuse (one full-size tensor, not a second subtraction).

    Never :math:`\mathrm{E}[x^2] - \mathrm{E}[x]^2` on ``x`` itself, which cancels
    catastrophically once the mean is large next to the standard deviation. On the shifted
    values ``d``:

    - ``exact_terms`` (``x`` is computed wider than it is stored: float32 in float64 on the
      CPU): ``d`` and ``d * d`` are exact, and
      :math:`M_2 = \sum d^2 - \bar d \sum d` loses at most a factor
      :math:`1 + \bar d^2 / \sigma^2` (about 1 to 20 for a shift a few sigma away; never more
      than M) of the wide format's precision: one pass, two fused sums;
    - otherwise (float32 on CUDA, float64): the second pass :math:`M_2 = \sum (d - \bar d)^2`.
      No corrective pass is needed: ``d`` is small, so the rounding of its mean is too.

    ``where``, a boolean mask broadcasting against ``x``, counts only the elements where it is
    True (``count`` is then theirs); the shift is then 0 and the two passes are taken.
    """
    def total(values):
        return (values if where is None else torch.where(where, values, 0)).sum(dims, keepdim=True)

    shift = _shift(x, dims) if where is None else x.new_zeros(())
    d = x - shift
    sum_d = total(d)
    mean_d = sum_d / count
    if exact_terms and where is None:
        m2 = total(d * d) - mean_d * sum_d
        # M2 >= 0, and so is this difference unless its rounding error reaches M2 itself:
        # M2 >= max|d|^2 / 2 (the shift is an element, d = 0), so a plain sum with unit
        # roundoff u gets there only past about (2u)^-1/2 elements: 2^26 in float64 (a float32
        # input), but about 2,900 in float32 (a float16 or bfloat16 input). The guard moves
        # such a value to 0 and leaves the derivative M2's. (A clamp's derivative would be 0
        # there, and under torch.compile its mask made the backward keep M2 and recompute
        # 1/sqrt(M2/M + eps) per element.)
        m2 = m2 + (m2.detach().clamp_min(0) - m2.detach())
    else:
        centred = d - mean_d
        m2 = total(centred * centred)
    return shift, mean_d, m2, d


def _centred_sum_of_squares(x, dims, count=None, where=None):
    r"""Mean and :math:`M_2 = \sum_i (x_i - \mu)^2` of ``x`` over ``dims`` (kept).

    .. math:: \mu = \frac{1}{M}\sum_i x_i, \qquad M_2 = \sum_i (x_i - \mu)^2

    By :func:`_shifted_sums` in two passes, which says why. ``count`` is M (by default the
    number of elements reduced); ``where``, a boolean mask broadcasting against ``x``, counts
    only the elements where it is True (``count`` is then theirs).
    """
    if count is None:
        count = set_size(x, dims)
    shift, mean_d, m2, _ = _shifted_sums(x, dims, count, where, exact_terms=False)
    return shift + mean_d, m2


def _moments(x, dims, count=None, where=None):
    r"""Mean and biased variance of ``x`` over ``dims`` (kept).

    .. math:: \mu = \frac{1}{M}\sum_i x_i, \qquad \sigma^2 = \frac{1}{M}\sum_i (x_i - \mu)^2

    By :func:`_centred_sum_of_squares`, which says why and takes the same ``count`` and ``where``.
    """
    if count is None:
        count = set_size(x, dims)
    mean, m2 = _centred_sum_of_squares(x, dims, count, where)
    return mean, m2 / count


def _centred_moments(x, dims, count, exact_terms):
    """``(centred, mean, var)`` over ``dims``: the values less their mean, and the moments.

    What LayerNorm calls (BatchNorm, batch renormalization, GroupNorm and InstanceNorm write
    their output as a multiply-add of the shifted input, :func:`_scale_and_offset`).
    ``centred`` is ``d - mean_d`` (``d = x - shift``): the mean is never rounded to ``x``'s
    format before it is subtracted (in float32, a mean of 1e6 would carry an error of 0.03).
    ``exact_terms``: one pass (see :func:`_shifted_sums`)."""
    shift, mean_d, m2, d = _shifted_sums(x, dims, count, None, exact_terms)
    return d - mean_d, shift + mean_d, m2 / count


def _computes_wider(x, input):
    """Whether ``x``, the compute copy of ``input``, has a wider format: then the shifted
    terms are exact and the statistics take one pass."""
    return torch.finfo(x.dtype).bits > torch.finfo(input.dtype).bits


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
    """``x_hat * weight + bias`` with both parameters viewed as ``shape`` (either may be None).

    With both, one ``torch.addcmul``: a single full-size result instead of two."""
    if weight is not None and bias is not None:
        return torch.addcmul(bias.to(x_hat.dtype).reshape(shape), x_hat,
                             weight.to(x_hat.dtype).reshape(shape))
    if weight is not None:
        x_hat = x_hat * weight.to(x_hat.dtype).reshape(shape)
    if bias is not None:
        x_hat = x_hat + bias.to(x_hat.dtype).reshape(shape)
    return x_hat


def _scale_and_offset(centre, r, weight, bias, shape):
    """``(scale, offset)`` with ``(d - centre) r gamma + beta = d scale + offset``:
    ``scale = r gamma``, ``offset = beta - centre scale``, per statistics set (either parameter
    may be None). For the norms whose parameters are per channel: their output as one
    multiply-add of the shifted input, whose backward takes two sums per channel (per sample
    and channel for the per-sample norms), the sums that the sets' and the parameters'
    gradients both need (under torch.compile, one pass)."""
    scale = r if weight is None else r * weight.to(r.dtype).reshape(shape)
    offset = -centre * scale
    return scale, (offset if bias is None else offset + bias.to(r.dtype).reshape(shape))


def _per_channel(group_statistic, input):
    """A per-group statistic (N, G, 1, ...) repeated for each group's channels: (N, C, 1, ...)."""
    N, G = group_statistic.shape[:2]
    C = input.shape[1]
    repeated = group_statistic.reshape(N, G, 1).expand(N, G, C // G)
    return repeated.reshape((N, C) + (1,) * (input.dim() - 2))


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
    running statistics updates them here. ``momentum`` may be a 0-dim tensor (BatchNorm's
    cumulative average, 1 / num_batches_tracked, never read back to Python).
    """
    unbiased_var = var * (n / (n - 1))
    with torch.no_grad():
        for running, batch in ((running_mean, mean), (running_var, unbiased_var)):
            if running is None:
                continue
            batch = batch.reshape(-1).to(running.dtype)
            if isinstance(momentum, torch.Tensor):
                running.mul_(1 - momentum).add_(batch * momentum)
            else:
                running.mul_(1 - momentum).add_(batch, alpha=momentum)


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
def _batch_moments(x, input):
    """BatchNorm's statistics of ``x`` (``input`` in its compute dtype): ``(shift, mean_d,
    var, n, d)``, per channel as (1, C, 1, ...), with the mean ``shift + mean_d``, the biased
    variance over ``n`` values and ``d = x - shift`` (:func:`_shifted_sums`). An empty batch
    (n = 0) has none (0 / 0): mean_d = 0 and var = 1 stand in, so the output stays empty and
    the parameters' gradients 0, as torch's are, instead of 0 times NaN."""
    view, dims, n = statistics_set(x, "batch")
    shift, mean_d, m2, d = _shifted_sums(view, dims, n, None, _computes_wider(x, input))
    if n == 0:
        return shift, torch.zeros_like(mean_d), torch.ones_like(m2), n, d
    return shift, mean_d, m2 / n, n, d


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
        shift, mean_d, var, n, d = _batch_moments(x, input)
        if n > 0:      # an empty batch (N = 0) has nothing to learn from: the estimates stay
            _exponential_update_(running_mean, running_var, shift + mean_d, var, n, momentum)
    else:
        shift, var = _running_moments(running_mean, running_var, x)   # shift: the running mean
        mean_d, d = 0, x - shift
    r = _inverse_std(var, eps, "batch_norm")
    # The output as one multiply-add per channel of the shifted input d = x - shift: d scale +
    # offset, with scale = r gamma and offset = beta - mean_d scale. Its backward needs two sums
    # per channel, of dy and of dy d, which serve the statistics' gradients and the
    # parameters' alike (under torch.compile: one pass, as torch's own backward takes).
    scale, offset = _scale_and_offset(mean_d, r, weight, bias, _channel_shape(input))
    y = torch.addcmul(offset, d, scale)
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
        own, centre, m2, d = _shifted_sums(view, dims, L, None, _computes_wider(x, input))
        var = m2 / L
        if input.numel() > 0:
            # The batch's average of per-instance means and variances, each over L positions.
            N_C = input.shape[:2]
            _exponential_update_(running_mean, running_var, (own + centre).reshape(N_C).mean(0),
                                 var.reshape(N_C).mean(0), L, momentum)
    else:
        own, var = _running_moments(running_mean, running_var, x)      # (1, C, 1, ...)
        centre, d = 0, x - own
    r = _inverse_std(var, eps, "instance_norm", constant_is_zero=use_input_stats)
    # The output as one multiply-add per (sample, channel), d scale + offset with d = x - own:
    # ``own`` is one element of each instance (or the running mean) and ``centre`` the mean
    # less ``own``. Under torch.compile the backward then takes the per-(sample, channel) sums
    # of dy and dy d in one pass, for the statistics' and the parameters' gradients alike.
    scale, offset = _scale_and_offset(centre, r, weight, bias, _channel_shape(input))
    y = torch.addcmul(offset, d, scale)
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
    centred, _, var = _centred_moments(view, dims, M, _computes_wider(x, input))
    x_hat = centred * _inverse_std(var, eps, "layer_norm")
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
    view, dims, M = statistics_set(x, "group", num_groups=num_groups)   # (N, G, C//G, *spatial)
    shift, mean_d, m2, _ = _shifted_sums(view, dims, M, None, _computes_wider(x, input))
    r = _inverse_std(m2 / M, eps, "group_norm")
    # Each group's statistics repeated for its C // G channels, (N, C, 1, ...), and the output
    # as one multiply-add per (sample, channel): (x - own) scale + offset, ``own`` being one
    # element of each channel (its distance to the group's shift is small). Under torch.compile
    # the backward then takes the per-(sample, channel) sums of dy and dy (x - own) in one
    # pass, for the groups' sums and the parameters' gradients alike.
    shift, mean_d, r = (_per_channel(s, input) for s in (shift, mean_d, r))
    own = _shift(x, tuple(range(2, x.dim())))
    scale, offset = _scale_and_offset((shift - own) + mean_d, r, weight, bias, _channel_shape(input))
    y = torch.addcmul(offset, x - own, scale).to(input.dtype)
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
    before, after = size // 2, (size - 1) // 2                 # the window c - size//2 .. c + (size-1)//2
    zeros = (0, 0) * (x.dim() - 2) + (before, after)           # F.pad's order: last dim first
    padded = torch.nn.functional.pad(x * x, zeros)             # (N, C + size - 1, *)
    window_sum = padded.unfold(1, size, 1).sum(-1)             # (N, C, *)
    base = k + alpha / size * window_sum
    if k > 0 and alpha >= 0:
        # base >= k > 0, so base^-beta = exp(-beta log base): exp and log are cheaper than pow,
        # and their backward (-beta * result / base) takes none where pow's takes another pow.
        # Within 1e-14 (relative) of pow in float64; float32 outputs unchanged (stress cases).
        return (x * torch.exp(-beta * torch.log(base))).to(input.dtype)
    return (x / base ** beta).to(input.dtype)          # base may be <= 0: torch's special values

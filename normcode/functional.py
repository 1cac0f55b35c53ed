r"""All the math of normalization, in ``torch.nn.functional``'s signatures.

Read top to bottom in the book's order. Every norm is "standardize over a statistics set, then
an affine": the statistics set comes from :func:`normcode._axes.statistics_view`, the one place
that says which axes each norm reduces; :func:`_moments` computes mean and variance by two passes;
:func:`_standardize` applies them. None of this calls torch's own normalization routines.
"""
import math

import torch
from torch._prims_common import suggest_memory_format   # the output layout rule of torch's kernels

from ._axes import statistics_view

_REDUCED_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Input checks: bad input raises the exception class torch.nn raises, and names the problem.
# --------------------------------------------------------------------------------------------
def _check_floating(input, name):
    if not input.is_floating_point():
        raise NotImplementedError(
            f'"{name}" not implemented for {input.dtype}: normalization needs a floating-point input'
        )


def _check_dtypes(input, name, **tensors):
    # torch's rule: the parameters (and BatchNorm's running statistics) share one dtype, the
    # input's, or float32 for a float16/bfloat16 input (statistics are accumulated in float32
    # anyway). Anything else is mixed.
    given = {what: t.dtype for what, t in tensors.items() if t is not None}
    allowed = {input.dtype, torch.float32} if input.dtype in _REDUCED_PRECISION else {input.dtype}
    if len(set(given.values())) > 1 or not set(given.values()) <= allowed:
        listed = ", ".join(f"{what} of dtype {dtype}" for what, dtype in given.items())
        raise RuntimeError(
            f"mixed dtype: {name} got input of dtype {input.dtype} and {listed}; the parameters "
            f"must share one dtype, the input's (or float32 for a float16/bfloat16 input)")


def _check_per_channel(input, name, **tensors):
    C = input.shape[1]
    for what, t in tensors.items():
        if t is not None and t.numel() != C:
            raise RuntimeError(
                f"{name}: {what} should contain {C} elements (one per channel of input of size "
                f"{tuple(input.shape)}) not {t.numel()}"
            )


def _check_channel_dim(input, name, running_mean, running_var):
    # (N, C, *) needs a dim 1. torch fails on its absence with an IndexError, except batch_norm
    # given running estimates, which fails on their size with a RuntimeError; normcode keeps the classes.
    if input.dim() < 2:
        sized = name == "batch_norm" and (running_mean is not None or running_var is not None)
        error = RuntimeError if sized else IndexError
        raise error(f"{name} expects an input of at least 2 dimensions (N, C, *), got a "
                    f"{input.dim()}D input of size {list(input.shape)}")


def _check_running_pair(running_mean, running_var, batch_statistics, name):
    if batch_statistics and (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: running_mean and running_var must either both be None or "
                         f"neither be None, got running_{'mean' if running_mean is None else 'var'}=None")
    if not batch_statistics and (running_mean is None or running_var is None):
        missing = " and ".join(k for k, t in (("running_mean", running_mean), ("running_var", running_var))
                               if t is None)
        raise RuntimeError(f"{name}: {missing} must be defined in evaluation mode (when the running "
                           "estimates normalize instead of the input's statistics)")


def _verify_batch_size(size):
    # One value per channel has variance 0 and a normalized value of 0/0. Counted as torch counts
    # it, N * prod(spatial), which stays defined when C is 0.
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def _verify_spatial_size(size):
    if math.prod(size[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {size}"
        )


def _check_eps(eps, name):
    # normcode's rule, stricter than torch's for LayerNorm, GroupNorm, RMSNorm and InstanceNorm
    # (torch checks eps only in batch_norm): a negative eps makes var + eps negative for any
    # statistics set of variance below |eps|, and torch returns NaN there without a word.
    if eps < 0:
        raise ValueError(f"{name} eps must be non-negative, but got {eps}")


def _inverse_std(var, eps, name):
    r""":math:`1 / \sqrt{\mathrm{Var} + \epsilon}`, refusing the 0/0 of eps = 0 on constant values.

    torch returns NaN there (normcode's rule: bad input gets an error, never a silent NaN). The
    check costs nothing unless eps is 0.
    """
    if eps == 0 and bool((var == 0).any()):
        raise ValueError(
            f"{name}: eps=0 and {int((var == 0).sum())} of {var.numel()} statistics sets have zero "
            "variance (constant values), which normalizes to 0/0 = NaN; pass eps > 0")
    return torch.rsqrt(var + eps)


def _in_layout_of(y, input):
    """``y`` in the memory format torch's batch, group and RMS norms return for ``input``: channels_last
    (3d) when ``input``'s strides are channels_last-like, contiguous otherwise."""
    return y.contiguous(memory_format=suggest_memory_format(input))


# --------------------------------------------------------------------------------------------
# The shared core: moments by two passes, then standardize.
# --------------------------------------------------------------------------------------------
#: The dtype each input dtype is computed in. Like torch's CPU kernels, which accumulate float32
#: statistics in double, normcode computes a float32 norm in float64 and rounds once at the end:
#: its float32 output is then the correctly rounded one, never less accurate than torch.nn's.
#: float16/bfloat16 accumulate in float32, as torch.nn does.
COMPUTE_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
                 torch.float32: torch.float64, torch.float64: torch.float64}


def _compute_dtype(input):
    return COMPUTE_DTYPE[input.dtype]


def _moments(x, dims):
    r"""Mean and biased variance of ``x`` over ``dims`` (kept), by two passes.

    .. math:: \mu = \frac{1}{M}\sum_i x_i, \qquad \sigma^2 = \frac{1}{M}\sum_i (x_i - \mu)^2

    Never :math:`\mathrm{E}[x^2] - \mathrm{E}[x]^2`, which cancels catastrophically once the mean
    is large next to the standard deviation. The first pass's mean carries a rounding error
    that grows with the mean; one corrective pass over the centred values removes it.
    """
    mean = x.mean(dims, keepdim=True)
    mean = mean + (x - mean).mean(dims, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dims, keepdim=True)
    return mean, var


def _update_running_(running_mean, running_var, mean, unbiased_var, momentum):
    r"""Move the running estimates toward this batch's, in place and outside autograd:

    .. math:: \hat\mu \leftarrow (1 - m)\,\hat\mu + m\,\mu_B, \qquad
              \hat\sigma^2 \leftarrow (1 - m)\,\hat\sigma^2 + m\,\sigma^2_{B,\text{unbiased}}

    torch's convention: ``momentum`` is the weight of the new value (TensorFlow's is 1 - m).
    Either estimate may be None. Every layer with running statistics updates them here.
    """
    with torch.no_grad():
        for running, batch in ((running_mean, mean), (running_var, unbiased_var)):
            if running is not None:
                running.mul_(1 - momentum).add_(batch.reshape(-1).to(running.dtype), alpha=momentum)


def _affine(x_hat, weight, bias, shape):
    """``x_hat * weight + bias`` with both parameters viewed as ``shape`` (either may be None)."""
    if weight is not None:
        x_hat = x_hat * weight.to(x_hat.dtype).reshape(shape)
    if bias is not None:
        x_hat = x_hat + bias.to(x_hat.dtype).reshape(shape)
    return x_hat


def _channel_shape(input):
    return (1, input.shape[1]) + (1,) * (input.dim() - 2)          # (1, C, 1, ...)


# --------------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------------
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    r"""Batch normalization, as ``torch.nn.functional.batch_norm``.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Statistics per channel, over the batch and every position: for (N, C, *) one mean and one
    (biased) variance per channel. In training the batch's statistics normalize, and the
    running estimates move toward them: ``running <- (1 - momentum) running + momentum batch``,
    with the unbiased variance ``var * n / (n - 1)``. Otherwise the running estimates normalize.
    """
    # The checks in torch's order, so that an input with two faults fails as torch's does.
    if training:
        _verify_batch_size(input.size())
        if eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    _check_channel_dim(input, "batch_norm", running_mean, running_var)
    _check_floating(input, "batch_norm")
    _check_running_pair(running_mean, running_var, training, "batch_norm")
    _check_dtypes(input, "batch_norm", weight=weight, bias=bias,
                  running_mean=running_mean, running_var=running_var)
    _check_per_channel(input, "batch_norm", running_mean=running_mean, running_var=running_var,
                       weight=weight, bias=bias)
    shape = _channel_shape(input)
    x = input.to(_compute_dtype(input))

    if training:
        view, dims = statistics_view(x, "batch")
        mean, var = _moments(view, dims)
        # An empty batch (N = 0) has nothing to learn from: the estimates stay as they are.
        if (running_mean is not None or running_var is not None) and input.numel() > 0:
            n = input.numel() // input.shape[1]
            # n / (n-1): Bessel's correction, so running_var estimates the population variance.
            _update_running_(running_mean, running_var, mean, var * (n / (n - 1)), momentum)
    else:
        mean = running_mean.to(x.dtype).reshape(shape)
        var = running_var.to(x.dtype).reshape(shape)

    x_hat = (x - mean) * _inverse_std(var, eps, "batch_norm")
    return _in_layout_of(_affine(x_hat, weight, bias, shape).to(input.dtype), input)


# --------------------------------------------------------------------------------------------
# InstanceNorm
# --------------------------------------------------------------------------------------------
def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    r"""Instance normalization, as ``torch.nn.functional.instance_norm``.

    Statistics per sample and per channel, over every position. With running estimates and
    ``use_input_stats``, they move toward the batch average of the per-instance mean and
    unbiased variance; without ``use_input_stats`` the running estimates normalize instead.
    """
    # The checks in torch's order, so that an input with two faults fails as torch's does.
    if use_input_stats:
        _verify_spatial_size(input.size())       # also refuses (N, C): no positions to average
    _check_channel_dim(input, "instance_norm", running_mean, running_var)
    _check_floating(input, "instance_norm")
    _check_running_pair(running_mean, running_var, use_input_stats, "instance_norm")
    # Unlike batch_norm's, instance_norm's running estimates may have any floating dtype: torch
    # reads and writes them through a cast.
    _check_dtypes(input, "instance_norm", weight=weight, bias=bias)
    _check_per_channel(input, "instance_norm", running_mean=running_mean, running_var=running_var,
                       weight=weight, bias=bias)
    _check_eps(eps, "instance_norm")
    shape = _channel_shape(input)
    x = input.to(_compute_dtype(input))

    if use_input_stats:
        view, dims = statistics_view(x, "instance")
        mean, var = _moments(view, dims)                               # (N, C, 1, ...)
        if (running_mean is not None or running_var is not None) and input.numel() > 0:
            L = math.prod(input.shape[2:])
            # The batch's average of per-instance means and unbiased (L / (L-1)) variances.
            _update_running_(running_mean, running_var, mean.reshape(input.shape[:2]).mean(0),
                             (var.reshape(input.shape[:2]) * (L / (L - 1))).mean(0), momentum)
    else:
        mean = running_mean.to(x.dtype).reshape(shape)
        var = running_var.to(x.dtype).reshape(shape)

    if use_input_stats and eps == 0:
        # torch's kernel defines 1 / sqrt(0 + 0) as 0 for instance statistics: a constant instance
        # normalizes to 0 (the output is beta), not NaN. The safe denominator keeps autograd finite.
        zero = var == 0
        inverse_std = torch.where(zero, 0.0, torch.rsqrt(torch.where(zero, 1.0, var)))
    else:
        inverse_std = _inverse_std(var, eps, "instance_norm")
    x_hat = (x - mean) * inverse_std
    # torch returns instance norm contiguous, whatever the input's layout.
    return _affine(x_hat, weight, bias, shape).to(input.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------------------------
def _check_normalized_shape(input, normalized_shape, name, **tensors):
    normalized_shape = tuple(normalized_shape)
    if len(normalized_shape) == 0:
        raise RuntimeError(
            f"{name}: Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
            f"least one element, but got normalized_shape = {list(normalized_shape)}")
    k = len(normalized_shape)
    if input.dim() < k or tuple(input.shape[-k:]) != normalized_shape:
        raise RuntimeError(
            f"{name}: Given normalized_shape={list(normalized_shape)}, expected input with shape "
            f"[*, {', '.join(map(str, normalized_shape))}], but got input of size {list(input.shape)}")
    for what, t in tensors.items():
        if t is not None and tuple(t.shape) != normalized_shape:
            raise RuntimeError(
                f"{name}: Expected {what} to be of same shape as normalized_shape, but got {what} "
                f"of shape {list(t.shape)} and normalized_shape = {list(normalized_shape)}")
    return normalized_shape


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    r"""Layer normalization, as ``torch.nn.functional.layer_norm``.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Statistics per sample, over the trailing ``normalized_shape``; ``weight`` and ``bias`` have
    that shape: one gamma and beta per element, not per channel.
    """
    _check_floating(input, "layer_norm")
    _check_dtypes(input, "layer_norm", weight=weight, bias=bias)
    normalized_shape = _check_normalized_shape(input, normalized_shape, "layer_norm",
                                               weight=weight, bias=bias)
    _check_eps(eps, "layer_norm")
    x = input.to(_compute_dtype(input))
    view, dims = statistics_view(x, "layer", normalized_ndim=len(normalized_shape))
    mean, var = _moments(view, dims)
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
    (C, *). The affine stays per channel whatever G is.
    """
    # The checks in torch's order, so that an input with two faults fails as torch's does.
    if input.dim() < 2:
        raise RuntimeError(
            f"group_norm: Expected at least 2 dimensions for input tensor but received {input.dim()}")
    N, C = input.shape[:2]
    if num_groups == 0:                    # torch fails on N * C // 0 (ZeroDivisionError)
        raise ZeroDivisionError("group_norm: num_groups must be positive, got num_groups=0")
    _verify_batch_size([N * C // num_groups, num_groups] + list(input.shape[2:]))
    if num_groups < 0:
        raise RuntimeError(f"group_norm: Expected num groups to be greater than 0, got {num_groups}")
    if C % num_groups != 0:
        raise RuntimeError(
            f"group_norm: Expected number of channels in input to be divisible by num_groups, but got "
            f"input of shape {list(input.shape)} and num_groups={num_groups}")
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.numel() != C):
            raise RuntimeError(
                f"group_norm: Expected {what} to be a vector of size equal to the number of channels "
                f"in input, but got {what} of shape {list(t.shape)} and input of shape {list(input.shape)}")
    _check_floating(input, "group_norm")
    _check_dtypes(input, "group_norm", weight=weight, bias=bias)
    _check_eps(eps, "group_norm")
    x = input.to(_compute_dtype(input))
    view, dims = statistics_view(x, "group", num_groups=num_groups)    # (N, G, C//G * prod(spatial))
    mean, var = _moments(view, dims)
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
    if len(tuple(normalized_shape)) and input.dim() == 0:
        raise ValueError(f"rms_norm: Input tensor must have at least 1 dimensions, but got 0 "
                         f"(normalized_shape={list(normalized_shape)})")
    _check_floating(input, "rms_norm")
    normalized_shape = _check_normalized_shape(input, normalized_shape, "rms_norm", weight=weight)
    if eps is None:
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    _check_eps(eps, "rms_norm")
    x = input.to(_compute_dtype(input))
    view, dims = statistics_view(x, "rms", normalized_ndim=len(normalized_shape))
    mean_square = (view * view).mean(dims, keepdim=True)
    y = _affine(x * _inverse_std(mean_square, eps, "rms_norm"), weight, None, normalized_shape)
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
    if input.dim() < 3:
        raise ValueError(
            f"Expected 3D or higher dimensionality input (got {input.dim()} dimensions)")
    if input.numel() == 0:
        return input.clone()
    # normcode's rule: torch accepts an int64 input here and floors the window's mean (its
    # integer average pooling), a silently wrong answer; normcode refuses integers as every norm does.
    _check_floating(input, "local_response_norm")
    if size <= 0:
        raise RuntimeError(f"local_response_norm: size should be greater than zero, but got size={size}")
    x = input.to(_compute_dtype(input))
    squares = x * x
    before, after = size // 2, (size - 1) // 2                 # the window c - size//2 .. c + (size-1)//2
    pad = lambda n: squares.new_zeros((squares.shape[0], n) + squares.shape[2:])
    padded = torch.cat([pad(before), squares, pad(after)], dim=1)   # (N, C + size - 1, *)
    window_sum = padded.unfold(1, size, 1).sum(-1)             # (N, C, *)
    div = (k + alpha / size * window_sum) ** beta
    return (x / div).to(input.dtype)

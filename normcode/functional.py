r"""All the math of normalization, in ``torch.nn.functional``'s signatures.

Read top to bottom in the book's order. Every norm is "standardize over a statistics set, then
an affine": the statistics set comes from :func:`normcode._axes.statistics_view`, the one place
that says which axes each norm reduces; :func:`_moments` computes mean and variance by two passes;
:func:`_standardize` applies them. None of this calls torch's own normalization routines.
"""
import math

import torch

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
    # torch accepts parameters of the input's dtype, and float32 parameters for a float16/bfloat16
    # input (its statistics are accumulated in float32 anyway); anything else is mixed.
    for what, t in tensors.items():
        if t is None or t.dtype == input.dtype:
            continue
        if input.dtype in _REDUCED_PRECISION and t.dtype == torch.float32:
            continue
        raise RuntimeError(
            f"mixed dtype: {name} got input of dtype {input.dtype} but {what} of dtype {t.dtype}; "
            "all inputs must share the same datatype"
        )


def _check_per_channel(input, name, **tensors):
    C = input.shape[1]
    for what, t in tensors.items():
        if t is not None and t.numel() != C:
            raise RuntimeError(
                f"{name}: {what} should contain {C} elements (one per channel of input of size "
                f"{tuple(input.shape)}) not {t.numel()}"
            )


def _verify_batch_size(size):
    # One value per channel has variance 0 and a normalized value of 0/0.
    if math.prod(size) // size[1] == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def _verify_spatial_size(size):
    if math.prod(size[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {size}"
        )


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
    _check_floating(input, "batch_norm")
    if input.dim() < 2:
        raise ValueError(f"batch_norm expects input of at least 2 dimensions (N, C, *), got {input.dim()}D input")
    _check_dtypes(input, "batch_norm", weight=weight, bias=bias,
                  running_mean=running_mean, running_var=running_var)
    _check_per_channel(input, "batch_norm", running_mean=running_mean, running_var=running_var,
                       weight=weight, bias=bias)
    if training:
        _verify_batch_size(input.size())
        if eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    shape = _channel_shape(input)
    x = input.to(_compute_dtype(input))

    if training:
        if input.numel() == 0:                    # nothing to learn from: leave the estimates
            return input.clone()
        view, dims = statistics_view(x, "batch")
        mean, var = _moments(view, dims)
        if running_mean is not None or running_var is not None:
            n = input.numel() // input.shape[1]
            with torch.no_grad():
                if running_mean is not None:
                    running_mean.mul_(1 - momentum).add_(
                        mean.reshape(-1).to(running_mean.dtype), alpha=momentum)
                if running_var is not None:
                    unbiased = var.reshape(-1) * (n / (n - 1))   # n / (n-1): Bessel's correction
                    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    else:
        if running_mean is None or running_var is None:
            raise RuntimeError(
                "batch_norm: running_mean and running_var must be given when training=False")
        mean = running_mean.to(x.dtype).reshape(shape)
        var = running_var.to(x.dtype).reshape(shape)

    x_hat = (x - mean) * torch.rsqrt(var + eps)
    return _affine(x_hat, weight, bias, shape).to(input.dtype)


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
    _check_floating(input, "instance_norm")
    if input.dim() < 3:
        raise ValueError(f"instance_norm expects input of at least 3 dimensions (N, C, *), got {input.dim()}D input")
    _check_dtypes(input, "instance_norm", weight=weight, bias=bias,
                  running_mean=running_mean, running_var=running_var)
    _check_per_channel(input, "instance_norm", running_mean=running_mean, running_var=running_var,
                       weight=weight, bias=bias)
    if use_input_stats:
        _verify_spatial_size(input.size())
    shape = _channel_shape(input)
    x = input.to(_compute_dtype(input))

    if use_input_stats:
        view, dims = statistics_view(x, "instance")
        mean, var = _moments(view, dims)                               # (N, C, 1, ...)
        if (running_mean is not None or running_var is not None) and input.numel() > 0:
            L = math.prod(input.shape[2:])
            with torch.no_grad():
                if running_mean is not None:
                    batch_mean = mean.reshape(input.shape[:2]).mean(0)
                    running_mean.mul_(1 - momentum).add_(batch_mean.to(running_mean.dtype), alpha=momentum)
                if running_var is not None:
                    batch_var = (var.reshape(input.shape[:2]) * (L / (L - 1))).mean(0)
                    running_var.mul_(1 - momentum).add_(batch_var.to(running_var.dtype), alpha=momentum)
    else:
        if running_mean is None or running_var is None:
            raise RuntimeError(
                "instance_norm: running_mean and running_var must be given when use_input_stats=False")
        mean = running_mean.to(x.dtype).reshape(shape)
        var = running_var.to(x.dtype).reshape(shape)

    x_hat = (x - mean) * torch.rsqrt(var + eps)
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
    x = input.to(_compute_dtype(input))
    view, dims = statistics_view(x, "layer", normalized_ndim=len(normalized_shape))
    mean, var = _moments(view, dims)
    x_hat = (x - mean) * torch.rsqrt(var + eps)
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
    _check_floating(input, "group_norm")
    if input.dim() < 2:
        raise RuntimeError(
            f"group_norm: Expected at least 2 dimensions for input tensor but received {input.dim()}")
    _check_dtypes(input, "group_norm", weight=weight, bias=bias)
    N, C = input.shape[:2]
    if num_groups <= 0 or C % num_groups != 0:
        raise RuntimeError(
            f"group_norm: Expected number of channels in input to be divisible by num_groups, but got "
            f"input of shape {list(input.shape)} and num_groups={num_groups}")
    _check_per_channel(input, "group_norm", weight=weight, bias=bias)
    _verify_batch_size([N * C // num_groups, num_groups] + list(input.shape[2:]))
    x = input.to(_compute_dtype(input))
    view, dims = statistics_view(x, "group", num_groups=num_groups)    # (N, G, C//G * prod(spatial))
    mean, var = _moments(view, dims)
    x_hat = ((view - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    y = _affine(x_hat, weight, bias, _channel_shape(input)).to(input.dtype)
    # torch returns group norm in the input's memory format (channels_last stays channels_last).
    return y if input.is_contiguous() else torch.empty_like(input).copy_(y)


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------
def rms_norm(input, normalized_shape, weight=None, eps=None):
    r"""Root-mean-square normalization, as ``torch.nn.functional.rms_norm``.

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \gamma

    LayerNorm without the centring: the statistic is the mean square over the trailing
    ``normalized_shape``. ``eps=None`` means the machine epsilon of the computation dtype.
    """
    _check_floating(input, "rms_norm")
    _check_dtypes(input, "rms_norm", weight=weight)
    normalized_shape = _check_normalized_shape(input, normalized_shape, "rms_norm", weight=weight)
    x = input.to(_compute_dtype(input))
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    view, dims = statistics_view(x, "rms", normalized_ndim=len(normalized_shape))
    mean_square = (view * view).mean(dims, keepdim=True)
    y = _affine(x * torch.rsqrt(mean_square + eps), weight, None, normalized_shape)
    return y.to(input.dtype)


# --------------------------------------------------------------------------------------------
# LocalResponseNorm
# --------------------------------------------------------------------------------------------
def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    r"""Local response normalization, as ``torch.nn.functional.local_response_norm``.

    .. math:: b_c = a_c \left(k + \frac{\alpha}{n} \sum_{c'} a_{c'}^2\right)^{-\beta}

    AlexNet's normalization across neighbouring channels: the sum runs over a window of ``size``
    channels centred on c, zeros beyond the edges counted in, and is always divided by ``size``.
    """
    _check_floating(input, "local_response_norm")
    if input.dim() < 3:
        raise ValueError(
            f"Expected 3D or higher dimensionality input (got {input.dim()} dimensions)")
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

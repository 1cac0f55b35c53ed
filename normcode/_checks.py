"""Input checks: bad input raises the exception class torch.nn raises, and names the problem.

:mod:`normcode.functional` keeps its math free of them: each public function there opens with
one call into this module (``check.batch_norm(...)``, ``check.layer_norm(...)``, ...) and is
math from then on. The per-function entries run the checks in torch's order, so that an input
with two faults fails as torch's does. The building blocks below them are shared with
:mod:`normcode.masked`, :mod:`normcode.switchable` and :mod:`normcode.distributed`, so that each
rule has one wording.
"""
import math

import torch

#: The dtypes normcode computes in (and torch.nn's CPU norms accept): see
#: ``normcode.functional.COMPUTE_DTYPE``.
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCED_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def floating(input, name):
    """torch's norms are implemented for float16, bfloat16, float32 and float64 only: integers,
    bool, complex and the float8 types raise NotImplementedError, as in torch."""
    if input.dtype not in FLOATING:
        raise NotImplementedError(
            f'"{name}" not implemented for {input.dtype}: normalization needs a floating-point '
            "input of dtype float16, bfloat16, float32 or float64")


def dtypes(input, name, **tensors):
    """torch's rule: the parameters (and BatchNorm's running statistics) share one dtype, the
    input's, or float32 for a float16/bfloat16 input (statistics are accumulated in float32
    anyway). Anything else is mixed."""
    given = {what: t.dtype for what, t in tensors.items() if t is not None}
    allowed = {input.dtype, torch.float32} if input.dtype in _REDUCED_PRECISION else {input.dtype}
    if len(set(given.values())) > 1 or not set(given.values()) <= allowed:
        listed = ", ".join(f"{what} of dtype {dtype}" for what, dtype in given.items())
        raise RuntimeError(
            f"mixed dtype: {name} got input of dtype {input.dtype} and {listed}; the parameters "
            f"must share one dtype, the input's (or float32 for a float16/bfloat16 input)")


def per_channel(input, name, **tensors):
    C = input.shape[1]
    for what, t in tensors.items():
        if t is not None and t.numel() != C:
            raise RuntimeError(
                f"{name}: {what} should contain {C} elements (one per channel of input of size "
                f"{tuple(input.shape)}) not {t.numel()}")


def per_channel_tensors(input, name, running_mean, running_var, weight, bias, **more):
    """The per-channel parameters and running estimates of a BatchNorm-like norm: one dtype
    (:func:`dtypes`; ``more`` joins them), one element per channel, estimates not
    differentiable."""
    dtypes(input, name, weight=weight, bias=bias, running_mean=running_mean,
           running_var=running_var, **more)
    per_channel(input, name, running_mean=running_mean, running_var=running_var,
                weight=weight, bias=bias)
    not_differentiable(name, running_mean, running_var)


def floating_nc(input, name):
    """A floating (N, C, *) input, for normcode's own norms (masked, switchable)."""
    floating(input, name)
    if input.dim() < 2:
        raise ValueError(f"{name} expects input of at least 2 dimensions (N, C, *), got "
                         f"{input.dim()}D input")


def channel_dim(input, name, running_mean, running_var):
    """(N, C, *) needs a dim 1. torch fails on its absence with an IndexError, except batch_norm
    given running estimates, which fails on their size with a RuntimeError; normcode keeps the
    classes."""
    if input.dim() < 2:
        sized = name == "batch_norm" and (running_mean is not None or running_var is not None)
        error = RuntimeError if sized else IndexError
        raise error(f"{name} expects an input of at least 2 dimensions (N, C, *), got a "
                    f"{input.dim()}D input of size {list(input.shape)}")


def running_pair(running_mean, running_var, batch_statistics, name):
    if batch_statistics and (running_mean is None) != (running_var is None):
        raise ValueError(f"{name}: running_mean and running_var must either both be None or "
                         f"neither be None, got running_{'mean' if running_mean is None else 'var'}=None")
    if not batch_statistics and (running_mean is None or running_var is None):
        missing = " and ".join(k for k, t in (("running_mean", running_mean),
                                              ("running_var", running_var)) if t is None)
        raise RuntimeError(f"{name}: {missing} must be defined in evaluation mode (when the running "
                           "estimates normalize instead of the input's statistics)")


def not_differentiable(name, running_mean, running_var):
    """torch's rule: the running estimates are not differentiable arguments, and one that
    requires grad is refused while autograd records (under ``torch.no_grad()`` it is fine)."""
    if not torch.is_grad_enabled():
        return
    for what, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"{name} is not differentiable with respect to argument '{what}': the running "
                "estimates are statistics, not parameters. This input cannot have requires_grad "
                "True (detach it, or call under torch.no_grad())")


def batch_size(size):
    """One value per channel has variance 0 and a normalized value of 0/0. Counted as torch
    counts it, N * prod(spatial), which stays defined when C is 0."""
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def spatial_size(size):
    if math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {size}")


def batch_norm_eps(eps, training, name):
    """torch's batch_norm rule, the one wording for every BatchNorm of normcode: eps > 0 in
    training, eps >= 0 otherwise. (The other norms accept any eps; see :func:`denominator`.)"""
    if training and eps <= 0:
        raise ValueError(f"{name} eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"{name} eps must be non-negative, but got {eps}")


def denominator(var, eps, name):
    r"""Refuse :math:`\mathrm{Var} + \epsilon \le 0`, where :math:`1/\sqrt{\mathrm{Var} + \epsilon}`
    is inf or NaN (torch returns those without a word: normcode's rule is a clear error, never a
    silent NaN). Only eps <= 0 can get there, so the check costs nothing otherwise; a negative eps
    that keeps every set positive computes, as in torch."""
    if eps > 0:
        return
    bad = var + eps <= 0
    if bool(bad.any()):
        what = ("have zero variance (constant values), which normalizes to 0/0 = NaN" if eps == 0
                else f"have a variance <= -eps = {-eps}, so var + eps <= 0 and 1/sqrt(var + eps) "
                     "is inf or NaN")
        raise ValueError(f"{name}: eps={eps} and {int(bad.sum())} of {var.numel()} statistics "
                         f"sets {what}; pass a larger eps")


def normalized_shape(input, normalized_shape, name, **tensors):
    """LayerNorm's and RMSNorm's: ``input`` ends in ``normalized_shape``, and so do the
    parameters. Returns it as a tuple."""
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    if k == 0:
        raise RuntimeError(
            f"{name}: Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
            f"least one element, but got normalized_shape = {list(normalized_shape)}")
    if name == "rms_norm" and input.dim() < k:       # torch's rms_norm checks the rank first
        raise ValueError(f"rms_norm: Input tensor must have at least {k} dimensions, but got "
                         f"{input.dim()} (normalized_shape={list(normalized_shape)})")
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


# --------------------------------------------------------------------------------------------
# One entry per function of normcode.functional, the checks in torch's order
# --------------------------------------------------------------------------------------------
def batch_norm(input, running_mean, running_var, weight, bias, training, eps):
    if training:
        batch_size(input.size())
    batch_norm_eps(eps, training, "batch_norm")
    if input.dim() == 1 and input.numel() == 0:
        return                          # torch returns an empty 1-D input as it is, unchecked
    channel_dim(input, "batch_norm", running_mean, running_var)
    floating(input, "batch_norm")
    running_pair(running_mean, running_var, training, "batch_norm")
    per_channel_tensors(input, "batch_norm", running_mean, running_var, weight, bias)


def instance_norm(input, running_mean, running_var, weight, bias, use_input_stats):
    if use_input_stats:
        spatial_size(input.size())          # also refuses (N, C): no positions to average
    channel_dim(input, "instance_norm", running_mean, running_var)
    floating(input, "instance_norm")
    running_pair(running_mean, running_var, use_input_stats, "instance_norm")
    # Unlike batch_norm's, instance_norm's running estimates may have any floating dtype: torch
    # reads and writes them through a cast.
    dtypes(input, "instance_norm", weight=weight, bias=bias)
    per_channel(input, "instance_norm", running_mean=running_mean, running_var=running_var,
                weight=weight, bias=bias)
    not_differentiable("instance_norm", running_mean, running_var)
    tracked = running_mean is not None or running_var is not None
    if use_input_stats and tracked and input.shape[0] == 0 and input.shape[1] > 0:
        # torch averages the per-instance statistics over N = 0 instances and writes NaN into
        # the running estimates (its output is the empty input); normcode refuses instead.
        raise ValueError(
            f"instance_norm: an empty batch (input size {list(input.shape)}) has no instance "
            "statistics to move the running estimates toward (torch would set them to NaN); "
            "skip the call, or pass running_mean=running_var=None")


def layer_norm(input, shape, weight, bias):
    floating(input, "layer_norm")
    dtypes(input, "layer_norm", weight=weight, bias=bias)
    return normalized_shape(input, shape, "layer_norm", weight=weight, bias=bias)


def group_norm(input, num_groups, weight, bias):
    if input.dim() < 2:
        raise RuntimeError(
            f"group_norm: Expected at least 2 dimensions for input tensor but received {input.dim()}")
    N, C = input.shape[:2]
    if num_groups == 0:                    # torch fails on N * C // 0 (ZeroDivisionError)
        raise ZeroDivisionError("group_norm: num_groups must be positive, got num_groups=0")
    batch_size([N * C // num_groups, num_groups] + list(input.shape[2:]))
    if num_groups < 0:
        raise RuntimeError(f"group_norm: Expected num groups to be greater than 0, got {num_groups}")
    if C % num_groups != 0:
        raise RuntimeError(
            f"group_norm: Expected number of channels in input to be divisible by num_groups, but "
            f"got input of shape {list(input.shape)} and num_groups={num_groups}")
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.numel() != C):
            raise RuntimeError(
                f"group_norm: Expected {what} to be a vector of size equal to the number of "
                f"channels in input, but got {what} of shape {list(t.shape)} and input of shape "
                f"{list(input.shape)}")
    floating(input, "group_norm")
    dtypes(input, "group_norm", weight=weight, bias=bias)


def rms_norm(input, shape, weight):
    floating(input, "rms_norm")
    return normalized_shape(input, shape, "rms_norm", weight=weight)


def local_response_norm(input, size):
    if input.dim() < 3:
        raise ValueError(f"Expected 3D or higher dimensionality input (got {input.dim()} dimensions)")
    if input.numel() == 0:
        return
    # normcode's rule: torch accepts an int64 input here and floors the window's mean (its
    # integer average pooling), a silently wrong answer; normcode refuses integers as every norm does.
    floating(input, "local_response_norm")
    if size <= 0:
        raise RuntimeError(f"local_response_norm: size should be greater than zero, but got size={size}")

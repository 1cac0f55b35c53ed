"""Thin stateful wrappers: parameters, buffers and the momentum bookkeeping; the math is in
:mod:`normcode.functional`.

Names, constructor signatures, defaults, parameter and buffer names, initial values, state_dict
keys and reprs are torch.nn's, so ``ours.load_state_dict(theirs.state_dict())`` works both ways.
"""
import numbers
import warnings

import torch
from torch import nn

from . import functional as F
from . import manual


def _functions():
    """The functions a layer computes with: :mod:`normcode.functional`, or within
    :func:`normcode.manual.enabled` (in eager mode) :mod:`normcode.manual`'s namesakes."""
    # is_compiling() first: dynamo folds it to True, so a compiled layer never reads (and never
    # guards on, nor recompiles for) the switch.
    if torch.compiler.is_compiling():
        return F
    return manual if manual._enabled else F

def _register_affine(module, shape, weight, bias, factory):
    """Register gamma (``weight``) and beta (``bias``) of ``shape``, or None where switched off."""
    module.register_parameter("weight", nn.Parameter(torch.empty(shape, **factory)) if weight else None)
    module.register_parameter("bias", nn.Parameter(torch.empty(shape, **factory)) if weight and bias else None)


def _register_running_stats(module, num_features, track, factory):
    """BatchNorm's buffers: running_mean (zeros), running_var (ones), num_batches_tracked (0),
    or all three registered as None (absent from the state_dict) when not tracked."""
    device = factory.get("device")
    module.register_buffer("running_mean", torch.zeros(num_features, **factory) if track else None)
    module.register_buffer("running_var", torch.ones(num_features, **factory) if track else None)
    module.register_buffer("num_batches_tracked",
                           torch.tensor(0, dtype=torch.long, device=device) if track else None)


def _reset_running_stats(module):
    if module.running_mean is not None:
        module.running_mean.zero_()
        module.running_var.fill_(1)
        module.num_batches_tracked.zero_()


def _reset_affine(module):
    if module.weight is not None:
        nn.init.ones_(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


class _Layer(nn.Module):
    """What every normcode layer shares: the constructor's arguments kept as attributes under
    their names (as torch.nn keeps them), a repr from ``_REPR``, and ``reset_parameters``."""

    #: extra_repr's template, over the attributes (``has_bias``: whether a bias exists).
    _REPR = ""

    def _keep(self, **arguments):
        for name, value in arguments.items():
            setattr(self, name, value)

    def reset_parameters(self):
        _reset_affine(self)

    def extra_repr(self):
        return self._REPR.format(has_bias=getattr(self, "bias", None) is not None, **vars(self))


class _NormBase(_Layer):
    """Parameters and running statistics shared by BatchNorm and InstanceNorm."""

    _version = 2                     # version 2 added num_batches_tracked, as in torch.nn
    _REPR = ("{num_features}, eps={eps}, momentum={momentum}, affine={affine}, bias={has_bias}, "
             "track_running_stats={track_running_stats}")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._keep(num_features=num_features, eps=eps, momentum=momentum, affine=affine,
                   track_running_stats=track_running_stats)
        _register_affine(self, (num_features,), affine, bias, factory)          # per channel, (C,)
        _register_running_stats(self, num_features, track_running_stats, factory)
        self.reset_parameters()

    def reset_running_stats(self):
        if self.track_running_stats:          # as torch.nn: a layer switched off keeps its buffers
            _reset_running_stats(self)

    def reset_parameters(self):
        self.reset_running_stats()
        _reset_affine(self)

    def _check_input_dim(self, input):
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # A checkpoint older than the counter (or a plain dict, which has no version): the
            # module keeps its own count, as torch.nn does; 0 where it has none to keep.
            own = self.num_batches_tracked
            state_dict[key] = (own if own is not None and own.device != torch.device("meta")
                               else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


# --------------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------------
def momentum_factor(momentum, num_batches_tracked):
    """The weight of this batch in the running estimates: ``momentum``, or for ``momentum=None``
    a cumulative average, 1 / (batches counted so far, this one included), as in torch.nn.

    The average is a 0-dim float64 tensor (torch.nn computes it as a Python float, in double
    precision too), so the counter is never read back to Python: under ``torch.compile`` it
    stays a tensor in the graph (tests/test_compiled.py checks that nothing recompiles)."""
    if momentum is not None:
        return momentum
    return 1.0 / num_batches_tracked.to(torch.float64)


class _BatchNorm(_NormBase):
    def _batch_norm_arguments(self):
        """``(running_mean, running_var, training, momentum)`` for this forward's batch_norm call,
        as torch.nn's ``_BatchNorm.forward`` decides them. Counts the batch (before the forward,
        as torch.nn does, so a call that then raises still counts) when training with tracking."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = momentum_factor(self.momentum, self.num_batches_tracked)
        # Batch statistics in training, and in eval when there are no running estimates.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Running estimates are updated only in training with tracking on; in eval they normalize.
        pass_buffers = not self.training or self.track_running_stats
        return (self.running_mean if pass_buffers else None,
                self.running_var if pass_buffers else None, use_batch_stats, factor)

    def forward(self, input):
        self._check_input_dim(input)
        running_mean, running_var, training, momentum = self._batch_norm_arguments()
        return _functions().batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                       training, momentum, self.eps)


def _expect_dims(input, accepted, words):
    if input.dim() not in accepted:
        raise ValueError(f"expected {words} input (got {input.dim()}D input)")


class BatchNorm1d(_BatchNorm):
    r"""Batch normalization over a 2D (N, C) or 3D (N, C, L) input, as ``torch.nn.BatchNorm1d``.

    Ioffe & Szegedy 2015. Statistics per channel over N (and L).
    """

    def _check_input_dim(self, input):
        _expect_dims(input, (2, 3), "2D or 3D")


class BatchNorm2d(_BatchNorm):
    r"""Batch normalization over a 4D (N, C, H, W) input, as ``torch.nn.BatchNorm2d``.

    Statistics per channel over (N, H, W).
    """

    def _check_input_dim(self, input):
        _expect_dims(input, (4,), "4D")


class BatchNorm3d(_BatchNorm):
    r"""Batch normalization over a 5D (N, C, D, H, W) input, as ``torch.nn.BatchNorm3d``.

    Statistics per channel over (N, D, H, W).
    """

    def _check_input_dim(self, input):
        _expect_dims(input, (5,), "5D")


# --------------------------------------------------------------------------------------------
# InstanceNorm
# --------------------------------------------------------------------------------------------
class _InstanceNorm(_NormBase):
    _no_batch_dim = None             # the rank of an unbatched input, (C, *spatial)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False,
                 device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        # torch.nn keeps pre-0.4 checkpoints loadable: running stats of an untracked layer are an
        # error message and dropped, not silently loaded.
        if version is None and not self.track_running_stats:
            keys = [prefix + n for n in ("running_mean", "running_var") if prefix + n in state_dict]
            if keys:
                names, klass = " and ".join(f'"{k}"' for k in keys), type(self).__name__
                error_msgs.append(     # torch.nn's words, so a caller matching on them still works
                    f"Unexpected running stats buffer(s) {names} for {klass} with "
                    "track_running_stats=False. If state_dict is a checkpoint saved before 0.4.0, this "
                    f"may be expected because {klass} does not track running stats by default since "
                    "0.4.0. Please remove these keys from state_dict. If the running stats are actually "
                    f"needed, instead set track_running_stats=True in {klass} to enable them. See the "
                    f"documentation of {klass} for details.")
                for key in keys:
                    state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, input):
        _expect_dims(input, (self._no_batch_dim, self._no_batch_dim + 1),
                     f"{self._no_batch_dim}D or {self._no_batch_dim + 1}D")
        feature_dim = input.dim() - self._no_batch_dim
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={feature_dim} to match num_features "
                    f"({self.num_features}), but got: {input.size(feature_dim)}.")
            warnings.warn(f"input's size at dim={feature_dim} does not match num_features. "
                          "You can silence this warning by not passing in num_features, "
                          "which is not used because affine=False", stacklevel=2)
        unbatched = input.dim() == self._no_batch_dim
        x = input.unsqueeze(0) if unbatched else input
        y = _functions().instance_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            self.training or not self.track_running_stats,
            # torch.nn passes momentum=None as 0.0: the running estimates then never move.
            self.momentum if self.momentum is not None else 0.0, self.eps)
        return y.squeeze(0) if unbatched else y


class InstanceNorm1d(_InstanceNorm):
    r"""Instance normalization over (N, C, L) or unbatched (C, L), as ``torch.nn.InstanceNorm1d``.

    Ulyanov et al. 2016. Statistics per sample and channel over L.
    """
    _no_batch_dim = 2


class InstanceNorm2d(_InstanceNorm):
    r"""Instance normalization over (N, C, H, W) or (C, H, W), as ``torch.nn.InstanceNorm2d``.

    Statistics per sample and channel over (H, W).
    """
    _no_batch_dim = 3


class InstanceNorm3d(_InstanceNorm):
    r"""Instance normalization over (N, C, D, H, W) or (C, D, H, W), as ``torch.nn.InstanceNorm3d``.

    Statistics per sample and channel over (D, H, W).
    """
    _no_batch_dim = 4


# --------------------------------------------------------------------------------------------
# LayerNorm, GroupNorm, RMSNorm, LocalResponseNorm
# --------------------------------------------------------------------------------------------
def _as_shape(normalized_shape):
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(normalized_shape)


class LayerNorm(_Layer):
    r"""Layer normalization, as ``torch.nn.LayerNorm``.

    Ba et al. 2016. Statistics per sample over the trailing ``normalized_shape``; ``weight`` and
    ``bias`` have that shape (one gamma and beta per element). No running statistics: training
    and evaluation compute the same thing.
    """

    _REPR = "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}, bias={has_bias}"

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._keep(normalized_shape=_as_shape(normalized_shape), eps=eps,
                   elementwise_affine=elementwise_affine)
        _register_affine(self, self.normalized_shape, elementwise_affine, bias, factory)  # per element
        self.reset_parameters()

    def forward(self, input):
        return _functions().layer_norm(input, self.normalized_shape, self.weight, self.bias,
                                       self.eps)


class GroupNorm(_Layer):
    r"""Group normalization, as ``torch.nn.GroupNorm``.

    Wu & He 2018. Statistics per sample and group of ``num_channels // num_groups`` contiguous
    channels; ``weight`` and ``bias`` are per channel, shape (C,), whatever the number of groups.
    """
    _REPR = "{num_groups}, {num_channels}, eps={eps}, affine={affine}, bias={has_bias}"

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, *,
                 bias=True):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if num_groups == 0:       # torch fails on num_channels % 0: the same class, in words
            raise ZeroDivisionError(
                f"num_groups must be positive, got num_groups=0 for num_channels={num_channels}")
        if num_channels % num_groups != 0:
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self._keep(num_groups=num_groups, num_channels=num_channels, eps=eps, affine=affine)
        _register_affine(self, (num_channels,), affine, bias, factory)          # per channel, (C,)
        self.reset_parameters()

    def forward(self, input):
        return _functions().group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class RMSNorm(_Layer):
    r"""Root-mean-square normalization, as ``torch.nn.RMSNorm``.

    Zhang & Sennrich 2019. Scales by the root mean square over the trailing ``normalized_shape``;
    no centring and no bias. ``eps=None`` means the machine epsilon of the dtype torch accumulates
    in: float32's for float16, bfloat16 and float32 input, float64's for float64.
    """
    _REPR = "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}"

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None):
        super().__init__()
        self._keep(normalized_shape=_as_shape(normalized_shape), eps=eps,
                   elementwise_affine=elementwise_affine)
        factory = {"device": device, "dtype": dtype}
        self.register_parameter(
            "weight", nn.Parameter(torch.empty(self.normalized_shape, **factory)) if elementwise_affine else None)
        self.reset_parameters()

    def forward(self, input):
        return _functions().rms_norm(input, self.normalized_shape, self.weight, self.eps)


class LocalResponseNorm(_Layer):
    r"""Local response normalization across channels, as ``torch.nn.LocalResponseNorm``.

    Krizhevsky et al. 2012. No parameters and no buffers.
    """
    _REPR = "{size}, alpha={alpha}, beta={beta}, k={k}"

    def __init__(self, size, alpha=1e-4, beta=0.75, k=1.0):
        super().__init__()
        self._keep(size=size, alpha=alpha, beta=beta, k=k)

    def forward(self, input):
        return _functions().local_response_norm(input, self.size, self.alpha, self.beta,
                                                self.k)

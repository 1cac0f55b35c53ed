"""normcode: a reference implementation of every normalization layer, faithful to torch.nn.

Same names, signatures, defaults, parameters, buffers and behaviour as torch.nn; the math is
plain tensor operations (see :mod:`normcode.functional`), never torch's own normalization kernels.
"""
from . import functional, testing
from . import manual, variance
from ._axes import statistic_ids, statistics_count, statistics_set, statistics_view
from .convert import from_torch, to_torch
from .distributed import SyncBatchNorm
from .masked import MaskedBatchNorm1d, masked_batch_norm
from .modules import (
    BatchNorm1d, BatchNorm2d, BatchNorm3d,
    GroupNorm,
    InstanceNorm1d, InstanceNorm2d, InstanceNorm3d,
    LayerNorm,
    LocalResponseNorm,
    RMSNorm,
)
from .switchable import SwitchNorm1d, SwitchNorm2d
from .dynamic_tanh import DynamicTanh
from .batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .weight_norms import StdConv2d, spectral_norm, weight_norm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm", "SwitchNorm1d", "SwitchNorm2d",
    "DynamicTanh",
    "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "weight_norm", "spectral_norm", "StdConv2d",
    "functional", "testing", "from_torch", "to_torch",
    "statistics_view", "statistics_set", "statistic_ids", "statistics_count",
    "MaskedBatchNorm1d", "masked_batch_norm",
    "SyncBatchNorm",
    "manual", "variance",
]

"""normcode: a reference implementation of every normalization layer, faithful to torch.nn.

Same names, signatures, defaults, parameters, buffers and behaviour as torch.nn; the math is
plain tensor operations (see :mod:`normcode.functional`), never torch's own normalization kernels.
"""
from . import functional, testing
from ._axes import statistic_ids, statistics_count, statistics_view
from .convert import from_torch, to_torch
from .modules import (
    BatchNorm1d, BatchNorm2d, BatchNorm3d,
    GroupNorm,
    InstanceNorm1d, InstanceNorm2d, InstanceNorm3d,
    LayerNorm,
    LocalResponseNorm,
    RMSNorm,
)

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm",
    "functional", "testing", "from_torch", "to_torch",
    "statistics_view", "statistic_ids", "statistics_count",
]

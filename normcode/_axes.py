"""Which elements share one mean and one variance: the statistics set of every norm.

This module is the single place that says which axes each normalization reduces. The
functionals in :mod:`normcode.functional` compute their statistics through
:func:`statistics_view`, the cube figure colours its voxels with :func:`statistic_ids`, and a
test checks both against the sparsity of torch.nn's Jacobians. So the picture in the book
cannot disagree with the code.
"""
import math
from typing import NamedTuple

import torch

#: The norms whose statistics set is one reduction, with the axes it reduces for an (N, C, *) input.
NORMS = {
    "batch": "per channel, over N and every position",
    "instance": "per sample and channel, over every position",
    "layer": "per sample, over the trailing normalized_shape",
    "group": "per sample and group of C // G contiguous channels, over the group and every position",
    "rms": "per sample, over the trailing normalized_shape (root mean square, no centring)",
}


def statistics_view(x, norm, *, num_groups=None, normalized_ndim=None):
    """Return ``(view, dims)``: ``x`` shaped for the reduction, and the dims of it to reduce.

    Two elements of ``view`` share one mean and variance exactly when their indices agree on
    every dim not in ``dims``. ``view`` is ``x`` itself for every norm but GroupNorm, whose
    channel dim is split into (G, C//G): ``(N, G, C//G, *spatial)``, a view of ``x`` in any
    memory layout, each group reduced over its channels and every position.
    """
    if norm == "batch":                       # one statistic per channel
        return x, (0, *range(2, x.dim()))
    if norm == "instance":                    # one per (sample, channel)
        return x, tuple(range(2, x.dim()))
    if norm in ("layer", "rms"):              # one per leading index
        if normalized_ndim is None:
            raise TypeError(f"norm {norm!r} needs normalized_ndim")
        return x, tuple(range(x.dim() - normalized_ndim, x.dim()))
    if norm == "group":                       # one per (sample, group)
        if num_groups is None:
            raise TypeError("norm 'group' needs num_groups")
        view = x.unflatten(1, (num_groups, x.shape[1] // num_groups))   # (N, G, C//G, *spatial)
        return view, tuple(range(2, view.dim()))
    raise ValueError(f"unknown norm {norm!r}; expected one of {sorted(NORMS)}")


class StatisticsSet(NamedTuple):
    """What :func:`statistics_set` returns: the :func:`statistics_view` pair and the set size."""
    view: torch.Tensor
    dims: tuple
    count: int            # elements per statistics set: the M of the mean's 1/M


def statistics_set(x, norm, **options):
    """``(view, dims, count)``: :func:`statistics_view`, and how many elements each set has.

    ``count`` is the product of ``view``'s sizes along ``dims`` (0 for an empty set): the
    divisor of a mean, and the n of Bessel's n / (n - 1).
    """
    view, dims = statistics_view(x, norm, **options)
    return StatisticsSet(view, dims, set_size(view, dims))


def set_size(x, dims):
    """How many elements of ``x`` one set over ``dims`` holds."""
    return math.prod([x.shape[d] for d in dims])      # a list: torch.compile cannot trace a generator here


def statistic_ids(norm, shape, **options):
    """An integer tensor of ``shape`` whose entry says which statistic each element belongs to.

    Elements with equal ids share one mean and variance. Built from :func:`statistics_view`,
    the same function the layers compute with.
    """
    view, dims = statistics_view(torch.empty(shape), norm, **options)
    stat_shape = [1 if d in dims else n for d, n in enumerate(view.shape)]
    ids = torch.arange(math.prod(stat_shape)).reshape(stat_shape).expand(view.shape)
    return ids.reshape(shape)


def statistics_count(norm, shape, **options):
    """How many means (and as many variances) the norm computes for an input of ``shape``."""
    return int(statistic_ids(norm, shape, **options).unique().numel())

"""One place says which axes each norm reduces (normcode._axes), and this test checks it against torch.

For a normalization in training mode, output i depends on input j exactly when i and j share a
statistic (the mean and variance couple them; for RMSNorm the mean square does). So the sparsity
of torch.nn's Jacobian is the statistics relation, read off torch itself. normcode.statistic_ids
must induce the same relation, and so must the Jacobian of normcode's own layers.
"""
import pytest
import torch
from torch import nn

import normcode
from normcode.testing import jacobian_statistic_groups, randomize_, same_statistic_matrix

#: id -> (norm in normcode._axes, its options, layer name, layer args, input shape, how many statistics)
CASES = {
    "batch (N,C,L)": ("batch", {}, "BatchNorm1d", (2,), (3, 2, 4), 2),
    "batch (N,C)": ("batch", {}, "BatchNorm1d", (3,), (4, 3), 3),
    "batch (N,C,H,W)": ("batch", {}, "BatchNorm2d", (3,), (2, 3, 2, 2), 3),
    "instance (N,C,L)": ("instance", {}, "InstanceNorm1d", (3,), (2, 3, 4), 6),
    "instance (N,C,H,W)": ("instance", {}, "InstanceNorm2d", (2,), (2, 2, 2, 3), 4),
    "layer, last dim": ("layer", {"normalized_ndim": 1}, "LayerNorm", ((4,),), (2, 3, 4), 6),
    "layer, last two dims": ("layer", {"normalized_ndim": 2}, "LayerNorm", ((3, 4),), (2, 3, 4), 2),
    "group G=1": ("group", {"num_groups": 1}, "GroupNorm", (1, 6), (2, 6, 3), 2),
    "group G=2": ("group", {"num_groups": 2}, "GroupNorm", (2, 6), (2, 6, 3), 4),
    "group G=3": ("group", {"num_groups": 3}, "GroupNorm", (3, 6), (2, 6, 3), 6),
    "group G=C": ("group", {"num_groups": 6}, "GroupNorm", (6, 6), (2, 6, 3), 12),
    "group (N,C,H,W) G=2": ("group", {"num_groups": 2}, "GroupNorm", (2, 4), (2, 4, 2, 2), 4),
    "group (N,C) G=2": ("group", {"num_groups": 2}, "GroupNorm", (2, 4), (3, 4), 6),
    "rms, last dim": ("rms", {"normalized_ndim": 1}, "RMSNorm", ((4,),), (2, 3, 4), 6),
    "rms, last two dims": ("rms", {"normalized_ndim": 2}, "RMSNorm", ((3, 4),), (2, 3, 4), 2),
}


def jacobian_relation(layer, x):
    """The "shares a statistic" relation read off ``layer``'s Jacobian at ``x`` (training mode)."""
    layer = randomize_(layer.double()).train()
    return jacobian_statistic_groups(layer, x)


@pytest.mark.parametrize("case", CASES)
def test_statistics_sets_match_torch_jacobian(case):
    norm, options, name, args, shape, count = CASES[case]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    said = same_statistic_matrix(normcode.statistic_ids(norm, shape, **options))
    torch_says = jacobian_relation(getattr(nn, name)(*args), x)
    ours_does = jacobian_relation(getattr(normcode, name)(*args), x)
    assert torch.equal(said, torch_says), f"normcode._axes disagrees with torch.nn.{name}'s Jacobian"
    assert torch.equal(ours_does, torch_says), f"normcode.{name}'s Jacobian disagrees with torch's"
    assert normcode.statistics_count(norm, shape, **options) == count
    assert not said.all(), "a relation coupling everything would not tell the norms apart"


def test_every_norm_is_checked():
    assert {norm for norm, *_ in CASES.values()} == set(normcode._axes.NORMS)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_view_is_a_view_in_any_layout(layout):
    """GroupNorm's view splits the channel dim, (N, G, C//G, H, W): no copy, channels_last too."""
    x = torch.randn(2, 6, 3, 4)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    view, dims = normcode.statistics_view(x, "group", num_groups=3)
    assert view.shape == (2, 3, 2, 3, 4) and dims == (2, 3, 4)
    assert view.data_ptr() == x.data_ptr() and view._base is x

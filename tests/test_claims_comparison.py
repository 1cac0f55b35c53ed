"""The comparison chapter's claims, beyond the one shape and seed the chapter runs.

The chapter reads its tables off one activation shape, (8, 6, 4, 4), and one draw of inputs.
Here the same functions of normcode.experiments.sheet run over other shapes, group counts and
seeds, and the relations the chapter states must hold for every one of them.
"""
import pytest
import torch
from torch import nn

import normcode
from normcode.experiments.sheet import (
    axis_roles,
    behaviour_table,
    fold_into_conv,
    html_table,
    sheet_layers,
    statistics_table,
    usage_table,
)
from normcode.testing import randomize_

SHAPES = [  # (N, C, H, W), G
    ((8, 6, 4, 4), 2),
    ((3, 4, 2, 5), 2),
    ((5, 8, 3, 3), 4),
    ((2, 6, 1, 7), 3),
]
REDUCE_N = {"BatchNorm2d", "SyncBatchNorm", "SwitchNorm2d"}


@pytest.mark.parametrize("shape, groups", SHAPES)
def test_statistics_sets(shape, groups):
    N, C, _, _ = shape
    _, rows, roles_of = statistics_table(sheet_layers(groups), shape)
    R, K = "reduced", "kept"
    assert roles_of["BatchNorm2d"][0] == {"N": R, "C": K, "H": R, "W": R}
    assert roles_of["LayerNorm"][0] == {"N": K, "C": R, "H": R, "W": R}
    assert roles_of["InstanceNorm2d"][0] == {"N": K, "C": K, "H": R, "W": R}
    assert roles_of["GroupNorm"][0]["C"] == C // groups
    assert {n for n, r in roles_of.items() if any(x["N"] == R for x in r)} == REDUCE_N
    counts = {row[0]: row[3] for row in rows}
    assert counts["BatchNorm2d"] == f"{C} sets: {2 * C} means and variances"
    assert counts["GroupNorm"] == f"{N * groups} sets: {2 * N * groups} means and variances"
    assert counts["RMSNorm"] == f"{N} sets: {N} mean squares"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape, groups", SHAPES[:2])
def test_batch_dependence_is_reducing_over_n(shape, groups, seed):
    """Batch-dependent in training exactly when reducing over N; train and eval differ exactly
    with running statistics; nothing is batch-dependent in eval."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    others = torch.randn(shape, generator=g, dtype=torch.float64) * 3 - 1
    layers = sheet_layers(groups)
    _, _, behaviour = behaviour_table(layers, x, others)
    assert {n for n, b in behaviour.items() if b.batch_in_training} == REDUCE_N
    assert not any(b.batch_in_eval for b in behaviour.values())
    assert {n for n, b in behaviour.items() if b.train_eval_differ} == (
        REDUCE_N | {"InstanceNorm2d, affine, tracked"})


def test_axis_roles_reads_blocks():
    ids = normcode.statistic_ids("group", (2, 6, 3, 3), num_groups=3)
    assert axis_roles(ids) == {"N": "kept", "C": 2, "H": "reduced", "W": "reduced"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batchnorm_folds_into_conv(seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=seed != 1).double()
    bn = randomize_(normcode.BatchNorm2d(5).double(), torch.Generator().manual_seed(seed)).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fold_into_conv(conv, bn)(x), bn(conv(x)), rtol=0, atol=1e-12)


def test_usage_examples_match_torch():
    _, rows, usages = usage_table(seed=1)
    assert max(u.largest_difference for u in usages) < 1e-10
    assert len(rows) == len(usages)


def test_html_table_marks_code():
    html = html_table(["a"], [["`x` y"]]).data
    assert "<td><code>x</code> y</td>" in html

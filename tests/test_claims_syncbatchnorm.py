"""The syncbatchnorm chapter's claims about torch.nn.SyncBatchNorm's source.

The chapter describes what torch's SyncBatchNorm exchanges and checks, read from
torch/nn/modules/batchnorm.py and torch/nn/modules/_functions.py (it cannot run that code: it
raises on CPU). These tests hold the installed torch to each line the chapter relies on, so a
torch that changes one of them fails here and the chapter's table gets re-read.
"""
import inspect

import pytest
import torch
from torch import nn
from torch.nn.modules import _functions

MODULE_FORWARD = inspect.getsource(nn.SyncBatchNorm.forward)
FUNCTION_FORWARD = inspect.getsource(_functions.SyncBatchNorm.forward)
FUNCTION_BACKWARD = inspect.getsource(_functions.SyncBatchNorm.backward)


def _squash(text):
    return " ".join(text.split())


CLAIMS = [
    # (where, source text, the chapter's claim)
    (MODULE_FORWARD, '"cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name(), ]',
     "devices: a tensor elsewhere raises"),
    (MODULE_FORWARD, ("world_size = torch.distributed.get_world_size(process_group) "
                      "need_sync = world_size > 1"),
     "the device is tested before the world size: a group of one raises too"),
    (FUNCTION_FORWARD, "combined = torch.cat([mean, invstd, count], dim=0)",
     "forward: mean, invstd and count, 2C + 1 numbers per rank"),
    (FUNCTION_FORWARD, "dist.all_gather(combined_list, combined, process_group",
     "forward: an all_gather (gloo's path)"),
    (FUNCTION_FORWARD, "mask = count_all.squeeze(-1) >= 1",
     "ranks with a count of 0 are dropped before the merge"),
    (FUNCTION_FORWARD, "if size == 1 and world_size < 2:",
     "one value per channel: checked only below a world size of 2"),
    (FUNCTION_BACKWARD, "combined = torch.cat([sum_dy, sum_dy_xmu], dim=0)",
     "backward: sum g and sum g (x - mean), 2C numbers"),
    (FUNCTION_BACKWARD, "torch.distributed.all_reduce(",
     "backward: one all_reduce"),
]


@pytest.mark.parametrize("where, text, claim", CLAIMS, ids=[c[2] for c in CLAIMS])
def test_torch_source_says_what_the_chapter_says(where, text, claim):
    assert _squash(text) in _squash(where), claim


def test_collective_count_in_torch_source():
    """Two collectives per step: one all_gather in forward, one all_reduce in backward (each
    appears once per code path; forward has a gloo and a non-gloo path)."""
    assert FUNCTION_FORWARD.count("all_reduce") == 0
    assert FUNCTION_FORWARD.count("dist.all_gather") == 2      # all_gather and all_gather_single
    assert FUNCTION_BACKWARD.count("all_gather") == 0


def test_device_is_checked_before_the_world_size():
    """The chapter: the module raises for a CPU tensor even in a group of one, because it
    tests the device before it asks for the group's size."""
    source = _squash(MODULE_FORWARD)
    device_check = source.index('"cuda", "hpu", "xpu"')
    world_size = source.index("world_size = torch.distributed.get_world_size(process_group)")
    assert device_check < world_size


def test_the_only_world_size_check_is_unreachable():
    """The module calls the autograd function only when world_size > 1, so the function's
    'more than 1 value per channel' check (world_size < 2) never fires on that path."""
    assert "need_sync = world_size > 1" in MODULE_FORWARD
    assert "if not need_sync:" in MODULE_FORWARD


def test_statistics_kernels_have_no_cpu_implementation():
    x = torch.randn(4, 3, 5)
    with pytest.raises(NotImplementedError, match="batch_norm_stats"):
        torch.batch_norm_stats(x, 1e-5)
    with pytest.raises(NotImplementedError, match="batch_norm_elemt"):
        torch.batch_norm_elemt(x, None, None, torch.zeros(3), torch.ones(3), 1e-5)


def test_without_a_process_group_torch_syncbn_is_batchnorm_on_cpu():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    sync = nn.SyncBatchNorm(3, dtype=torch.float64)
    plain = nn.BatchNorm1d(3, dtype=torch.float64)
    torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(sync.running_var, plain.running_var, rtol=0, atol=1e-12)

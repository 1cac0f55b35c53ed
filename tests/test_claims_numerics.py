"""The numerics chapter's findings about torch.nn's float32 and half statistics, over seeds.

Each test runs the chapter's own measurement (normcode.experiments.accuracy) on several seeds,
smaller than the chapter's where the claim allows, and asserts what the chapter states. They
assert torch's behaviour as it is: a torch release that changes it fails here and is noticed.
"""
import pytest
import torch

from normcode.experiments.accuracy import (batchnorm1d_error, half_precision_ulps,
                                           saved_mean_ulps)

SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_batchnorm1d_nc_error_grows_with_batch_and_mean(seed):
    """(N, C): wrong at N = 2^17, mean 1e4; (1, C, N) and normcode accurate there."""
    sizes, means = [2**12, 2**17], [1e2, 1e4]
    error = batchnorm1d_error(sizes, means, channels=16, std=3.0, seed=seed)
    nc, per_length = error["(N, C)"], error["(1, C, N)"]
    assert nc[1, 1] > 1 and error["running_var"][1, 1] > 1
    assert nc[1, 1] > 100 * nc[1, 0]                 # grows with N
    assert nc[1, 1] > 100 * nc[0, 1]                 # and with the mean
    assert (nc[:, 1] > 10 * per_length[:, 1]).all()  # the layout decides
    assert (per_length[1] < 1e-3).all() and (error["normcode"][1] < 1e-6).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_layernorm_groupnorm_means_are_float32(seed):
    """Within two float32 steps of the exact mean, but not always within half of one."""
    ulps = saved_mean_ulps(rows=8, size=2**20, mean=1e4, seed=seed)
    for name in ("LayerNorm", "GroupNorm"):
        assert max(ulps[name]) < 2
    assert max(max(ulps["LayerNorm"]), max(ulps["GroupNorm"])) > 0.5


@pytest.mark.parametrize("seed", SEEDS)
def test_half_precision_only_torch_batchnorm_drifts(seed):
    layers = {
        "LayerNorm": lambda F, x: F.layer_norm(x, (256,)),
        "GroupNorm": lambda F, x: F.group_norm(x.reshape(16, 8, 32), 4),
        "BatchNorm": lambda F, x: F.batch_norm(x, None, None, training=True),
    }
    dtypes, means = (torch.float16, torch.bfloat16), (0.0, 300.0)
    ulps = half_precision_ulps(layers, dtypes, means, seed=seed)
    for (dtype, mean, name, side), u in ulps.items():
        if (name, side) == ("BatchNorm", "torch.nn"):
            if mean == 300.0:
                assert u > 20 * max(ulps[dtype, 0.0, name, side], 1)
        else:
            assert u <= 1, (dtype, mean, name, side, u)

"""chapters/layernorm.ipynb asserts Table 1 of Ba, Kiros & Hinton (2016) on one random draw;
here the same verdicts hold over several draws and shapes."""
import pytest
import torch

import normcode

# name: (transform of (W, x), Table 1's verdict for (BatchNorm, LayerNorm))
TABLE_1 = {
    "weight matrix re-scaling": (lambda W, x, r: (3 * W, x), (True, True)),
    "weight matrix re-centering": (lambda W, x, r: (W + r(1, W.shape[1]), x), (False, True)),
    "weight vector re-scaling": (lambda W, x, r: (r(W.shape[0], 1).abs() * W, x),
                                 (True, False)),
    "dataset re-scaling": (lambda W, x, r: (W, 0.2 * x), (True, True)),
    "dataset re-centering": (lambda W, x, r: (W, x + r(1, x.shape[1])), (True, False)),
    "single training case re-scaling": (lambda W, x, r: (W, r(x.shape[0], 1).abs() * x),
                                        (False, True)),
}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", TABLE_1)
def test_ba_et_al_table_1(name, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64) + 0.3

    x, W = r(8, 6), r(10, 6)
    transform, verdicts = TABLE_1[name]
    W2, x2 = transform(W, x, r)
    ln = normcode.testing.randomize_(normcode.LayerNorm(10), g).double()
    bn = normcode.BatchNorm1d(10, affine=False, track_running_stats=False).double()
    for norm, invariant in zip((bn, ln), verdicts):
        change = (norm(x2 @ W2.T) - norm(x @ W.T)).abs().max()
        if invariant:
            assert change < 1e-3, (name, norm)
        else:
            assert change > 1e-2, (name, norm)


def test_group_norm_with_one_group_has_layer_norm_statistics():
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(normcode.GroupNorm(1, 6, affine=False).double()(x),
                               normcode.functional.layer_norm(x, (6, 5, 5)))

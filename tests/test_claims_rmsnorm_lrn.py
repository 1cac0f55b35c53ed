"""The RMSNorm and LocalResponseNorm chapter's claims, over seeds and shapes.

- LayerNorm(x) = RMSNorm(x - mean(x)) (+ beta), for the same gamma and eps;
- RMSNorm is invariant to rescaling a sample, not to shifting it; LayerNorm to both;
- torch's LocalResponseNorm divides alpha by the window size: AlexNet's layer (Krizhevsky et
  al. 2012, Section 3.3: k = 2, n = 5, alpha = 1e-4, beta = 0.75, alpha on the plain sum) is
  nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0); normcode agrees.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normcode

f64 = torch.float64
SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_layer_norm_is_rms_norm_of_centred_input(seed):
    torch.manual_seed(seed)
    x = torch.randn(6, 5, 12, dtype=f64) * 3 + 4
    gamma, beta = torch.rand(5, 12, dtype=f64) + 0.5, torch.randn(5, 12, dtype=f64)
    centred = x - x.mean((1, 2), keepdim=True)
    for functional in (F, normcode.functional):
        torch.testing.assert_close(
            functional.rms_norm(centred, (5, 12), gamma, 1e-5) + beta,
            functional.layer_norm(x, (5, 12), gamma, beta, 1e-5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_invariances(seed):
    torch.manual_seed(seed)
    x = torch.randn(8, 16, dtype=f64)
    same = lambda a, b: bool((a - b).abs().max() < 1e-9)
    for functional in (F, normcode.functional):
        rms = lambda t: functional.rms_norm(t, (16,), eps=1e-12)
        ln = lambda t: functional.layer_norm(t, (16,), eps=1e-12)
        assert same(ln(x + 3), ln(x)) and same(ln(5 * x), ln(x))
        assert same(rms(5 * x), rms(x)) and not same(rms(x + 3), rms(x))


def alexnet_lrn(a, n=5, alpha=1e-4, beta=0.75, k=2.0):
    C = a.shape[1]
    out = torch.empty_like(a)
    for i in range(C):
        window = range(max(0, i - n // 2), min(C - 1, i + n // 2) + 1)
        out[:, i] = a[:, i] / (k + alpha * sum(a[:, j] ** 2 for j in window)) ** beta
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_alexnet_lrn_in_torch_convention(seed):
    torch.manual_seed(seed)
    a = torch.relu(torch.randn(2, 9, 4, 4, dtype=f64) * 30)
    paper = alexnet_lrn(a)
    for module in (nn.LocalResponseNorm, normcode.LocalResponseNorm):
        torch.testing.assert_close(module(5, alpha=5e-4, beta=0.75, k=2.0)(a), paper,
                                   rtol=0, atol=1e-12)
        assert (module(5, alpha=1e-4, beta=0.75, k=2.0)(a) - paper).abs().max() > 1e-2

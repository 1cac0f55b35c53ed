"""normcode.DynamicTanh against its formula, its gradients, and the authors' parameter layout.

Zhu, Chen, He, LeCun & Liu (2025) publish DynamicTanh as a module with a learnable scalar
``alpha`` of shape (1,) and a per-channel ``weight`` (ones) and ``bias`` (zeros). A checkpoint
of theirs holds exactly those three tensors, so it must load into normcode's with no key
renamed, and compute the same.
"""
import pytest
import torch
from torch import nn

import normcode
from normcode.dynamic_tanh import DynamicTanh

#: One row per case: the constructor options and the input shape.
CASES = {
    "tokens (B, T, C)": dict(kwargs=dict(normalized_shape=8), shape=(3, 5, 8)),
    "vectors (N, C)": dict(kwargs=dict(normalized_shape=8), shape=(4, 8)),
    "two trailing dims": dict(kwargs=dict(normalized_shape=(4, 6)), shape=(2, 3, 4, 6)),
    "images (N, C, H, W)": dict(kwargs=dict(normalized_shape=5, channels_last=False),
                                shape=(2, 5, 3, 4)),
    "alpha 2": dict(kwargs=dict(normalized_shape=8, alpha_init_value=2.0), shape=(3, 8)),
}


def formula(x, alpha, weight, bias, channels_last):
    """y = tanh(alpha x) * weight + bias, with the affine on the channels."""
    if not channels_last:  # (N, C, H, W): move C last, apply, move back
        return formula(x.movedim(1, -1), alpha, weight, bias, True).movedim(-1, 1)
    return torch.tanh(alpha * x) * weight + bias


def randomized(module, seed=0):
    """Random parameters, never the ones/zeros defaults that hide a swapped weight and bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5 + 1.0)
    return module


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_formula(case):
    m = randomized(DynamicTanh(**case["kwargs"]).double())
    x = torch.randn(case["shape"], dtype=torch.float64) * 3
    torch.testing.assert_close(
        m(x), formula(x, m.alpha, m.weight, m.bias, m.channels_last), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gradcheck(case):
    m = randomized(DynamicTanh(**case["kwargs"]).double())
    x = torch.randn(case["shape"], dtype=torch.float64, requires_grad=True)

    def f(x, alpha, weight, bias):
        return torch.func.functional_call(m, {"alpha": alpha, "weight": weight, "bias": bias},
                                          (x,))

    params = [p.detach().clone().requires_grad_() for p in (m.alpha, m.weight, m.bias)]
    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


def test_parameters_and_defaults():
    m = DynamicTanh(6)
    assert [name for name, _ in m.named_parameters()] == ["alpha", "weight", "bias"]
    assert list(m.state_dict()) == ["alpha", "weight", "bias"]
    assert not list(m.buffers())  # no statistics, running or otherwise
    assert m.alpha.shape == (1,) and m.alpha.item() == 0.5
    assert torch.equal(m.weight, torch.ones(6)) and torch.equal(m.bias, torch.zeros(6))
    assert DynamicTanh(6, alpha_init_value=0.8).alpha.item() == pytest.approx(0.8)
    assert DynamicTanh((2, 3)).weight.shape == (2, 3)
    assert "alpha_init_value=0.5" in repr(m) and "channels_last=True" in repr(m)
    assert normcode.DynamicTanh is DynamicTanh  # exported with the other layers


class AuthorsLayout(nn.Module):
    """A module with the authors' parameter layout (alpha (1,), weight and bias (C,)) and
    their forward, written out here from the paper's description as the reference."""

    def __init__(self, C, channels_last, alpha):
        super().__init__()
        self.channels_last = channels_last
        self.alpha = nn.Parameter(torch.full((1,), alpha))
        self.weight = nn.Parameter(torch.ones(C))
        self.bias = nn.Parameter(torch.zeros(C))

    def forward(self, x):
        x = torch.tanh(self.alpha * x)
        if self.channels_last:
            return x * self.weight + self.bias
        return x * self.weight[:, None, None] + self.bias[:, None, None]


@pytest.mark.parametrize("channels_last", [True, False])
def test_loads_the_authors_state_dict_both_ways(channels_last):
    theirs = randomized(AuthorsLayout(5, channels_last, alpha=0.7).double(), seed=1)
    ours = DynamicTanh(5, channels_last=channels_last).double()
    ours.load_state_dict(theirs.state_dict())  # strict: same keys, same shapes
    x = torch.randn((2, 5, 3, 4) if not channels_last else (2, 3, 5), dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    back = AuthorsLayout(5, channels_last, alpha=0.1).double()
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), ours(x), rtol=0, atol=0)


def test_no_statistics():
    """Per element, independent of the batch, the same in training and evaluation."""
    m = randomized(DynamicTanh(8).double())
    x = torch.randn(6, 8, dtype=torch.float64)
    y = m(x)
    torch.testing.assert_close(m(x[:1]), y[:1], rtol=0, atol=0)  # batch of one
    torch.testing.assert_close(m.eval()(x), y, rtol=0, atol=0)  # eval mode
    x2 = x.clone()
    x2[:, 3] += 100.0  # one channel moves: the others do not
    changed = (m(x2) != y).any(0)
    assert changed.tolist() == [i == 3 for i in range(8)]

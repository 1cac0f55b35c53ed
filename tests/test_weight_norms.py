"""normcode.weight_norm, normcode.spectral_norm and weight standardization, against
torch.nn.utils.parametrizations and BiT's StdConv2d."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as P

from normcode.weight_norms import (
    StdConv2d,
    norm_except_dim,
    spectral_norm,
    standardize_weight,
    weight_norm,
)

MODULES = {
    "Linear": (lambda: nn.Linear(5, 7), (4, 5)),
    "Conv1d": (lambda: nn.Conv1d(3, 4, 3), (2, 3, 6)),
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3), (2, 3, 5, 5)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(3, 4, 3), (2, 3, 4, 4)),
}


def pair(make, seed=0):
    torch.manual_seed(seed)
    a = make().double()
    return a, copy.deepcopy(a)


def check_steps(ours, theirs, shape, steps=3, train=True):
    """Outputs, gradients of every parameter, and every buffer equal torch's over SGD steps."""
    g = torch.Generator().manual_seed(1)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    for m in (ours, theirs):
        m.train(train)
    for _ in range(steps):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        ys = [m(x) for m in (ours, theirs)]
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-10, atol=1e-12)
        dy = torch.randn(ys[0].shape, generator=g, dtype=torch.float64)
        for y, opt in zip(ys, opts):
            opt.zero_grad()
            y.backward(dy)
        for (n0, p0), (n1, p1) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert n0 == n1
            torch.testing.assert_close(p0.grad, p1.grad, rtol=1e-10, atol=1e-12)
        for opt in opts:
            opt.step()
        for (n0, b0), (n1, b1) in zip(ours.named_buffers(), theirs.named_buffers()):
            assert n0 == n1
            torch.testing.assert_close(b0, b1, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("dim", [0, 1, -1, -2, None])
def test_weight_norm_matches_torch(module, dim):
    make, shape = MODULES[module]
    ours, theirs = pair(make)
    weight_norm(ours, dim=dim)
    P.weight_norm(theirs, dim=dim)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-12, atol=1e-14)
    check_steps(ours, theirs, shape)


def test_weight_norm_state_dicts_load_both_ways():
    ours, theirs = pair(MODULES["Conv2d"][0])
    weight_norm(ours)
    P.weight_norm(theirs)
    with torch.no_grad():
        theirs.parametrizations.weight.original0.mul_(3.0)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-12, atol=1e-14)
    fresh = P.weight_norm(MODULES["Conv2d"][0]().double())
    fresh.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(fresh.weight, ours.weight, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_weight_norm_loads_old_g_v_keys():
    old = nn.utils.weight_norm(nn.Linear(5, 7).double())       # the deprecated hook version
    ours = weight_norm(nn.Linear(5, 7).double())
    ours.load_state_dict(old.state_dict(), strict=True)
    torch.testing.assert_close(ours.weight, old.weight_g * old.weight_v / old.weight_v.norm(
        dim=1, keepdim=True), rtol=1e-12, atol=1e-14)


def test_weight_norm_is_plain_tensor_operations(monkeypatch):
    """Not torch's fused kernel: with torch._weight_norm broken, normcode still computes."""
    monkeypatch.setattr(torch, "_weight_norm", None)
    m = weight_norm(nn.Linear(3, 2))
    assert m(torch.randn(4, 3)).shape == (4, 2)


@pytest.mark.parametrize("dim", [-1, 0, 2, -3])
def test_norm_except_dim_matches_torch(dim):
    v = torch.randn(4, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(norm_except_dim(v, dim), torch.norm_except_dim(v, 2, dim))


def test_weight_norm_bad_dim_as_torch():
    with pytest.raises(IndexError, match="Dimension out of range"):
        P.weight_norm(nn.Conv2d(3, 4, 3), dim=5)
    with pytest.raises(IndexError, match="Dimension out of range"):
        weight_norm(nn.Conv2d(3, 4, 3), dim=5)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("n_power_iterations", [1, 3])
@pytest.mark.parametrize("train", [True, False])
def test_spectral_norm_matches_torch(module, n_power_iterations, train):
    """The same random start (one seed), the same power iterations in training and none in
    eval: _u, _v, outputs and gradients equal torch's over several SGD steps."""
    make, shape = MODULES[module]
    ours, theirs = pair(make)
    torch.manual_seed(7)
    spectral_norm(ours, n_power_iterations=n_power_iterations)
    torch.manual_seed(7)
    P.spectral_norm(theirs, n_power_iterations=n_power_iterations)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-10, atol=1e-12)
    u_before = ours.parametrizations.weight[0]._u.clone()
    check_steps(ours, theirs, shape, steps=4, train=train)
    moved = not torch.equal(u_before, ours.parametrizations.weight[0]._u)
    assert moved == train                   # power iteration in training only


def test_spectral_norm_state_dict_loads_from_torch():
    ours, theirs = pair(MODULES["Linear"][0])
    spectral_norm(ours)
    P.spectral_norm(theirs)
    theirs(torch.randn(3, 5, dtype=torch.float64))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-12, atol=1e-14)


def test_spectral_norm_holds_the_largest_singular_value_at_one():
    torch.manual_seed(0)
    m = spectral_norm(nn.Linear(20, 30).double(), n_power_iterations=1)
    for _ in range(30):
        m(torch.randn(2, 20, dtype=torch.float64))
    sigma = torch.linalg.matrix_norm(m.weight.detach(), 2)
    assert abs(float(sigma) - 1) < 1e-6


def test_spectral_norm_bad_arguments_as_torch():
    for fn in (spectral_norm, P.spectral_norm):
        with pytest.raises(ValueError, match="n_power_iterations"):
            fn(nn.Linear(3, 3), n_power_iterations=0)
        with pytest.raises(IndexError, match="Dimension out of range"):
            fn(nn.Linear(3, 3), dim=2)
        with pytest.raises(ValueError, match="no parameter or buffer"):
            fn(nn.Linear(3, 3), name="nope")


def bit_std_conv(x, conv):
    """google-research/big_transfer, bit_pytorch/models.py, StdConv2d.forward, transcribed."""
    w = conv.weight
    v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
    w = (w - m) / torch.sqrt(v + 1e-10)
    return nn.functional.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation,
                                conv.groups)


@pytest.mark.parametrize("options", [{}, {"stride": 2, "padding": 1, "bias": False},
                                     {"groups": 2}])
def test_std_conv_matches_bit(options):
    torch.manual_seed(0)
    conv = StdConv2d(4, 6, 3, **options).double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    y, y_ref = conv(x), bit_std_conv(x, conv)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(y.sum(), (x, conv.weight))
    g2 = torch.autograd.grad(bit_std_conv(x, conv).sum(), (x, conv.weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_standardized_weight_statistics():
    """Per output channel: mean 0 and biased variance 1 (up to eps); the same as torch's own
    batch_norm over the weight viewed as (1, out, fan_in), the form timm computes it in."""
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64) * 3 + 2
    w_hat = standardize_weight(w)
    flat = w_hat.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(5, dtype=torch.float64), atol=1e-12,
                               rtol=0)
    torch.testing.assert_close(flat.var(1, unbiased=False), torch.ones(5, dtype=torch.float64),
                               atol=1e-9, rtol=0)
    ref = nn.functional.batch_norm(w.reshape(1, 5, -1), None, None, training=True, momentum=0.0,
                                   eps=1e-10).reshape_as(w)
    torch.testing.assert_close(w_hat, ref, rtol=1e-10, atol=1e-12)


def test_std_conv_gradcheck():
    torch.manual_seed(0)
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: standardize_weight(w, 1e-5), (w,))
    assert torch.autograd.gradgradcheck(lambda w: standardize_weight(w, 1e-5), (w,))


def test_weight_norm_gradcheck():
    torch.manual_seed(0)
    m = weight_norm(nn.Linear(3, 2).double())
    g, v = m.parametrizations.weight.original0, m.parametrizations.weight.original1
    f = m.parametrizations.weight[0]
    assert torch.autograd.gradcheck(f, (g.detach().requires_grad_(), v.detach().requires_grad_()))

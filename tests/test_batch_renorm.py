"""normcode.BatchRenorm1d/2d/3d: BatchNorm when r_max = 1 and d_max = 0, Ioffe (2017)'s
Algorithm 1 otherwise, BatchNorm's buffers and errors throughout."""
import copy
import re

import pytest
import torch
from torch import nn

from normcode.batch_renorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    batch_renorm,
    relaxation_schedule,
)
from normcode.testing import assert_matches_torch, randomize_

CASES = [  # (ours, torch's twin, input shape)
    (BatchRenorm1d, nn.BatchNorm1d, (6, 3)),
    (BatchRenorm1d, nn.BatchNorm1d, (4, 3, 5)),
    (BatchRenorm2d, nn.BatchNorm2d, (4, 3, 3, 2)),
    (BatchRenorm3d, nn.BatchNorm3d, (2, 3, 2, 3, 2)),
]
OPTIONS = [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False},
           {"momentum": 0.3, "eps": 1e-3}]


@pytest.mark.parametrize("ours, theirs, shape", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("train", [True, False])
def test_equals_batchnorm_without_correction(ours, theirs, shape, options, train, record):
    """r_max = 1, d_max = 0: outputs, gradients and buffers are torch.nn.BatchNorm's."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    diffs = assert_matches_torch(ours(3, r_max=1.0, d_max=0.0, **options), theirs(3, **options),
                                 x, train=train, steps=4)
    record(torch.float64, diffs)


@pytest.mark.parametrize("ours, theirs, shape", CASES[:3], ids=lambda c: getattr(c, "__name__", str(c)))
def test_batchnorm_state_dict_loads_strictly_both_ways(ours, theirs, shape):
    bn = randomize_(theirs(3))
    brn = ours(3)
    brn.load_state_dict(bn.state_dict(), strict=True)
    theirs(3).load_state_dict(brn.state_dict(), strict=True)
    assert list(brn.state_dict()) == list(bn.state_dict())


def algorithm_1(x, mu, var, gamma, beta, eps, momentum, r_max, d_max):
    """Ioffe (2017), Algorithm 1, stated directly (float64), with BatchNorm's variance buffer:
    sigma = sqrt(running_var + eps). Returns y and the updated (mu, var)."""
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    n = x.numel() // x.shape[1]
    mu_B = x.mean(dims, keepdim=True)
    var_B = ((x - mu_B) ** 2).mean(dims, keepdim=True)
    sigma_B = torch.sqrt(var_B + eps)
    sigma = torch.sqrt(var + eps).reshape(shape)
    r_raw, d_raw = (sigma_B / sigma).detach(), ((mu_B - mu.reshape(shape)) / sigma).detach()
    r, d = r_raw.clamp(1 / r_max, r_max), d_raw.clamp(-d_max, d_max)
    algorithm_1.clipped = bool((r != r_raw).any() or (d != d_raw).any())
    x_hat = (x - mu_B) / sigma_B * r + d
    y = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    new_mu = (1 - momentum) * mu + momentum * mu_B.detach().flatten()
    new_var = (1 - momentum) * var + momentum * var_B.detach().flatten() * n / (n - 1)
    return y, new_mu, new_var


@pytest.mark.parametrize("r_max, d_max", [(1.5, 0.5), (3.0, 5.0), (1.1, 0.0), (1.0, 2.0)])
def test_equals_algorithm_1(r_max, d_max):
    """Several steps with the clipping active (running estimates far from the batches'):
    outputs, all gradients and buffers equal the direct statement of Algorithm 1."""
    g = torch.Generator().manual_seed(0)
    layer = randomize_(BatchRenorm2d(4, r_max=r_max, d_max=d_max), g).double()
    mu, var = layer.running_mean.clone(), layer.running_var.clone()
    gamma = layer.weight.detach().clone().requires_grad_(True)
    beta = layer.bias.detach().clone().requires_grad_(True)
    clipped = set()
    for step in range(4):
        x = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64) * (1 + step) + step
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y, mu, var = algorithm_1(x2, mu, var, gamma, beta, layer.eps, layer.momentum, r_max,
                                 d_max)
        ours = layer(x1)
        dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
        ours.backward(dy)
        y.backward(dy)
        clipped.add(algorithm_1.clipped)
        torch.testing.assert_close(ours, y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.weight.grad, gamma.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, beta.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_mean, mu, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-12, atol=1e-14)
        for p in (gamma, beta):
            p.grad = None
        layer.zero_grad()
    assert True in clipped                   # the clipping was active at some step


def test_input_gradient_is_r_times_batchnorm_s():
    """No gradient through r and d: the input gradient is r times BatchNorm's, per channel."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(8, 3, generator=g, dtype=torch.float64)
    brn = randomize_(BatchRenorm1d(3, r_max=10.0, d_max=10.0), g).double()
    bn = nn.BatchNorm1d(3).double()
    bn.load_state_dict(brn.state_dict())
    r = ((x.var(0, unbiased=False) + brn.eps) / (brn.running_var + brn.eps)).sqrt()
    assert ((r > 1 / 10) & (r < 10)).all()           # unclipped
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    brn(xs[0]).backward(dy)
    bn(xs[1]).backward(dy)
    torch.testing.assert_close(xs[0].grad, r * xs[1].grad, rtol=1e-12, atol=1e-14)


def test_unclipped_training_output_is_the_eval_output():
    """Where r and d are inside their limits, training computes (x - mu) / sigma: evaluation."""
    g = torch.Generator().manual_seed(4)
    layer = randomize_(BatchRenorm2d(3, r_max=100.0, d_max=100.0, momentum=0.0), g).double()
    x = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    y_eval = layer.eval()(x)
    y_train = layer.train()(x)
    torch.testing.assert_close(y_train, y_eval, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("r_max, d_max", [(1.0, 0.0), (1.5, 0.2)])
def test_gradcheck(r_max, d_max):
    """gradcheck and gradgradcheck in float64, with the running estimates far from the batch's,
    so that r and d sit on their limits: constants, as the gradient treats them."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_(True)

    def f(x, w, b):
        rm = torch.full((3,), 10.0, dtype=torch.float64)       # d = -d_max
        rv = torch.full((3,), 1e-4, dtype=torch.float64)       # r = r_max
        return batch_renorm(x, rm, rv, w, b, True, 0.1, 1e-5, r_max, d_max)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_limits_are_plain_attributes_a_schedule_sets():
    layer = BatchRenorm1d(3)
    assert (layer.r_max, layer.d_max) == (3.0, 5.0)
    assert "r_max=3.0, d_max=5.0" in repr(layer)
    assert relaxation_schedule(0, warmup=10, r_steps=20, d_steps=10) == (1.0, 0.0)
    assert relaxation_schedule(20, warmup=10, r_steps=20, d_steps=10) == (2.0, 5.0)
    assert relaxation_schedule(99, warmup=10, r_steps=20, d_steps=10) == (3.0, 5.0)


BAD = [  # (what, make, input, exception, words)
    ("r_max < 1", lambda: BatchRenorm1d(3, r_max=0.5), None, ValueError, "r_max must be >= 1"),
    ("d_max < 0", lambda: BatchRenorm1d(3, d_max=-1.0), None, ValueError, "d_max must be >= 0"),
    ("wrong rank", lambda: BatchRenorm2d(3), torch.randn(4, 3), ValueError,
     "expected 4D input (got 2D input)"),
    ("channels", lambda: BatchRenorm1d(5), torch.randn(4, 3), RuntimeError, "should contain"),
    ("one value", lambda: BatchRenorm1d(3), torch.randn(1, 3), ValueError,
     "Expected more than 1 value per channel when training"),
    ("integer input", lambda: BatchRenorm1d(3), torch.ones(4, 3, dtype=torch.long),
     NotImplementedError, "not implemented"),
]


@pytest.mark.parametrize("what, make, x, error, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input(what, make, x, error, words):
    with pytest.raises(error, match=re.escape(words)):
        layer = make()
        layer(x)


@pytest.mark.parametrize("what, make, x, error, words", BAD[2:], ids=[b[0] for b in BAD[2:]])
def test_bad_input_fails_as_torch_batchnorm_does(what, make, x, error, words):
    ours = make()
    theirs = {BatchRenorm1d: nn.BatchNorm1d, BatchRenorm2d: nn.BatchNorm2d}[type(ours)](
        ours.num_features)
    with pytest.raises(Exception) as torch_error:
        theirs(x)
    with pytest.raises(type(torch_error.value)):
        ours(x)


def test_a_schedule_cannot_set_an_invalid_limit():
    layer = BatchRenorm1d(3)
    layer.r_max = 0.9
    with pytest.raises(ValueError, match="r_max"):
        layer(torch.randn(4, 3))


def test_dtypes_and_layout_as_batchnorm():
    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    brn, bn = BatchRenorm2d(3, r_max=1.0, d_max=0.0), nn.BatchNorm2d(3)
    y, y_ref = brn(x), bn(x)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(brn.running_var, bn.running_var)
    assert copy.deepcopy(brn).eval()(x).shape == x.shape


@pytest.mark.parametrize("options", [{}, {"momentum": None}, {"affine": False}])
def test_is_normcode_batchnorm_bit_for_bit_without_correction(options):
    """BatchNorm's rules are reused, not copied: with r_max = 1, d_max = 0 the output, the
    gradient and the buffers are normcode.BatchNorm2d's exactly, in float32 and float64."""
    from normcode import BatchNorm2d
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(6)
        bn = randomize_(BatchNorm2d(3, **options), g).to(dtype)
        brn = BatchRenorm2d(3, r_max=1.0, d_max=0.0, **options).to(dtype)
        brn.load_state_dict(bn.state_dict())
        for _ in range(3):
            x = torch.randn(4, 3, 5, 5, generator=g, dtype=dtype) * 3 + 2
            xs = [x.clone().requires_grad_(True) for _ in range(2)]
            ys = [m(xi) for m, xi in zip((bn, brn), xs)]
            for y in ys:
                y.sum().backward()
            assert torch.equal(ys[0], ys[1]) and torch.equal(xs[0].grad, xs[1].grad)
            for a, b in zip(bn.buffers(), brn.buffers()):
                assert torch.equal(a, b)

"""SwitchNorm1d/2d: torch.nn has no SN, so it is held to torch.nn through its reductions (one-hot
importance weights give IN, LN and BN exactly), to the authors' formula, and to gradcheck."""
import copy
import re

import pytest
import torch
from torch import nn

import normcode
from normcode.switchable import switch_norm

F64 = torch.float64
SATURATED = 30.0          # softmax([30, 0, 0]) = [1 - 1.9e-13, 9.4e-14, 9.4e-14]: one-hot to ~1e-13
TOL = {"rtol": 1e-9, "atol": 1e-10}     # the 9.4e-14 weight of the other two statistics, with margin


def _x(shape, seed=0, mean=1.0, std=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * std + mean


def _switch(cls, C, hot=None, seed=1, **kwargs):
    """An SN layer in float64 with random gamma/beta and, if ``hot`` is given, one-hot logits."""
    g = torch.Generator().manual_seed(seed)
    m = cls(C, **kwargs).to(F64)
    with torch.no_grad():
        m.weight.copy_(torch.rand(C, generator=g, dtype=F64) + 0.5)
        m.bias.copy_(torch.randn(C, generator=g, dtype=F64))
        if hot is not None:
            logits = torch.zeros(len(m.parts), dtype=F64)
            logits[m.parts.index(hot)] = SATURATED
            m.mean_weight.copy_(logits)
            m.var_weight.copy_(logits)
    return m


def _twin(theirs, ours):
    theirs = theirs.to(F64)
    with torch.no_grad():
        theirs.weight.copy_(ours.weight)
        theirs.bias.copy_(ours.bias)
    return theirs


def _compare(ours, theirs, x, train):
    """Output, input gradient and weight/bias gradients of two modules on one step."""
    ours.train(train)
    theirs.train(train)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, **TOL)
    dy = _x(x.shape, seed=7)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **TOL)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **TOL)
    ours.zero_grad()
    theirs.zero_grad()


# ---------------------------------------------------------------------------------------------
# One-hot importance weights reduce SN to a torch.nn layer, in training.
# ---------------------------------------------------------------------------------------------
REDUCTIONS = [  # (SN class, hot statistic, torch twin, input shape, kwargs)
    (normcode.SwitchNorm2d, "instance", lambda C: nn.InstanceNorm2d(C, affine=True), (4, 3, 5, 5), {}),
    (normcode.SwitchNorm2d, "layer", lambda C: nn.GroupNorm(1, C), (4, 3, 5, 5), {}),
    (normcode.SwitchNorm2d, "batch", lambda C: nn.BatchNorm2d(C), (4, 3, 5, 5), {}),
    (normcode.SwitchNorm2d, "instance", lambda C: nn.InstanceNorm2d(C, affine=True), (2, 3, 4, 6),
     {"using_bn": False}),
    (normcode.SwitchNorm2d, "layer", lambda C: nn.GroupNorm(1, C), (1, 3, 4, 6), {"using_bn": False}),
    (normcode.SwitchNorm1d, "layer", lambda C: nn.LayerNorm(C), (6, 5), {}),
    (normcode.SwitchNorm1d, "batch", lambda C: nn.BatchNorm1d(C), (6, 5), {}),
]


@pytest.mark.parametrize("cls, hot, make, shape, kwargs", REDUCTIONS,
                         ids=[f"{c.__name__}-{h}-{kw}" for c, h, _, _, kw in REDUCTIONS])
def test_one_hot_logits_give_the_torch_layer_in_training(cls, hot, make, shape, kwargs):
    ours = _switch(cls, shape[1], hot, **kwargs)
    theirs = _twin(make(shape[1]), ours)
    for step in range(3):
        _compare(ours, theirs, _x(shape, seed=step), train=True)
    if hot == "batch":              # the running estimates follow BatchNorm's convention exactly
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_eval_bn_term_uses_running_statistics_as_batchnorm(momentum):
    ours = _switch(normcode.SwitchNorm2d, 3, "batch", momentum=momentum)
    theirs = _twin(nn.BatchNorm2d(3, momentum=momentum), ours)
    for step in range(4):                                    # a few training steps first
        _compare(ours, theirs, _x((5, 3, 4, 4), seed=step, mean=step), train=True)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=1e-12, atol=1e-14)
    _compare(ours, theirs, _x((2, 3, 4, 4), seed=9), train=False)
    _compare(ours, theirs, _x((1, 3, 4, 4), seed=10), train=False)     # one sample is fine in eval


@pytest.mark.parametrize("hot, make", [("instance", lambda C: nn.InstanceNorm2d(C, affine=True)),
                                       ("layer", lambda C: nn.GroupNorm(1, C))])
def test_eval_in_and_ln_terms_still_come_from_the_sample(hot, make):
    ours = _switch(normcode.SwitchNorm2d, 3, hot)
    theirs = _twin(make(3), ours)
    ours.train()
    ours(_x((4, 3, 4, 4), mean=5.0))                         # moves the running BN estimates
    _compare(ours, theirs, _x((2, 3, 4, 4), seed=3), train=False)


def test_mixed_weights_mix_the_three_statistics():
    m = _switch(normcode.SwitchNorm2d, 3)
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.3, -1.0, 0.8]))
        m.var_weight.copy_(torch.tensor([-0.5, 0.2, 1.1]))
    x = _x((4, 3, 3, 5))
    w, v = torch.softmax(m.mean_weight, 0), torch.softmax(m.var_weight, 0)
    stats = [((2, 3),), ((1, 2, 3),), ((0, 2, 3),)]          # IN, LN, BN axes, spelled out
    mean = sum(w[k] * x.mean(d, keepdim=True) for k, (d,) in enumerate(stats))
    var = sum(v[k] * x.var(d, keepdim=True, correction=0) for k, (d,) in enumerate(stats))
    expected = (x - mean) / torch.sqrt(var + m.eps) * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)
    imp = m.importance()
    assert list(imp["mean"]) == ["instance", "layer", "batch"]
    assert abs(sum(imp["var"].values()) - 1) < 1e-12


# ---------------------------------------------------------------------------------------------
# The authors' code (unbiased IN variance) and the stability of the direct statistics.
# ---------------------------------------------------------------------------------------------
def _authors_forward(x, mean_weight, var_weight, weight, bias, eps=1e-5):
    """A transcription of the authors' SwitchNorm2d.forward in training (using_bn=True)."""
    N, C, H, W = x.size()
    x = x.view(N, C, -1)
    mean_in = x.mean(-1, keepdim=True)
    var_in = x.var(-1, keepdim=True)                           # unbiased: divides by L - 1
    mean_ln = mean_in.mean(1, keepdim=True)
    temp = var_in + mean_in ** 2
    var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
    mean_bn = mean_in.mean(0, keepdim=True)
    var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
    mw, vw = torch.softmax(mean_weight, 0), torch.softmax(var_weight, 0)
    mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
    var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
    x = (x - mean) / (var + eps).sqrt()
    return x.view(N, C, H, W) * weight.view(1, C, 1, 1) + bias.view(1, C, 1, 1)


@pytest.mark.parametrize("shape", [(4, 3, 4, 4), (2, 5, 2, 3), (1, 2, 7, 7)])
def test_unbiased_instance_var_reproduces_the_authors_code(shape):
    m = _switch(normcode.SwitchNorm2d, shape[1], unbiased_instance_var=True)
    with torch.no_grad():
        m.mean_weight.copy_(torch.tensor([0.2, -0.4, 0.9]))
        m.var_weight.copy_(torch.tensor([1.0, 0.1, -0.3]))
    x = _x(shape)
    expected = _authors_forward(x, m.mean_weight, m.var_weight, m.weight, m.bias)
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(_switch(normcode.SwitchNorm2d, shape[1])(x), expected, atol=1e-3)


def test_unbiased_running_var_is_still_batchnorms():
    ours = _switch(normcode.SwitchNorm2d, 3, unbiased_instance_var=True)
    theirs = nn.BatchNorm2d(3).to(F64)
    for step in range(3):
        x = _x((4, 3, 3, 3), seed=step)
        ours(x)
        theirs(x)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-12, atol=1e-14)


def test_statistics_are_shift_invariant_at_large_means():
    """SN in training is invariant to adding a constant; the E[var + mu^2] - mu^2 form is not."""
    m = _switch(normcode.SwitchNorm2d, 3)
    x = _x((4, 3, 4, 4), std=1.0, mean=0.0)
    y = m(x)
    torch.testing.assert_close(m(x + 1e7), y, rtol=0, atol=1e-6)
    weights = (m.mean_weight, m.var_weight, m.weight, m.bias)
    with torch.no_grad():   # the derived form loses ~1e14 * 1e-16 of the variance to cancellation
        unstable = (_authors_forward(x + 1e7, *weights) - _authors_forward(x, *weights)).abs().max()
    assert unstable > 1e-4


@pytest.mark.parametrize("dtype, rtol", [(F64, 1e-12), (torch.float32, 1e-6)])
def test_ln_and_bn_moments_derived_from_the_instance_ones_do_not_cancel(dtype, rtol):
    """The LN and BN moments come from the IN ones by the law of total variance, every mean
    taken relative to one element of its set: at a mean of 1e6 the variances are as accurate
    as the dtype allows (the paper's E[var + mu^2] - mu^2 would lose them entirely in float32),
    in float32 too (the same-width formulation, normcode's on CUDA)."""
    x = _x((4, 3, 5, 5), std=1.0, mean=1e6).to(dtype)
    moments = normcode.switchable.switchable_moments(x, ("instance", "layer", "batch"))
    for part, dims in (("instance", (2, 3)), ("layer", (1, 2, 3)), ("batch", (0, 2, 3))):
        mean, var = (t.double() for t in moments[part])
        exact_mean = x.double().mean(dims, keepdim=True)
        # two passes in float64: torch.var in float64 is off by about 1e-10 (relative) here
        exact_var = ((x.double() - exact_mean) ** 2).mean(dims, keepdim=True)
        torch.testing.assert_close(var, exact_var, rtol=rtol, atol=0)
        torch.testing.assert_close(mean, exact_mean, rtol=rtol / 10, atol=0)


def test_float32_input_is_computed_in_float64():
    m32 = normcode.SwitchNorm2d(3)
    x = _x((4, 3, 4, 4)).float()
    y = m32(x)
    assert y.dtype == torch.float32
    y64 = copy.deepcopy(m32).to(F64)(x.double())
    torch.testing.assert_close(y, y64.float(), rtol=0, atol=0)     # correctly rounded once


# ---------------------------------------------------------------------------------------------
# using_moving_average=False: a plain average over the training batches.
# ---------------------------------------------------------------------------------------------
def test_plain_average_uses_the_law_of_total_variance():
    m = _switch(normcode.SwitchNorm2d, 3, using_moving_average=False)
    batches = [_x((4, 3, 3, 3), seed=s, mean=s - 2.0, std=1.0 + s) for s in range(5)]
    for x in batches:
        m(x)
    means = torch.stack([x.mean((0, 2, 3)) for x in batches])                    # (K, C)
    variances = torch.stack([x.var((0, 2, 3)) for x in batches])                 # unbiased, (K, C)
    torch.testing.assert_close(m.running_mean, means.mean(0), rtol=1e-12, atol=1e-12)
    expected = variances.mean(0) + means.var(0, correction=0)
    torch.testing.assert_close(m.running_var, expected, rtol=1e-12, atol=1e-12)
    # ... which estimates the variance of all the batches pooled (equal-sized batches: within 1/n).
    pooled = torch.cat(batches).var((0, 2, 3))
    torch.testing.assert_close(m.running_var, pooled, rtol=2 / 36, atol=0)
    assert int(m.num_batches_tracked) == 5
    m.reset_running_stats()
    m(batches[0])
    torch.testing.assert_close(m.running_var, variances[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# gradcheck: the input and every parameter, logits included.
# ---------------------------------------------------------------------------------------------
GRADCHECK = [  # (parts, shape, training, unbiased)
    (("instance", "layer", "batch"), (3, 2, 2, 3), True, False),
    (("instance", "layer", "batch"), (3, 2, 2, 3), False, False),
    (("instance", "layer", "batch"), (2, 2, 3, 2), True, True),
    (("instance", "layer"), (2, 3, 2, 2), True, False),
    (("layer", "batch"), (4, 3), True, False),
    (("layer", "batch"), (4, 3), False, False),
]


@pytest.mark.parametrize("parts, shape, training, unbiased", GRADCHECK)
def test_gradcheck_input_parameters_and_logits(parts, shape, training, unbiased):
    g = torch.Generator().manual_seed(0)
    C, K = shape[1], len(parts)
    x = torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
    weight = (torch.rand(C, generator=g, dtype=F64) + 0.5).requires_grad_()
    bias = torch.randn(C, generator=g, dtype=F64, requires_grad=True)
    mean_w = torch.randn(K, generator=g, dtype=F64, requires_grad=True)
    var_w = torch.randn(K, generator=g, dtype=F64, requires_grad=True)
    running = ((torch.randn(C, generator=g, dtype=F64), torch.rand(C, generator=g, dtype=F64) + 0.5)
               if "batch" in parts else (None, None))

    def fn(x, weight, bias, mean_w, var_w):
        rm, rv = (None, None) if running[0] is None else (running[0].clone(), running[1].clone())
        return switch_norm(x, mean_w, var_w, rm, rv, weight, bias, training, parts=parts,
                           unbiased_instance_var=unbiased)

    inputs = (x, weight, bias, mean_w, var_w)
    assert torch.autograd.gradcheck(fn, inputs)
    grads = torch.autograd.grad(fn(*inputs).pow(2).sum(), (mean_w, var_w))
    assert all(gr.abs().max() > 1e-6 for gr in grads)          # the logits really are trained


# ---------------------------------------------------------------------------------------------
# Parameters, buffers, state_dict, repr.
# ---------------------------------------------------------------------------------------------
MODULES = [  # (constructor, parameter shapes, buffer names, repr)
    (lambda: normcode.SwitchNorm2d(4),
     {"weight": (4,), "bias": (4,), "mean_weight": (3,), "var_weight": (3,)},
     ["running_mean", "running_var", "num_batches_tracked"],
     "SwitchNorm2d(4, eps=1e-05, momentum=0.1, using_moving_average=True, using_bn=True, "
     "last_gamma=False, unbiased_instance_var=False)"),
    (lambda: normcode.SwitchNorm2d(4, using_bn=False, last_gamma=True),
     {"weight": (4,), "bias": (4,), "mean_weight": (2,), "var_weight": (2,)}, [],
     "SwitchNorm2d(4, eps=1e-05, momentum=0.1, using_moving_average=True, using_bn=False, "
     "last_gamma=True, unbiased_instance_var=False)"),
    (lambda: normcode.SwitchNorm1d(5, momentum=None),
     {"weight": (5,), "bias": (5,), "mean_weight": (2,), "var_weight": (2,)},
     ["running_mean", "running_var", "num_batches_tracked"],
     "SwitchNorm1d(5, eps=1e-05, momentum=None, using_moving_average=True, using_bn=True, "
     "last_gamma=False)"),
]


@pytest.mark.parametrize("make, params, buffers, text", MODULES)
def test_parameters_buffers_state_dict_and_repr(make, params, buffers, text):
    m = make()
    assert repr(m) == text
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == params
    assert list(m.state_dict()) == list(params) + buffers
    assert torch.all(m.weight == (0.0 if m.last_gamma else 1.0)) and torch.all(m.bias == 0)
    assert torch.all(m.mean_weight == 1) and torch.all(m.var_weight == 1)     # softmax: 1/K each
    if buffers:
        assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)
        assert m.num_batches_tracked.dtype == torch.long and int(m.num_batches_tracked) == 0
    other = make()
    normcode.testing.randomize_(other)
    m.load_state_dict(other.state_dict())
    for name, t in other.state_dict().items():
        assert torch.equal(m.state_dict()[name], t)


# ---------------------------------------------------------------------------------------------
# Degenerate sizes and bad input: clear errors, never NaN.
# ---------------------------------------------------------------------------------------------
ERRORS = [  # (module, input shape, training, exception, message pattern)
    (lambda: normcode.SwitchNorm2d(3), (2, 3, 4), True, ValueError, r"expected 4D input \(got 3D input\)"),
    (lambda: normcode.SwitchNorm1d(3), (2, 3, 4), True, ValueError, r"expected 2D input \(got 3D input\)"),
    (lambda: normcode.SwitchNorm2d(3), (2, 5, 4, 4), True, RuntimeError, r"should contain 5 elements"),
    (lambda: normcode.SwitchNorm2d(3), (2, 5, 4, 4), False, RuntimeError, r"should contain 5 elements"),
    (lambda: normcode.SwitchNorm2d(3), (4, 3, 1, 1), True, ValueError, r"more than 1 spatial element"),
    (lambda: normcode.SwitchNorm2d(3), (4, 3, 1, 1), False, ValueError, r"more than 1 spatial element"),
    (lambda: normcode.SwitchNorm2d(3, unbiased_instance_var=True), (4, 3, 1, 1), True, ValueError,
     r"more than 1 spatial element"),
    (lambda: normcode.SwitchNorm2d(3, using_bn=False), (4, 3, 1, 1), True, ValueError,
     r"SwitchNorm1d"),
    (lambda: normcode.SwitchNorm1d(3), (1, 3), True, ValueError, r"more than 1 value per channel"),
    (lambda: normcode.SwitchNorm2d(3, eps=0.0), (2, 3, 2, 2), True, ValueError, r"eps must be positive"),
    (lambda: normcode.SwitchNorm2d(3, eps=-1e-5), (2, 3, 2, 2), False, ValueError, r"non-negative"),
]


def test_eps_zero_on_constant_input_raises_instead_of_nan():
    m = normcode.SwitchNorm2d(3, eps=0.0, using_bn=False)
    assert torch.isfinite(m(_x((2, 3, 2, 2)).float())).all()  # eps = 0 is fine on varying input
    with pytest.raises(ValueError, match="zero variance"):
        m(torch.ones(2, 3, 2, 2))


@pytest.mark.parametrize("make, shape, training, error, pattern", ERRORS)
def test_bad_input_raises_a_clear_error(make, shape, training, error, pattern):
    m = make().train(training)
    with pytest.raises(error, match=pattern):
        m(torch.randn(shape))


def test_integer_input_and_using_bn_false_1d_are_refused():
    with pytest.raises(NotImplementedError, match="floating-point"):
        normcode.SwitchNorm2d(3)(torch.ones(2, 3, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="nothing to switch"):
        normcode.SwitchNorm1d(3, using_bn=False)


FINITE = [  # (module, input shape, training): small but legal sizes give finite output
    (lambda: normcode.SwitchNorm2d(3), (1, 3, 4, 4), True),            # one sample: BN stats = IN stats
    (lambda: normcode.SwitchNorm2d(3), (1, 3, 4, 4), False),
    (lambda: normcode.SwitchNorm2d(3, using_bn=False), (1, 3, 2, 2), True),
    (lambda: normcode.SwitchNorm2d(3, unbiased_instance_var=True), (1, 3, 1, 2), True),
    (lambda: normcode.SwitchNorm1d(3), (1, 3), False),                 # eval: running stats
    (lambda: normcode.SwitchNorm1d(1), (4, 1), True),                  # one channel: LN var = 0
    (lambda: normcode.SwitchNorm2d(3), (2, 3, 1, 2), True),
]


@pytest.mark.parametrize("make, shape, training", FINITE)
def test_small_legal_sizes_are_finite(make, shape, training):
    m = make().train(training)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = m(x)
    y.pow(2).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for p in m.parameters():
        assert torch.isfinite(p.grad).all()
    for b in m.buffers():
        assert torch.isfinite(b.double()).all()


def test_one_sample_batch_statistics_are_its_instance_statistics():
    x = _x((1, 3, 4, 4))
    bn, inst = _switch(normcode.SwitchNorm2d, 3, "batch"), _switch(normcode.SwitchNorm2d, 3, "instance")
    torch.testing.assert_close(bn(x), inst(x), **TOL)


def test_empty_batch_leaves_running_statistics():
    m = normcode.SwitchNorm2d(3)
    y = m(torch.randn(0, 3, 4, 4))
    assert y.shape == (0, 3, 4, 4)
    assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)


def test_exported():
    assert {"SwitchNorm1d", "SwitchNorm2d"} <= set(normcode.__all__)
    assert re.search("mix", normcode.SwitchNorm2d.__doc__)


@pytest.mark.parametrize("hot", ["instance", "layer"])
def test_unbiased_instance_var_changes_eval_too(hot):
    """In eval the IN and LN terms still come from the sample, so unbiased_instance_var changes
    them there as in training: the IN variance divides by L - 1, and LN's carries the excess."""
    x = _x((3, 4, 5, 5))
    m = _switch(normcode.SwitchNorm2d, 4, hot, unbiased_instance_var=True).eval()
    mean_in, var_in = x.mean((2, 3), keepdim=True), x.var((2, 3), keepdim=True)       # L - 1
    if hot == "instance":
        mean, var = mean_in, var_in
    else:   # the authors' LN variance: mean over C of (var_in + mu_in^2), minus mu_ln^2
        mean = x.mean((1, 2, 3), keepdim=True)
        var = (var_in + mean_in ** 2).mean(1, keepdim=True) - mean ** 2
    expected = (x - mean) / torch.sqrt(var + m.eps) * m.weight.reshape(1, 4, 1, 1) \
        + m.bias.reshape(1, 4, 1, 1)
    torch.testing.assert_close(m(x), expected, **TOL)
    plain = _switch(normcode.SwitchNorm2d, 4, hot).eval()
    assert (m(x) - plain(x)).abs().max() > 1e-3         # the option matters in eval

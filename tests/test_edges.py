"""torch 2.13's behaviour at the edges, differentially: each case runs on torch and on normcode.

Every case is named after the edge it pins. Where torch computes a finite answer, normcode
computes the same one; where torch returns NaN or inf (or writes them into the running
estimates), normcode raises a clear error instead, and the test checks both halves: that torch
still gives NaN/inf there, and what normcode's error says.
"""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import normcode
from normcode import functional as NF
from normcode.testing import randomize_

TORCH = SimpleNamespace(nn=torch.nn, F=torch.nn.functional)
OURS = SimpleNamespace(nn=normcode, F=NF)
F64 = torch.float64


def x(*shape, dtype=F64, seed=0, std=2.0, mean=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * std + mean).to(dtype)


def outcome(call, L):
    try:
        return None, call(L)
    except Exception as e:                    # noqa: BLE001 - the class is what is compared
        return e, None


# --------------------------------------------------------------------------------------------
# Negative eps: torch computes LN, GN, RMS and IN with it (its own tests use eps = -0.5)
# --------------------------------------------------------------------------------------------
NEGATIVE_EPS = {   # case: (call(L, input, eps), the input's shape)
    "layer_norm": (lambda L, t, e: L.F.layer_norm(t, (5, 4), eps=e), (3, 5, 4)),
    "LayerNorm module": (lambda L, t, e: L.nn.LayerNorm(16, eps=e).double()(t), (3, 5, 16)),
    "group_norm": (lambda L, t, e: L.F.group_norm(t, 2, eps=e), (3, 4, 5)),
    "rms_norm": (lambda L, t, e: L.F.rms_norm(t, (4,), eps=e), (3, 5, 4)),
    "instance_norm": (lambda L, t, e: L.F.instance_norm(t, eps=e), (3, 4, 6)),
    "InstanceNorm2d affine": (lambda L, t, e: L.nn.InstanceNorm2d(4, eps=e, affine=True).double()(t),
                              (2, 4, 3, 3)),
}


@pytest.mark.parametrize("case", NEGATIVE_EPS)
def test_negative_eps_computes_as_torch_where_finite(case):
    call, shape = NEGATIVE_EPS[case]
    t = x(*shape)                             # std 2: every set's variance (or mean square) > 0.5
    y_theirs, y_ours = call(TORCH, t, -0.5), call(OURS, t, -0.5)
    assert torch.isfinite(y_theirs).all()
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", NEGATIVE_EPS)
def test_negative_eps_raises_where_torch_gives_nan_or_inf(case):
    call, shape = NEGATIVE_EPS[case]
    t = x(*shape)
    t[0] = t[0] * 1e-3                       # the sets under index 0: a tiny variance and mean square
    y_theirs = call(TORCH, t, -0.5)
    assert not torch.isfinite(y_theirs).all(), "torch is finite here now: compute instead"
    with pytest.raises(ValueError, match=r"eps=-0\.5 and \d+ of \d+ statistics sets") as raised:
        call(OURS, t, -0.5)
    # The count in the message is the number of sets torch leaves non-finite.
    bad, total = (int(w) for w in str(raised.value).split(" and ")[1].split(" statistics")[0].split(" of "))
    assert 0 < bad < total


def test_negative_eps_where_var_equals_minus_eps_raises_for_inf():
    t = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 2.0, 0.0, 2.0]], dtype=F64)   # variances 0.25, 1
    assert torch.isinf(TORCH.F.layer_norm(t, (4,), eps=-0.25)[0]).all()
    with pytest.raises(ValueError, match="1 of 2 statistics sets"):
        NF.layer_norm(t, (4,), eps=-0.25)


def test_batch_norm_keeps_torchs_eps_rules():
    """torch's batch_norm refuses eps <= 0 in training and eps < 0 in eval: unchanged."""
    for L in (TORCH, OURS):
        with pytest.raises(ValueError, match="positive during training"):
            L.F.batch_norm(x(4, 3), None, None, training=True, eps=-0.5)
        with pytest.raises(ValueError, match="non-negative"):
            L.F.batch_norm(x(4, 3), torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64), eps=-0.5)


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda L: L.F.rms_norm(x(3), (2, 3)),
    lambda L: L.nn.RMSNorm((2, 3)).double()(x(3)),
    lambda L: L.F.rms_norm(torch.tensor(1.0, dtype=F64), (1,)),
], ids=["F.rms_norm 1D input, 2D shape", "RMSNorm 1D input, 2D shape", "F.rms_norm 0D input"])
def test_rms_norm_on_fewer_dims_than_normalized_shape_raises_value_error(call):
    (e_theirs, _), (e_ours, _) = outcome(call, TORCH), outcome(call, OURS)
    assert type(e_theirs) is ValueError and type(e_ours) is ValueError, (e_theirs, e_ours)
    assert "at least" in str(e_ours) and "dimensions" in str(e_ours)


BN_1D_EMPTY = {
    "training, no running estimates": lambda L, t: L.F.batch_norm(t, None, None, training=True),
    "eval, no running estimates": lambda L, t: L.F.batch_norm(t, None, None),
    "training, running estimates of 3": lambda L, t: L.F.batch_norm(
        t, torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64), training=True),
    "eval, running estimates of 3": lambda L, t: L.F.batch_norm(
        t, torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)),
    "training, weight of 3": lambda L, t: L.F.batch_norm(t, None, None, torch.ones(3, dtype=F64),
                                                         training=True),
}


@pytest.mark.parametrize("case", BN_1D_EMPTY)
def test_batch_norm_on_a_1d_empty_input_returns_it(case):
    t = torch.zeros(0, dtype=F64, requires_grad=True)
    y_theirs, y_ours = BN_1D_EMPTY[case](TORCH, t), BN_1D_EMPTY[case](OURS, t)
    assert y_ours.shape == y_theirs.shape == (0,)
    assert y_ours.dtype == y_theirs.dtype and y_ours.requires_grad == y_theirs.requires_grad


def test_batch_norm_on_a_1d_nonempty_input_still_raises_as_torch():
    for call in (lambda L: L.F.batch_norm(x(3), None, None, training=True),
                 lambda L: L.F.batch_norm(x(3), torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))):
        (e_theirs, _), (e_ours, _) = outcome(call, TORCH), outcome(call, OURS)
        assert e_theirs is not None and type(e_ours) is type(e_theirs), (e_theirs, e_ours)


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [None, 1], ids=["no version (a plain old checkpoint)", "version 1"])
def test_state_dict_without_counter_keeps_the_modules_own_count(version):
    """torch keeps the module's num_batches_tracked when the checkpoint has none."""
    source = randomize_(nn.BatchNorm1d(3))
    state = source.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = version
    counts = []
    for module in (nn.BatchNorm1d(3), normcode.BatchNorm1d(3)):
        module.num_batches_tracked.fill_(5)
        module.load_state_dict(state)
        assert torch.equal(module.running_mean, source.running_mean)
        counts.append(int(module.num_batches_tracked))
    assert counts == [5, 5]


def test_tracked_instance_norm_on_an_empty_batch_raises_where_torch_writes_nan():
    theirs = nn.InstanceNorm1d(3, track_running_stats=True)
    ours = normcode.InstanceNorm1d(3, track_running_stats=True)
    ours.running_mean.fill_(0.5)
    theirs(torch.randn(0, 3, 5))
    assert theirs.running_mean.isnan().all() and theirs.running_var.isnan().all()
    with pytest.raises(ValueError, match="empty batch.*NaN"):
        ours(torch.randn(0, 3, 5))
    assert torch.equal(ours.running_mean, torch.full((3,), 0.5))       # untouched
    # Where torch keeps the estimates, so does normcode: L = 0 with N > 0, and evaluation.
    for module in (nn.InstanceNorm1d(3, track_running_stats=True),
                   normcode.InstanceNorm1d(3, track_running_stats=True)):
        assert module(torch.randn(2, 3, 0)).shape == (2, 3, 0)
        assert module.eval()(torch.randn(0, 3, 5)).shape == (0, 3, 5)
        assert torch.equal(module.running_mean, torch.zeros(3))
        assert torch.equal(module.running_var, torch.ones(3))


RUNNING_REQUIRES_GRAD = {
    "batch_norm eval": lambda L, rm, rv: L.F.batch_norm(x(4, 3), rm, rv),
    "batch_norm training": lambda L, rm, rv: L.F.batch_norm(x(4, 3), rm, rv, training=True),
    "instance_norm eval": lambda L, rm, rv: L.F.instance_norm(x(2, 3, 4), rm, rv, use_input_stats=False),
    "instance_norm training": lambda L, rm, rv: L.F.instance_norm(x(2, 3, 4), rm, rv),
}


@pytest.mark.parametrize("case", RUNNING_REQUIRES_GRAD)
def test_running_estimates_that_require_grad_are_not_differentiable(case):
    call = RUNNING_REQUIRES_GRAD[case]
    fresh = lambda: (torch.zeros(3, dtype=F64).requires_grad_(), torch.ones(3, dtype=F64).requires_grad_())
    for L in (TORCH, OURS):
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'running_mean'"):
            call(L, *fresh())
    with torch.no_grad():                     # fine outside autograd, on both sides, same values
        torch.testing.assert_close(call(OURS, *fresh()), call(TORCH, *fresh()), rtol=1e-12, atol=1e-12)


def test_a_module_buffer_that_requires_grad_is_refused_like_torch():
    for lib in (nn, normcode):
        bn = lib.BatchNorm1d(3).double().eval()
        bn.running_var.requires_grad_()
        with pytest.raises(RuntimeError, match="'running_var'"):
            bn(x(4, 3))


FLOAT8 = {
    "batch_norm": lambda L, t: L.F.batch_norm(t, None, None, training=True),
    "instance_norm": lambda L, t: L.F.instance_norm(t.reshape(1, 4, 3)),
    "layer_norm": lambda L, t: L.F.layer_norm(t, (3,)),
    "group_norm": lambda L, t: L.F.group_norm(t, 1),
    "rms_norm": lambda L, t: L.F.rms_norm(t, (3,)),
    "local_response_norm": lambda L, t: L.F.local_response_norm(t.reshape(1, 4, 3), 2),
}


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
@pytest.mark.parametrize("case", FLOAT8)
def test_a_float8_input_raises_not_implemented_as_torch(case, dtype):
    t = torch.randn(4, 3).to(dtype)
    (e_theirs, _), (e_ours, _) = outcome(lambda L: FLOAT8[case](L, t), TORCH), \
        outcome(lambda L: FLOAT8[case](L, t), OURS)
    assert type(e_theirs) is NotImplementedError and type(e_ours) is NotImplementedError, (e_theirs, e_ours)
    assert str(dtype) in str(e_ours)


# --------------------------------------------------------------------------------------------
# Mixed precision: float32 parameters, float16/bfloat16 activations (autocast's setup)
# --------------------------------------------------------------------------------------------
MIXED = {
    "BatchNorm2d train": (lambda lib: lib.BatchNorm2d(4), (4, 4, 5, 6), True),
    "BatchNorm2d eval": (lambda lib: lib.BatchNorm2d(4), (4, 4, 5, 6), False),
    "InstanceNorm2d affine": (lambda lib: lib.InstanceNorm2d(4, affine=True), (3, 4, 5, 6), True),
    "LayerNorm": (lambda lib: lib.LayerNorm(16), (8, 16), True),
    "GroupNorm": (lambda lib: lib.GroupNorm(2, 6), (3, 6, 4, 5), True),
    "RMSNorm": (lambda lib: lib.RMSNorm(16), (8, 16), True),
}
#: One ulp at 1 of each activation dtype. Outputs and input gradients are float32 results
#: rounded once to that dtype on both sides: within 2 ulp. Parameter gradients are float32
#: sums over the batch of rounded terms: within 2 ulp of the largest partial sum (~ the number
#: of terms, here <= 120), so an absolute bound of 2 ulp * 16 and 4 ulp relative.
ULP = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("dtype", list(ULP), ids=str)
@pytest.mark.parametrize("case", MIXED)
def test_mixed_precision_forward_and_gradients_match_torch(case, dtype):
    make, shape, train = MIXED[case]
    theirs = randomize_(make(nn)).train(train)            # float32 parameters and buffers
    ours = make(normcode).train(train)
    ours.load_state_dict(theirs.state_dict())
    t = x(*shape, dtype=dtype)
    dy = x(*shape, seed=1, dtype=dtype, mean=0.0, std=1.0)
    results = []
    for module in (ours, theirs):
        xi = t.clone().requires_grad_()
        y = module(xi)
        y.backward(dy)
        grads = {n: p.grad for n, p in module.named_parameters()}
        results.append((y, xi.grad, grads, dict(module.named_buffers())))
    (y_o, dx_o, g_o, b_o), (y_t, dx_t, g_t, b_t) = results
    ulp = ULP[dtype]
    assert y_o.dtype == y_t.dtype == dtype and dx_o.dtype == dx_t.dtype == dtype
    torch.testing.assert_close(y_o.float(), y_t.float(), rtol=2 * ulp, atol=2 * ulp)
    torch.testing.assert_close(dx_o.float(), dx_t.float(), rtol=4 * ulp, atol=4 * ulp)
    assert g_o.keys() == g_t.keys() and g_o
    for name in g_o:
        assert g_o[name].dtype == g_t[name].dtype == torch.float32, name
        torch.testing.assert_close(g_o[name], g_t[name], rtol=4 * ulp, atol=32 * ulp, msg=name)
    for name in b_o:
        if b_o[name].is_floating_point():
            assert b_o[name].dtype == torch.float32
            torch.testing.assert_close(b_o[name], b_t[name], rtol=2 * ulp, atol=2 * ulp, msg=name)

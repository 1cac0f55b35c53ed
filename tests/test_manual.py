"""normcode.manual (hand-written backward passes) against autograd and torch.nn.

One table of cases, several test bodies. Each case calls one function through a namespace ``F``
that is normcode.manual, normcode.functional (autograd through the same forward) or
torch.nn.functional, so the three are compared on identical arguments: outputs, the gradients of
the input and of every parameter, and the running estimates. gradcheck and gradgradcheck check
the hand-written backward against finite differences, and its own derivative.
"""
import copy
import re
from typing import Callable, NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as TF

import normcode
from normcode import functional as NF
from normcode import manual
from normcode.testing import assert_matches_torch

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}      # float64: the three sum in different orders


class Case(NamedTuple):
    shape: tuple                 # the input's
    params: Optional[tuple]      # the shape of weight and bias, or None for no affine
    running: bool                # pass running estimates (in the state list)
    call: Callable               # (F, x, weight, bias, [running_mean, running_var]) -> output
    stats: Optional[tuple] = None    # (norm, options) of statistics_view, for batch statistics


CASES = {
    "batch_norm, training": Case(
        (6, 3, 4, 2), (3,), True, lambda F, x, w, b, s: F.batch_norm(x, *s, w, b, True, 0.3, 1e-5),
        ("batch", {})),
    "batch_norm, training, (N, C)": Case(
        (7, 4), (4,), True, lambda F, x, w, b, s: F.batch_norm(x, *s, w, b, True, 0.1, 1e-3),
        ("batch", {})),
    "batch_norm, training, no running estimates": Case(
        (5, 3, 6), (3,), False, lambda F, x, w, b, s: F.batch_norm(x, None, None, w, b, True),
        ("batch", {})),
    "batch_norm, eval": Case(
        (6, 3, 4, 2), (3,), True, lambda F, x, w, b, s: F.batch_norm(x, *s, w, b, False, 0.1, 1e-5)),
    "batch_norm, no affine": Case(
        (6, 3, 5), None, True, lambda F, x, w, b, s: F.batch_norm(x, *s, None, None, True),
        ("batch", {})),
    "instance_norm": Case(
        (3, 4, 5, 2), (4,), True, lambda F, x, w, b, s: F.instance_norm(x, *s, w, b, True, 0.2, 1e-5),
        ("instance", {})),
    "instance_norm, running estimates": Case(
        (3, 4, 5, 2), (4,), True, lambda F, x, w, b, s: F.instance_norm(x, *s, w, b, False)),
    "layer_norm": Case(
        (5, 4, 3), (4, 3), False, lambda F, x, w, b, s: F.layer_norm(x, (4, 3), w, b, 1e-5),
        ("layer", {"normalized_ndim": 2})),
    "layer_norm, no bias": Case(
        (2, 5, 6), (6,), False, lambda F, x, w, b, s: F.layer_norm(x, (6,), w, None),
        ("layer", {"normalized_ndim": 1})),
    "group_norm": Case(
        (4, 6, 3, 3), (6,), False, lambda F, x, w, b, s: F.group_norm(x, 3, w, b, 1e-5),
        ("group", {"num_groups": 3})),
    "group_norm, G = 1": Case(
        (3, 4, 5), (4,), False, lambda F, x, w, b, s: F.group_norm(x, 1, w, b),
        ("group", {"num_groups": 1})),
    "group_norm, G = C": Case(
        (3, 4, 5), (4,), False, lambda F, x, w, b, s: F.group_norm(x, 4, w, b),
        ("group", {"num_groups": 4})),
    "group_norm, channels_last": Case(
        (3, 4, 3, 3), (4,), False,
        lambda F, x, w, b, s: F.group_norm(x.contiguous(memory_format=torch.channels_last), 2, w, b),
        ("group", {"num_groups": 2})),
    "rms_norm": Case(
        (5, 4, 3), (4, 3), False, lambda F, x, w, b, s: F.rms_norm(x, (4, 3), w, 1e-6)),
    "rms_norm, eps=None": Case((5, 8), (8,), False, lambda F, x, w, b, s: F.rms_norm(x, (8,), w)),
    "rms_norm, no weight": Case((5, 8), None, False, lambda F, x, w, b, s: F.rms_norm(x, (8,), None)),
    "local_response_norm": Case(
        (3, 6, 4), None, False, lambda F, x, w, b, s: F.local_response_norm(x, 3, 0.3, 0.7, 1.5)),
    "local_response_norm, even size > C": Case(
        (2, 3, 2, 2), None, False, lambda F, x, w, b, s: F.local_response_norm(x, 4, 0.5, 1.1, 0.5)),
}


def _arguments(case, dtype=F64, seed=0):
    """Input, weight, bias (each requiring grad; random, never ones/zeros) and running estimates."""
    c = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(c.shape, generator=g, dtype=F64) * 2 + 1).to(dtype).requires_grad_()
    w = b = None
    if c.params is not None:
        w = (torch.rand(c.params, generator=g, dtype=F64) + 0.5).to(dtype).requires_grad_()
        b = torch.randn(c.params, generator=g, dtype=F64).to(dtype).requires_grad_()
    state = [None, None]
    if c.running:
        state = [torch.randn(c.shape[1], generator=g, dtype=F64).to(dtype),
                 (torch.rand(c.shape[1], generator=g, dtype=F64) + 0.5).to(dtype)]
    return x, w, b, state


def _run(F, case, args):
    """Forward and backward with a fixed random output gradient; everything the test compares."""
    x, w, b, state = copy.deepcopy(args)            # each side gets its own leaves and estimates
    y = CASES[case].call(F, x, w, b, state)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(y.dtype)
    y.backward(dy)
    grad = lambda t: None if t is None else t.grad
    return {"output": y, "input grad": x.grad, "weight grad": grad(w), "bias grad": grad(b),
            "running_mean": state[0], "running_var": state[1]}


#: What manual computes by hand. Its output and running estimates come from the very
#: normcode.functional call (the forward *is* that function), so comparing those with
#: normcode.functional could not fail: they are compared with torch only.
GRADIENTS = ("input grad", "weight grad", "bias grad")


@pytest.mark.parametrize("case", CASES)
def test_matches_autograd_and_torch(case):
    args = _arguments(case)
    ours = _run(manual, case, args)
    for F in (NF, TF):
        theirs = _run(F, case, args)
        for what in (GRADIENTS if F is NF else ours):
            if ours[what] is None or theirs[what] is None:
                # a bias the call does not use has no gradient on any side
                assert ours[what] is None and theirs[what] is None, what
                continue
            torch.testing.assert_close(ours[what], theirs[what], **TOL,
                                       msg=lambda m: f"{F.__name__}, {what}: {m}")


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_and_gradgradcheck(case):
    x, w, b, state = _arguments(case)
    given = {name: t for name, t in (("x", x), ("w", w), ("b", b)) if t is not None}

    def f(*tensors):
        t = dict(zip(given, tensors))
        return CASES[case].call(manual, t["x"], t.get("w"), t.get("b"), copy.deepcopy(state))

    assert torch.autograd.gradcheck(f, tuple(given.values()))
    assert torch.autograd.gradgradcheck(f, tuple(given.values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_reduced_precision_matches_autograd(case, dtype):
    # Both compute in COMPUTE_DTYPE and round once at the end; only the order of operations differs.
    args = _arguments(case, dtype)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5),
           torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]
    ours, theirs = _run(manual, case, args), _run(NF, case, args)
    for what in GRADIENTS:                  # the output is the same call on both sides
        assert (ours[what] is None) == (theirs[what] is None), what
        if ours[what] is not None:
            assert ours[what].dtype == theirs[what].dtype, what
            torch.testing.assert_close(ours[what].float(), theirs[what].float(), **tol)


@pytest.mark.parametrize("case", [name for name, c in CASES.items() if c.stats is not None])
def test_batch_statistics_gradient_is_a_projection(case):
    # Through batch statistics, dx has zero mean over every statistics set, and is orthogonal to
    # x_hat up to a factor eps / (var + eps): the gradient cannot move what the normalization
    # takes out (exactly so for eps = 0).
    x, w, b, state = _arguments(case)
    norm, options = CASES[case].stats
    x.grad = None
    y = CASES[case].call(manual, x, w, b, state)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=F64))
    view, dims = normcode.statistics_view(x.detach(), norm, **options)
    dx, _ = normcode.statistics_view(x.grad, norm, **options)
    mean, var = NF._moments(view, dims)
    x_hat = (view - mean) * torch.rsqrt(var + 1e-5)
    assert dx.mean(dims).abs().max() < 1e-12
    assert (dx * x_hat).mean(dims).abs().max() < 1e-3 * dx.abs().max()


@pytest.mark.parametrize("case", CASES)
def test_saves_only_the_input_and_small_statistics(case):
    """An absolute bound: the float32 input, the weight, and a float64 mean and r per
    statistics set (at most one set per row of the last dim), nothing full-size besides;
    LocalResponseNorm keeps its denominator D too (float32, full-size: D is per element)."""
    x, w, b, state = _arguments(case, torch.float32)
    params = sum(t.numel() * t.element_size() for t in (w,) if t is not None)
    ours, _ = manual.saved_bytes(CASES[case].call, manual, x, w, b, copy.deepcopy(state))
    small = 2 * 8 * x.numel() // x.shape[-1] + params     # mean and r in float64: one per set at most
    if case.startswith("local_response_norm"):
        small = x.numel() * 4
    assert ours <= x.numel() * 4 + small, (ours, x.numel() * 4)


#: normcode's modules, run on the hand-written backward passes inside manual.enabled().
MODULES = {
    "BatchNorm2d": (lambda m: m.BatchNorm2d(3), (6, 3, 4, 2)),
    "BatchNorm1d, momentum=None": (lambda m: m.BatchNorm1d(4, momentum=None), (9, 4)),
    "InstanceNorm1d, affine, tracked": (
        lambda m: m.InstanceNorm1d(3, affine=True, track_running_stats=True), (4, 3, 7)),
    "LayerNorm": (lambda m: m.LayerNorm([4, 3]), (5, 4, 3)),
    "GroupNorm": (lambda m: m.GroupNorm(2, 6), (4, 6, 3)),
    "RMSNorm": (lambda m: m.RMSNorm([5]), (6, 5)),
}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("case", MODULES)
def test_drop_in_for_normcode_modules(case, train):
    make, shape = MODULES[case]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with manual.enabled():
        assert_matches_torch(make(normcode), make(torch.nn), x, train=train)


@pytest.mark.parametrize("case", MODULES)
def test_enabled_switches_the_modules_and_only_inside(case):
    """Inside ``manual.enabled()`` a layer's backward is the hand-written one; outside, and
    inside ``enabled(False)``, it is autograd's through normcode.functional."""
    make, shape = MODULES[case]
    layer, x = make(normcode), torch.randn(shape, requires_grad=True)
    hand_written = lambda: type(layer(x).grad_fn).__name__.startswith("_")  # noqa: E731
    assert not hand_written()
    with manual.enabled():
        assert hand_written()
        with manual.enabled(False):
            assert not hand_written()
        assert hand_written()
    assert not hand_written()
    with pytest.raises(ZeroDivisionError), manual.enabled():
        1 / 0
    assert not hand_written()                                   # restored after an exception


def test_enabled_leaves_torch_compile_on_the_functional_path():
    """A layer compiled inside ``enabled()`` traces normcode.functional (inductor fuses it), not
    manual's autograd.Function, and toggling the switch recompiles nothing."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    layer, x = normcode.LayerNorm(6), torch.randn(5, 4, 6, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend=record)
    with manual.enabled():
        y = compiled(x)
    y_outside = compiled(x)
    with manual.enabled():
        compiled(x)
    assert len(graphs) == 1, f"{len(graphs)} graphs: the switch made the layer recompile"
    targets = {str(node.target) for node in graphs[0].graph.nodes}
    assert not any("autograd_function" in t for t in targets), sorted(targets)
    torch.testing.assert_close(y, y_outside)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_eager,) = torch.autograd.grad(layer(x).square().sum(), x)
    torch.testing.assert_close(g, g_eager)


def _zeros(n=3):
    return torch.zeros(n, dtype=F64)


#: Bad calls, each with what its message must name. Compared with torch, not with
#: normcode.functional (whose errors manual's are by construction).
BAD_CALLS = {
    "one value per channel": (lambda F: F.batch_norm(torch.ones(1, 3, dtype=F64), None, None,
                                                     training=True), ValueError, "[1, 3]"),
    "wrong normalized_shape": (lambda F: F.layer_norm(torch.ones(2, 3, dtype=F64), (4,)),
                               RuntimeError, "[4]"),
    "C % G != 0": (lambda F: F.group_norm(torch.ones(2, 6, 3, dtype=F64), 4), RuntimeError, "4"),
    "one spatial element": (lambda F: F.instance_norm(torch.ones(2, 3, 1, dtype=F64)),
                            ValueError, "spatial"),
    "running_mean of the wrong size": (lambda F: F.batch_norm(torch.ones(4, 3, dtype=F64), _zeros(2),
                                                              _zeros(2) + 1), RuntimeError, "2"),
    "running_mean that requires grad": (lambda F: F.batch_norm(
        torch.ones(4, 3, dtype=F64), _zeros().requires_grad_(), _zeros() + 1), RuntimeError, "running_mean"),
    "eps <= 0 in training": (lambda F: F.batch_norm(torch.ones(4, 3, dtype=F64), None, None,
                                                    training=True, eps=0.0), ValueError, "eps"),
    "rms_norm on fewer dims": (lambda F: F.rms_norm(torch.ones(3, dtype=F64), (2, 3)), ValueError, "2"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_raises_as_torch(case):
    call, error, names = BAD_CALLS[case]
    with pytest.raises(error):
        call(TF)
    with pytest.raises(error, match=re.escape(names)):
        call(manual)


# --------------------------------------------------------------------------------------------
# normcode.variance: the chapter on numerics compares these four in float32; in float64, on
# data near zero, all are exact to rounding, and Chan's merge is exact for any split.
# --------------------------------------------------------------------------------------------
VARIANCE_ALGORITHMS = {
    "naive": normcode.variance.naive_var,
    "two-pass": normcode.variance.two_pass_var,
    "Welford": normcode.variance.welford_var,
    "Chan, 3 chunks": lambda x, dim: normcode.variance.chan_var(x, dim, chunks=3),
    "Chan, more chunks than values": lambda x, dim: normcode.variance.chan_var(x, dim, chunks=12),
}


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("name", VARIANCE_ALGORITHMS)
def test_variance_algorithms_in_float64(name, dim):
    x = torch.randn(7, 5, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * 3 + 2
    mean, var = VARIANCE_ALGORITHMS[name](x, dim)
    torch.testing.assert_close(mean, x.mean(dim, keepdim=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.var(dim, correction=0, keepdim=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes", [(4, 4), (1, 7), (0, 8), (8, 0), (3, 0, 5)])
def test_chan_merge_is_exact_for_any_split(sizes):
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * 5 - 3
    parts = [normcode.variance.moments(piece, 0) for piece in torch.split(x, sizes, dim=0)]
    merged = parts[0]
    for part in parts[1:]:
        merged = normcode.variance.chan_merge(merged, part)
    whole = normcode.variance.moments(x, 0)
    for field in ("count", "mean", "m2"):
        torch.testing.assert_close(getattr(merged, field), getattr(whole, field), rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------------------------
# The whole parity table of tests/test_parity.py (every option, layout and dtype, training and
# evaluation) through normcode's modules running on the hand-written backward passes.
# --------------------------------------------------------------------------------------------
from conftest import DEVICES  # noqa: E402  (tests/ is on the path under pytest)
from test_parity import CASES as PARITY_CASES  # noqa: E402


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [manual.BLOCK_ELEMENTS, 7], ids=["one block", "blocks of 7"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.id)
def test_parity_table_on_the_manual_backward(case, train, block, device, monkeypatch):
    """With blocks of about 7 elements the forward's blockwise sums and outputs are exercised
    on every shape (a row is at least one block)."""
    monkeypatch.setattr(manual, "BLOCK_ELEMENTS", block)
    ours, theirs = case.build()
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 + 1
    x = x.contiguous(memory_format=torch.channels_last) if case.layout == "channels_last" else \
        x.contiguous(memory_format=torch.channels_last_3d) if case.layout == "channels_last_3d" else x
    with manual.enabled():
        assert_matches_torch(ours.to(device), theirs.to(device), x.to(device), train=train,
                             steps=3, dtype=case.dtype,
                             rtol=case.tol.rtol, atol=case.tol.atol,
                             grad_rtol=case.tol.grad_rtol, grad_atol=case.tol.grad_atol)

"""torch.compile of normcode's modules: the fast path held to the eager one.

A subset of tests/test_parity.py's table (every layer, both layouts, float32 and float64,
momentum=None), each compiled with ``fullgraph=True`` (a graph break fails) and run through
training steps, an evaluation step, and back: output, input gradient, parameter gradients and
buffers equal to eager normcode's within the dtype's tolerance (the same float64 arithmetic,
fused in another order). Nothing may recompile once each mode has been seen: not the
cumulative average of momentum=None, not the counter, not a second switch between modes.
Compilation costs seconds per graph, so the subset is small.
"""
import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from normcode.testing import randomize_

from conftest import make_input
from test_parity import CASES, F32, F64

SUBSET = ["bn3d momentum=None float32", "bn2d channels_last float32", "bn1d (N,C)",
          "in2d affine tracked float32", "ln float32", "gn channels_last float32", "rms float32",
          "lrn float32"]
BY_ID = {c.id: c for c in CASES}
STEPS = "TTETTE"               # T: a training step, E: an evaluation step


def _step(call, module, x, dy):
    """One forward and backward of ``call``; what it returns and leaves in ``module``."""
    x = x.clone().requires_grad_(True)
    y = call(x)
    if y.requires_grad:
        y.backward(dy)
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    return y.detach(), x.grad, grads, {k: b.clone() for k, b in module.named_buffers()}


@pytest.mark.parametrize("case_id", SUBSET)
def test_compiled_matches_eager_without_recompiling(case_id):
    case = BY_ID[case_id]
    ours, _ = case.build()
    ours = randomize_(ours.to(case.dtype), torch.Generator().manual_seed(1))
    eager = copy.deepcopy(ours)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    tol = F32 if case.dtype == torch.float32 else F64
    g = torch.Generator().manual_seed(2)
    frames_after_both_modes = None
    for step, mode in enumerate(STEPS):
        for module in (eager, ours):
            module.train(mode == "T")
        x = make_input(case.shape, case.layout, dtype=case.dtype, seed=step)
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(case.dtype)
        expected, got = _step(eager, eager, x, dy), _step(compiled, ours, x, dy)
        for what, a, b in zip(("output", "input gradient"), got[:2], expected[:2]):
            rtol, atol = (tol.rtol, tol.atol) if what == "output" else \
                (tol.grad_rtol or tol.rtol, tol.grad_atol or tol.atol)
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"step {step} {what}: {m}")
        assert got[2].keys() == expected[2].keys()
        for name in got[2]:
            torch.testing.assert_close(got[2][name], expected[2][name], rtol=tol.grad_rtol or tol.rtol,
                                       atol=tol.grad_atol or tol.atol, msg=lambda m: f"grad {name}: {m}")
        for name in got[3]:
            torch.testing.assert_close(got[3][name], expected[3][name], rtol=tol.rtol, atol=tol.atol,
                                       msg=lambda m: f"step {step} buffer {name}: {m}")
        if step == STEPS.index("E"):
            frames_after_both_modes = counter.frame_count
    assert counter.frame_count == frames_after_both_modes <= 2, \
        f"{counter.frame_count} compilations; {frames_after_both_modes} after one step in each mode"

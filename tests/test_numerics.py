"""The stress test: float32 inputs of std 1 and a large mean, where one-pass variances cancel.

For each layer, shape, layout and mean mu, normcode's float32 output must be at least as close to
a float64 reference as torch.nn's float32 output is. normcode computes a float32 norm in float64
by two passes and rounds once, so its error stays at the rounding of the output whatever mu is.
The reference is torch.nn in float64 on a CONTIGUOUS copy: torch's channels_last GroupNorm loses
digits to cancellation even in float64, so a channels_last float64 reference would be wrong.
"""
import pytest
import torch
from torch import nn

import normcode
from normcode.testing import randomize_

from conftest import DEVICES, make_input

MEANS = [0.0, 1e2, 1e3, 1e4, 1e5, 1e6]

#: id -> (layer, args, shape, layouts)
CASES = {
    "bn2d": ("BatchNorm2d", (8,), (16, 8, 16, 16), ("contiguous", "channels_last")),
    "bn1d (N,C)": ("BatchNorm1d", (8,), (256, 8), ("contiguous",)),
    "gn": ("GroupNorm", (4, 16), (8, 16, 16, 16), ("contiguous", "channels_last")),
    "in2d": ("InstanceNorm2d", (8,), (16, 8, 16, 16), ("contiguous", "channels_last")),
    "ln (64,1024)": ("LayerNorm", (1024,), (64, 1024), ("contiguous",)),
    "ln over W": ("LayerNorm", (16,), (8, 16, 16, 16), ("contiguous", "channels_last")),
    "rms (64,1024)": ("RMSNorm", (1024,), (64, 1024), ("contiguous",)),
    "rms over W": ("RMSNorm", (16,), (8, 16, 16, 16), ("contiguous", "channels_last")),
}
PARAMS = [(case, layout, mu) for case, (_, _, _, layouts) in CASES.items() for layout in layouts for mu in MEANS]


def run(layer, args, shape, layout, mu, device="cpu"):
    """(normcode's float32 output, torch.nn's float32 output, the float64 reference), the first
    two computed on ``device``, the reference on the CPU."""
    kwargs = {"affine": True} if layer.startswith("Instance") else {}
    theirs = randomize_(getattr(nn, layer)(*args, **kwargs))       # random, never default, parameters
    ours = getattr(normcode, layer)(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    reference = getattr(nn, layer)(*args, **kwargs).double()
    reference.load_state_dict(theirs.state_dict())
    if layer == "RMSNorm":         # eps=None means float32's eps for a float32 input: keep it in float64
        reference.eps = torch.finfo(torch.float32).eps
    x = make_input(shape, layout, dtype=torch.float32, mean=mu, std=1.0)
    with torch.no_grad():                                  # training mode: batch statistics
        exact = reference(x.double().contiguous())
        x = x.to(device)
        return ours.to(device)(x).cpu(), theirs.to(device)(x).cpu(), exact


def errors(*case):
    """(normcode's, torch's) max abs error of the float32 output against the float64 reference."""
    y_ours, y_theirs, exact = run(*case)
    return [(y.double() - exact).abs().max().item() for y in (y_ours, y_theirs)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case, layout, mu", PARAMS, ids=[f"{c}-{l}-mu={m:g}" for c, l, m in PARAMS])
def test_float32_error_at_most_torchs(case, layout, mu, device, record):
    """On every device: normcode's error at most torch.nn's own on that device. On CUDA both
    compute float32 in float32 (normcode.functional.ACCELERATOR_COMPUTE_DTYPE); the CPU's
    stronger property (rounded once from float64) is checked below it."""
    y_ours, y_theirs, exact = run(*CASES[case][:3], layout, mu, device)
    ours, theirs = [(y.double() - exact).abs().max().item() for y in (y_ours, y_theirs)]
    record("normcode's float32 error vs the float64 reference:", {f"{case} {layout} mu={mu:g} {device}": ours})
    assert ours <= theirs, f"normcode's error {ours:.3g} > torch.nn's {theirs:.3g} on {device}"
    if device != "cpu":
        return
    # Stronger: normcode's float32 output is the float64 result rounded once, so every element is
    # within half an ulp of float32, plus the float64 computations' own error (of either side: a
    # few ulp of float64 at the input's magnitude mu, over the std of 1, times gamma <= 1.5).
    rounded = exact.float()
    half_ulp = (torch.nextafter(rounded.abs(), torch.tensor(float("inf"))) - rounded.abs()).double() / 2
    excess = (y_ours.double() - exact).abs() - (half_ulp + 1e-15 * (mu + 1) * 1.5)
    assert excess.max() <= 0, f"an element is off by more than half an ulp at mu={mu:g}"


@pytest.mark.parametrize("case, layout, mu", PARAMS, ids=[f"{c}-{l}-mu={m:g}" for c, l, m in PARAMS])
def test_accelerator_formulation_on_the_cpu(case, layout, mu, monkeypatch):
    """The float32-in-float32 formulation CUDA runs (ACCELERATOR_COMPUTE_DTYPE: two passes over
    the shifted values), simulated on the CPU by swapping that table in for the CPU's: its error
    stays within 32 float32 ulps of the output's scale at every mean (E[x^2] - E[x]^2 in float32
    would lose every digit at mu = 1e6, and torch's own CPU kernels are off by more than 1 on
    some of these cases). This checks the formulation, not CUDA's kernels: no GPU has run
    normcode yet (the test above runs on CUDA where one is present)."""
    monkeypatch.setattr(normcode.functional, "COMPUTE_DTYPE",
                        dict(normcode.functional.ACCELERATOR_COMPUTE_DTYPE))
    assert normcode.functional._compute_dtype(torch.empty(0)) is torch.float32   # swapped in
    y_ours, _, exact = run(*CASES[case][:3], layout, mu)
    error = (y_ours.double() - exact).abs().max().item()
    assert error <= 32 * torch.finfo(torch.float32).eps * exact.abs().max().item(), error


def test_channels_last_group_norm_keeps_the_mean():
    """normcode's channels_last GroupNorm in float32 at mu = 1e3 stays at rounding level."""
    ours, _ = errors("GroupNorm", (4, 16), (8, 16, 16, 16), "channels_last", 1e3)
    assert ours < 1e-5


@pytest.mark.xfail(strict=True, reason=(
    "a known torch bug, measured on 2.13: its channels_last GroupNorm kernel (one-pass variance) "
    "is off by more than 1 at mu = 1e3 in float32. strict: when this passes, torch is fixed; "
    "update the book's numerics chapter, which quotes the error, and drop this mark"))
def test_torch_channels_last_group_norm_keeps_the_mean():
    _, theirs = errors("GroupNorm", (4, 16), (8, 16, 16, 16), "channels_last", 1e3)
    assert theirs < 1e-3

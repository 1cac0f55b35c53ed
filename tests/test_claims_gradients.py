"""The gradients chapter's claims, over seeds and shapes beyond the chapter's one draw.

- normcode.manual's hand-written backward equals autograd through normcode.functional and
  torch.nn.functional, for every case of the chapter's table;
- what a backward keeps (normcode.experiments.accuracy.backward_memory): manual keeps one
  full-size tensor, the input, and no more bytes than torch.nn but a small per-set amount;
  autograd more than eight nodes and, per layer, the full-size float64 intermediates its
  formulation needs (one for BatchNorm's multiply-add, two for GroupNorm and RMSNorm, three for
  LayerNorm), 8 bytes per input element each and less than 4 bytes besides;
  torch.nn's fused BatchNorm, GroupNorm and LayerNorm kernels one full-size tensor.
"""
import pytest
import torch
import torch.nn.functional as TF

from normcode import functional as NF
from normcode import manual
from normcode.experiments.accuracy import backward_memory, forward_backward, gradient_cases

f64 = torch.float64
C = 4
CASES = gradient_cases(C)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_manual_backward_matches_autograd_and_torch(name, seed):
    torch.manual_seed(seed)
    shape, call = CASES[name]
    x = torch.randn(5, C, 2, 3, dtype=f64) * 3 + 2
    dy = torch.randn_like(x)
    w, b = torch.rand(shape(x), dtype=f64) + 0.5, torch.randn(shape(x), dtype=f64)
    running = [torch.randn(C, dtype=f64), torch.rand(C, dtype=f64) + 0.5]
    ours = forward_backward(manual, call, x, w, b, running, dy)
    for F in (NF, TF):
        theirs = forward_backward(F, call, x, w, b, running, dy)
        for a, t in zip(ours, theirs):
            if a is None or t is None:
                assert a is None and t is None
            else:
                torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-12)


CALLS = {
    "batch_norm": ((8, 16, 4, 4), (16,), lambda F, x, w, b: F.batch_norm(
        x, None, None, w, b, True)),
    "group_norm": ((8, 16, 4, 4), (16,), lambda F, x, w, b: F.group_norm(x, 4, w, b)),
    "layer_norm": ((32, 64), (64,), lambda F, x, w, b: F.layer_norm(x, (64,), w, b)),
    "rms_norm": ((32, 64), (64,), lambda F, x, w, b: F.rms_norm(x, (64,), w)),
}
#: Full-size float64 tensors autograd keeps through normcode.functional: BatchNorm the shifted
#: values (its square and its multiply-add); GroupNorm those in the group view and per channel;
#: LayerNorm the shifted values, the centred values and x_hat; RMSNorm x and x r.
AUTOGRAD_FULL_SIZE = {"batch_norm": 1, "group_norm": 2, "layer_norm": 3, "rms_norm": 2}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_what_each_backward_keeps(name):
    shape, param, call = CALLS[name]
    x = torch.randn(shape).requires_grad_()
    w, b = (torch.rand(param) + 0.5).requires_grad_(), torch.randn(param).requires_grad_()
    kept = {impl: backward_memory(lambda x, w, b: call(F, x, w, b), x, w, b)
            for impl, F in (("autograd", NF), ("manual", manual), ("torch.nn", TF))}
    assert kept["manual"]["full_size"] == 1 and kept["manual"]["nodes"] == 1
    assert kept["manual"]["bytes_per_element"] < 4.5
    assert kept["manual"]["bytes_per_element"] <= kept["torch.nn"]["bytes_per_element"] + 0.5
    full = AUTOGRAD_FULL_SIZE[name]
    assert kept["autograd"]["full_size"] == full and kept["autograd"]["nodes"] > 8
    # and less than a float32 tensor more (the per-set statistics are small)
    assert 8 * full <= kept["autograd"]["bytes_per_element"] < 8 * full + 4
    if name != "rms_norm":
        assert kept["torch.nn"]["full_size"] == 1 and kept["torch.nn"]["nodes"] == 1

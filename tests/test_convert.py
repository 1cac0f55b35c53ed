"""from_torch / to_torch on real models: a residual CNN (BatchNorm2d, GroupNorm) and a
TransformerEncoderLayer (LayerNorm), in training and evaluation mode, in float64.

The converted model holds only normcode norm layers (to_torch: only torch.nn ones), has the
same state_dict, computes the same outputs and gradients, updates its running statistics
identically in training, and the original model is left untouched (conversion deep-copies).
"""
import contextlib
import copy

import pytest
import torch
from torch import nn

import normcode
from normcode.convert import TWINS
from normcode.testing import randomize_

TORCH_NORMS = tuple(TWINS)
OUR_NORMS = tuple(TWINS.values())
TOL = dict(rtol=1e-12, atol=1e-12)     # float64: same formulas, another summation order


class ResidualCNN(nn.Module):
    def __init__(self, C=6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C, momentum=None),
                                   nn.ReLU(), nn.Conv2d(C, C, 3, padding=1), nn.GroupNorm(3, C))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, 4))

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(h + self.block(h)))


def residual_cnn():
    return ResidualCNN(), (4, 3, 6, 6)


def transformer_layer():
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                       batch_first=True)
    return layer, (3, 5, 8)


def bare_batch_norm():
    """A norm layer as the whole model, with tracking switched off after construction."""
    bn = nn.BatchNorm1d(4)
    bn.track_running_stats = False
    return bn, (6, 4)


MODELS = {"residual CNN": residual_cnn, "TransformerEncoderLayer": transformer_layer,
          "bare BatchNorm1d, tracking stopped": bare_batch_norm}


@contextlib.contextmanager
def no_mha_fastpath():
    """TransformerEncoderLayer's eval fast path runs one fused kernel and skips its LayerNorm
    modules altogether: switch it off so that the norms under test actually run."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def norm_layers(model):
    return [m for m in model.modules() if isinstance(m, TORCH_NORMS + OUR_NORMS)]


def make(name, train):
    model, shape = MODELS[name]()
    model = randomize_(model.double(), torch.Generator().manual_seed(0))
    model.train(train)
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def run(model, x, dy_seed):
    """Forward and backward; returns output, input gradient, named parameter gradients."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed), dtype=y.dtype))
    return y.detach(), x.grad, {k: p.grad.clone() for k, p in model.named_parameters()}


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", MODELS)
def test_from_torch_matches_the_original(name, train):
    original, x = make(name, train)
    untouched = copy.deepcopy(original)
    ours = normcode.from_torch(original)
    theirs = copy.deepcopy(original)                      # a twin to run, leaving original as it was

    # Only normcode norms remain, one for each torch norm, in the same places, same train/eval.
    before, after = norm_layers(original), norm_layers(ours)
    assert len(after) == len(before) > 0
    assert all(type(n) is TWINS[type(o)] for o, n in zip(before, after))
    assert all(n.training == train for n in after)
    assert not any(isinstance(m, TORCH_NORMS) for m in ours.modules())
    assert_same_state(ours, original)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(ours.parameters(), original.parameters()))

    # Same outputs, gradients and (in training) running statistics, over two steps.
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in after]
    with no_mha_fastpath():
        for step in range(2):
            y_ours, dx_ours, grads_ours = run(ours, x + step, dy_seed=step)
            y_theirs, dx_theirs, grads_theirs = run(theirs, x + step, dy_seed=step)
            torch.testing.assert_close(y_ours, y_theirs, **TOL)
            torch.testing.assert_close(dx_ours, dx_theirs, **TOL)
            assert grads_ours.keys() == grads_theirs.keys()
            for k in grads_ours:
                torch.testing.assert_close(grads_ours[k], grads_theirs[k], **TOL, msg=k)
            for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
                torch.testing.assert_close(a, b, **TOL, msg=f"{k} after step {step}")
    for h in hooks:
        h.remove()
    assert len(calls) == 2 * len(after), "normcode's norms did not all run (a fast path skipped them?)"
    if train and any(getattr(m, "track_running_stats", False) for m in after):
        assert not all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                         untouched.state_dict().values()))

    # The original is untouched: same modules, same state, never run.
    assert_same_state(original, untouched)
    assert [type(m) for m in original.modules()] == [type(m) for m in untouched.modules()]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", MODELS)
def test_to_torch_round_trip(name, train):
    original, x = make(name, train)
    ours = normcode.from_torch(original)
    back = normcode.to_torch(ours)
    assert not any(isinstance(m, OUR_NORMS) for m in back.modules())
    assert [type(m) for m in back.modules()] == [type(m) for m in original.modules()]
    assert all(n.training == train for n in norm_layers(back))
    assert_same_state(back, original)
    assert_same_state(ours, normcode.from_torch(back))       # to_torch also deep-copies: ours unchanged
    for a, b in zip(norm_layers(back), norm_layers(original)):
        assert repr(a) == repr(b)
        for attr in ("track_running_stats", "momentum", "eps"):
            assert getattr(a, attr, None) == getattr(b, attr, None)
    with no_mha_fastpath():
        y_back, dx_back, grads_back = run(back, x, dy_seed=0)
        y_orig, dx_orig, grads_orig = run(copy.deepcopy(original), x, dy_seed=0)
    torch.testing.assert_close(y_back, y_orig, **TOL)
    torch.testing.assert_close(dx_back, dx_orig, **TOL)
    for k in grads_orig:
        torch.testing.assert_close(grads_back[k], grads_orig[k], **TOL, msg=k)


def test_sync_batch_norm_converts_both_ways():
    """nn.SyncBatchNorm cannot train on CPU, so the two are compared in eval mode; normcode's
    twin is normcode.SyncBatchNorm (which can), with the same state and process_group."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4, momentum=None)).double()
    randomize_(model[1])
    model.eval()
    ours = normcode.from_torch(model)
    assert type(ours[1]) is normcode.SyncBatchNorm and not ours.training
    assert ours[1].process_group is model[1].process_group
    back = normcode.to_torch(ours)
    assert type(back[1]) is nn.SyncBatchNorm
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for converted in (ours, back):
        for key, value in model.state_dict().items():
            torch.testing.assert_close(converted.state_dict()[key], value, rtol=0, atol=0)
        torch.testing.assert_close(converted(x), model(x), **TOL)


# --------------------------------------------------------------------------------------------
# What conversion keeps, and what it refuses (never a silent skip)
# --------------------------------------------------------------------------------------------
def test_requires_grad_is_kept_so_a_frozen_norm_stays_frozen():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.LayerNorm(4))
    model[1].requires_grad_(False)                       # a frozen BatchNorm (fine-tuning)
    model[2].bias.requires_grad_(False)
    for converted in (normcode.from_torch(model), normcode.to_torch(normcode.from_torch(model))):
        assert [p.requires_grad for p in converted.parameters()] == \
               [p.requires_grad for p in model.parameters()]


def test_hooks_are_carried_over():
    calls = []
    bn = nn.BatchNorm1d(3)
    bn.register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m).__module__)))
    bn.register_forward_hook(lambda m, args, out: calls.append(("post", type(m).__module__)))
    bn.register_full_backward_hook(lambda m, gin, gout: calls.append(("backward", type(m).__module__)))
    ours = normcode.from_torch(nn.Sequential(bn))[0]
    ours(torch.randn(4, 3, requires_grad=True)).sum().backward()
    assert calls == [("pre", "normcode.modules"), ("post", "normcode.modules"),
                     ("backward", "normcode.modules")]


class MyBatchNorm(nn.BatchNorm2d):
    def forward(self, input):
        return super().forward(input) * 2


class MyLayerNorm(normcode.LayerNorm):
    pass


REFUSED = {
    "a torch subclass": (normcode.from_torch, lambda: nn.Sequential(nn.Conv2d(3, 4, 1), MyBatchNorm(4)),
                         "subclasses BatchNorm2d"),
    "a lazy layer before its first forward": (normcode.from_torch, lambda: nn.Sequential(nn.LazyBatchNorm1d()),
                                              "uninitialized"),
    "CrossMapLRN2d (no twin)": (normcode.from_torch, lambda: nn.Sequential(nn.CrossMapLRN2d(3)),
                                "no twin"),
    "the layer itself, a subclass": (normcode.from_torch, lambda: MyBatchNorm(4), "subclasses"),
    "a normcode subclass": (normcode.to_torch, lambda: nn.Sequential(MyLayerNorm(4)), "subclasses LayerNorm"),
    "MaskedBatchNorm1d (forward takes a mask)": (normcode.to_torch,
                                                 lambda: nn.Sequential(normcode.MaskedBatchNorm1d(3)),
                                                 "subclasses BatchNorm1d"),
    "SwitchNorm2d (no twin)": (normcode.to_torch, lambda: nn.Sequential(normcode.SwitchNorm2d(3)), "no twin"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_norm_without_an_exact_twin_is_refused(case):
    convert, build, words = REFUSED[case]
    with pytest.raises(TypeError, match=words):
        convert(build())


def test_a_lazy_layer_after_its_first_forward_converts():
    model = nn.Sequential(nn.LazyBatchNorm1d())
    model(torch.randn(4, 3))                             # torch makes it a BatchNorm1d
    ours = normcode.from_torch(model)
    assert type(ours[0]) is normcode.BatchNorm1d and ours[0].num_features == 3

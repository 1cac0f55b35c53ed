"""normcode's layers against torch.nn's: one table of cases, one test body per kind of check.

The main table runs every module and every constructor option through
``normcode.testing.assert_matches_torch``: three consecutive steps in training or evaluation mode,
comparing the output (and its memory format), the input gradient, every parameter gradient and
every buffer. Further tables check non-contiguous inputs, the running-statistics bookkeeping, and
the modules' state: reprs, state_dict keys, shapes, initial values, loading both ways.
"""
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import normcode
from normcode import functional as NF
from normcode.testing import assert_matches_torch, assert_same_layout, randomize_

from conftest import DEVICES, make_input


# --------------------------------------------------------------------------------------------
# Tolerances, each with its reason. (rtol, atol) as in torch.testing.assert_close.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float
    reason: str
    grad_rtol: float = None         # None: as rtol / atol
    grad_atol: float = None
    grad_reason: str = ""


F64 = Tol(1e-12, 1e-12, "float64: the same formulas, summed in another order: a few ulp (1e-16) "
                        "times the number of terms, relative to values of order 1 to 100")
F32 = Tol(1e-6, 1e-6, "float32 (ulp 1.2e-7 at 1): normcode rounds its float64 result once, torch "
                      "accumulates in float32 or float64 in its own order: a few ulp",
          grad_rtol=1e-6, grad_atol=1e-5,
          grad_reason="weight and bias gradients are float32 sums over the batch: a few ulp of the "
                      "largest partial sum (~30), not of the (possibly cancelled) result")
F16 = Tol(2 * 2**-10, 2**-10, "float16 (ulp 2^-10 at 1): both round a float32 result once, but "
                              "torch's kernels order (and partly round) the float32 work differently: "
                              "up to two ulp",
          grad_rtol=4 * 2**-10, grad_atol=16 * 2**-10,
          grad_reason="gradients are sums over the batch rounded to float16: a few ulp of the "
                      "largest partial sum (~30), not of the (possibly cancelled) result")
BF16 = Tol(2 * 2**-7, 2**-7, "bfloat16 (ulp 2^-7 at 1): as float16, up to two ulp",
           grad_rtol=4 * 2**-7, grad_atol=16 * 2**-7, grad_reason="as float16")


@dataclass(frozen=True)
class Case:
    """One parity case: ``layer(*args, **kwargs)`` from torch.nn and from normcode, fed ``shape``."""
    id: str
    layer: str
    args: tuple
    shape: tuple
    kwargs: dict = field(default_factory=dict)
    layout: str = "contiguous"
    dtype: torch.dtype = torch.float64
    tol: Tol = F64
    after_init: object = None          # called on both modules after construction

    def build(self):
        theirs = getattr(nn, self.layer)(*self.args, **self.kwargs)
        ours = getattr(normcode, self.layer)(*self.args, **self.kwargs)
        if self.after_init is not None:
            self.after_init(theirs)
            self.after_init(ours)
        return ours, theirs


def stop_tracking(module):
    """track_running_stats switched off after construction: training stops updating the
    buffers, evaluation still normalizes with them."""
    module.track_running_stats = False


C = Case
CASES = [
    # BatchNorm1d: (N, C) and (N, C, L), every option
    C("bn1d (N,C)", "BatchNorm1d", (5,), (7, 5)),
    C("bn1d (N,C,L)", "BatchNorm1d", (3,), (4, 3, 11)),
    C("bn1d N=2", "BatchNorm1d", (3,), (2, 3)),
    C("bn1d L=1", "BatchNorm1d", (3,), (5, 3, 1)),
    C("bn1d N=1 L=2", "BatchNorm1d", (3,), (1, 3, 2)),
    C("bn1d momentum=None", "BatchNorm1d", (4,), (6, 4), {"momentum": None}),
    C("bn1d momentum=0", "BatchNorm1d", (4,), (6, 4, 3), {"momentum": 0.0}),
    C("bn1d momentum=0.7 eps=0.5", "BatchNorm1d", (4,), (6, 4, 3), {"momentum": 0.7, "eps": 0.5}),
    C("bn1d affine=False", "BatchNorm1d", (4,), (6, 4, 3), {"affine": False}),
    C("bn1d bias=False", "BatchNorm1d", (4,), (6, 4, 3), {"bias": False}),
    C("bn1d untracked", "BatchNorm1d", (4,), (6, 4, 3), {"track_running_stats": False}),
    C("bn1d untracked affine=False", "BatchNorm1d", (4,), (6, 4), {"track_running_stats": False, "affine": False}),
    C("bn1d tracking stopped", "BatchNorm1d", (4,), (6, 4, 3), after_init=stop_tracking),
    C("bn1d N=0", "BatchNorm1d", (3,), (0, 3)),
    C("bn1d C=1", "BatchNorm1d", (1,), (5, 1, 3)),
    # BatchNorm2d
    C("bn2d", "BatchNorm2d", (3,), (4, 3, 5, 7)),
    C("bn2d primes", "BatchNorm2d", (5,), (3, 5, 7, 2)),
    C("bn2d H=1", "BatchNorm2d", (3,), (4, 3, 1, 7)),
    C("bn2d N=1", "BatchNorm2d", (3,), (1, 3, 2, 3)),
    C("bn2d channels_last", "BatchNorm2d", (6,), (3, 6, 4, 5), layout="channels_last"),
    C("bn2d channels_last untracked", "BatchNorm2d", (6,), (3, 6, 4, 5), {"track_running_stats": False},
      layout="channels_last"),
    C("bn2d momentum=None", "BatchNorm2d", (3,), (2, 3, 3, 4), {"momentum": None}),
    C("bn2d affine=False", "BatchNorm2d", (3,), (2, 3, 3, 4), {"affine": False}),
    C("bn2d bias=False", "BatchNorm2d", (3,), (2, 3, 3, 4), {"bias": False}),
    C("bn2d untracked", "BatchNorm2d", (3,), (2, 3, 3, 4), {"track_running_stats": False}),
    C("bn2d tracking stopped", "BatchNorm2d", (3,), (2, 3, 3, 4), after_init=stop_tracking),
    C("bn2d N=0", "BatchNorm2d", (3,), (0, 3, 2, 2)),
    # BatchNorm3d
    C("bn3d", "BatchNorm3d", (3,), (2, 3, 4, 5, 3)),
    C("bn3d channels_last_3d", "BatchNorm3d", (4,), (2, 4, 3, 2, 5), layout="channels_last_3d"),
    C("bn3d momentum=None", "BatchNorm3d", (2,), (2, 2, 3, 1, 2), {"momentum": None}),
    C("bn3d untracked", "BatchNorm3d", (2,), (2, 2, 3, 2, 2), {"track_running_stats": False}),
    C("bn3d affine=False", "BatchNorm3d", (2,), (2, 2, 3, 2, 2), {"affine": False}),
    # InstanceNorm1d
    C("in1d", "InstanceNorm1d", (4,), (3, 4, 9)),
    C("in1d L=2", "InstanceNorm1d", (4,), (3, 4, 2)),
    C("in1d N=1", "InstanceNorm1d", (4,), (1, 4, 5)),
    C("in1d affine", "InstanceNorm1d", (4,), (3, 4, 9), {"affine": True}),
    C("in1d affine bias=False", "InstanceNorm1d", (4,), (3, 4, 9), {"affine": True, "bias": False}),
    C("in1d tracked", "InstanceNorm1d", (4,), (3, 4, 9), {"track_running_stats": True}),
    C("in1d tracked affine momentum=None", "InstanceNorm1d", (4,), (3, 4, 9),
      {"track_running_stats": True, "affine": True, "momentum": None}),
    C("in1d tracked momentum=0.6", "InstanceNorm1d", (4,), (3, 4, 9),
      {"track_running_stats": True, "momentum": 0.6, "eps": 1e-2}),
    C("in1d unbatched", "InstanceNorm1d", (4,), (4, 9)),
    C("in1d unbatched tracked affine", "InstanceNorm1d", (4,), (4, 9),
      {"track_running_stats": True, "affine": True}),
    # InstanceNorm2d
    C("in2d", "InstanceNorm2d", (3,), (2, 3, 5, 7)),
    C("in2d H=1", "InstanceNorm2d", (3,), (2, 3, 1, 5)),
    C("in2d affine tracked", "InstanceNorm2d", (3,), (2, 3, 5, 7), {"affine": True, "track_running_stats": True}),
    C("in2d channels_last", "InstanceNorm2d", (6,), (2, 6, 3, 5), {"affine": True}, layout="channels_last"),
    C("in2d unbatched", "InstanceNorm2d", (3,), (3, 5, 7), {"affine": True}),
    C("in2d unbatched tracked", "InstanceNorm2d", (3,), (3, 4, 2), {"track_running_stats": True}),
    # InstanceNorm3d
    C("in3d", "InstanceNorm3d", (3,), (2, 3, 3, 4, 5)),
    C("in3d channels_last_3d", "InstanceNorm3d", (4,), (2, 4, 3, 2, 3), {"affine": True},
      layout="channels_last_3d"),
    C("in3d unbatched affine tracked", "InstanceNorm3d", (3,), (3, 2, 3, 4),
      {"affine": True, "track_running_stats": True}),
    # LayerNorm
    C("ln int shape", "LayerNorm", (7,), (3, 7)),
    C("ln 1d input", "LayerNorm", (7,), (7,)),
    C("ln (5,)", "LayerNorm", ((5,),), (2, 3, 5)),
    C("ln (3, 5)", "LayerNorm", ((3, 5),), (2, 4, 3, 5)),
    C("ln whole input", "LayerNorm", ((2, 3, 5),), (2, 3, 5)),
    C("ln (1,)", "LayerNorm", ((1,),), (4, 1)),
    C("ln elementwise_affine=False", "LayerNorm", ((3, 5),), (2, 3, 5), {"elementwise_affine": False}),
    C("ln bias=False", "LayerNorm", ((3, 5),), (2, 3, 5), {"bias": False}),
    C("ln eps=0.3", "LayerNorm", (5,), (4, 5), {"eps": 0.3}),
    C("ln channels_last", "LayerNorm", (5,), (2, 3, 4, 5), layout="channels_last"),
    C("ln channels_last_3d", "LayerNorm", ((2, 3),), (2, 4, 3, 2, 3), layout="channels_last_3d"),
    # GroupNorm: ranks 2 to 5, G = 1, C and between
    C("gn rank 2", "GroupNorm", (3, 6), (4, 6)),
    C("gn rank 3", "GroupNorm", (2, 6), (3, 6, 5)),
    C("gn rank 4", "GroupNorm", (3, 6), (2, 6, 4, 5)),
    C("gn rank 5", "GroupNorm", (2, 4), (2, 4, 3, 2, 3)),
    C("gn G=1", "GroupNorm", (1, 4), (3, 4, 5)),
    C("gn G=C", "GroupNorm", (4, 4), (3, 4, 5)),
    C("gn primes", "GroupNorm", (5, 10), (3, 10, 7)),
    C("gn N=1", "GroupNorm", (2, 4), (1, 4, 3)),
    C("gn (1,4) G=2", "GroupNorm", (2, 4), (1, 4)),
    C("gn affine=False", "GroupNorm", (2, 4), (3, 4, 5), {"affine": False}),
    C("gn bias=False", "GroupNorm", (2, 4), (3, 4, 5), {"bias": False}),
    C("gn eps=0.2", "GroupNorm", (2, 4), (3, 4, 5), {"eps": 0.2}),
    C("gn channels_last", "GroupNorm", (3, 6), (2, 6, 4, 5), layout="channels_last"),
    C("gn channels_last_3d", "GroupNorm", (2, 4), (2, 4, 3, 2, 3), layout="channels_last_3d"),
    # RMSNorm
    C("rms eps=None", "RMSNorm", (7,), (3, 7)),
    C("rms eps=1e-3", "RMSNorm", (7,), (3, 7), {"eps": 1e-3}),
    C("rms (3, 4)", "RMSNorm", ((3, 4),), (2, 3, 4)),
    C("rms 1d input", "RMSNorm", ((5,),), (5,)),
    C("rms elementwise_affine=False", "RMSNorm", ((3, 4),), (2, 3, 4), {"elementwise_affine": False}),
    C("rms channels_last", "RMSNorm", (5,), (2, 3, 4, 5), layout="channels_last"),
    # LocalResponseNorm: odd and even sizes, size 1 and size beyond C, 3D to 5D
    C("lrn size=1", "LocalResponseNorm", (1,), (2, 5, 7)),
    C("lrn size=2", "LocalResponseNorm", (2,), (2, 5, 7)),
    C("lrn size=3", "LocalResponseNorm", (3,), (2, 6, 3, 4), {"alpha": 0.3, "beta": 0.6, "k": 2.0}),
    C("lrn size=4", "LocalResponseNorm", (4,), (2, 6, 3, 4), {"alpha": 0.5, "beta": 1.1, "k": 0.5}),
    C("lrn size=5 rank 5", "LocalResponseNorm", (5,), (2, 5, 2, 3, 2), {"alpha": 0.2}),
    C("lrn size > C", "LocalResponseNorm", (9,), (2, 4, 3), {"alpha": 0.4}),
    C("lrn channels_last", "LocalResponseNorm", (3,), (2, 6, 3, 4), {"alpha": 0.3}, layout="channels_last"),
]

# Lower precision: every module once in float32, float16 and bfloat16, compared in that dtype.
for dtype, tol in ((torch.float32, F32), (torch.float16, F16), (torch.bfloat16, BF16)):
    name = str(dtype).replace("torch.", "")
    CASES += [
        C(f"bn1d {name}", "BatchNorm1d", (5,), (16, 5), dtype=dtype, tol=tol),
        C(f"bn2d {name}", "BatchNorm2d", (4,), (4, 4, 5, 6), dtype=dtype, tol=tol),
        C(f"bn2d channels_last {name}", "BatchNorm2d", (4,), (4, 4, 5, 6), layout="channels_last",
          dtype=dtype, tol=tol),
        C(f"bn3d momentum=None {name}", "BatchNorm3d", (3,), (2, 3, 4, 3, 2), {"momentum": None},
          dtype=dtype, tol=tol),
        C(f"in2d affine tracked {name}", "InstanceNorm2d", (4,), (3, 4, 5, 6),
          {"affine": True, "track_running_stats": True}, dtype=dtype, tol=tol),
        C(f"ln {name}", "LayerNorm", ((4, 8),), (3, 4, 8), dtype=dtype, tol=tol),
        C(f"gn {name}", "GroupNorm", (2, 6), (3, 6, 4, 5), dtype=dtype, tol=tol),
        C(f"gn channels_last {name}", "GroupNorm", (2, 6), (3, 6, 4, 5), layout="channels_last",
          dtype=dtype, tol=tol),
        C(f"rms {name}", "RMSNorm", (16,), (4, 16), dtype=dtype, tol=tol),
        C(f"lrn {name}", "LocalResponseNorm", (3,), (3, 6, 5), {"alpha": 0.3}, dtype=dtype, tol=tol),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_torch(case, train, device, record):
    """Three steps: output, its memory format, input and parameter gradients, buffers."""
    ours, theirs = case.build()
    x = make_input(case.shape, case.layout, device=device)
    diffs = assert_matches_torch(ours.to(device), theirs.to(device), x, train=train, steps=3,
                                 dtype=case.dtype, rtol=case.tol.rtol, atol=case.tol.atol,
                                 grad_rtol=case.tol.grad_rtol, grad_atol=case.tol.grad_atol)
    assert diffs, "nothing was compared"
    assert any(k.endswith("output") for k in diffs) or 0 in case.shape
    record(case.dtype, diffs)


def test_every_layer_and_option_is_covered():
    """The table reaches every normcode module, every dtype, and every layout."""
    layers = {c.layer for c in CASES}
    # SyncBatchNorm's torch twin cannot train on CPU: tests/test_distributed.py holds it to
    # single-process BatchNorm on the concatenated batch instead.
    expected = {ours.__name__ for ours in normcode.convert.TWINS.values()} - {"SyncBatchNorm"}
    assert layers == expected
    assert {c.dtype for c in CASES} == {torch.float64, torch.float32, torch.float16, torch.bfloat16}
    assert {c.layout for c in CASES} == {"contiguous", "channels_last", "channels_last_3d"}
    options = {k for c in CASES for k in c.kwargs}
    assert options >= {"momentum", "affine", "bias", "track_running_stats", "eps",
                       "elementwise_affine", "alpha", "beta", "k"}


# --------------------------------------------------------------------------------------------
# Non-contiguous inputs. assert_matches_torch clones its input (a clone of a sliced view is
# contiguous), so these call the functionals directly on the views themselves.
# --------------------------------------------------------------------------------------------
VIEWS = {   # name -> (N, C, *) view of a fresh tensor, none of them contiguous
    "transposed (N,C,H,W) from (N,W,H,C)": lambda: make_input((3, 5, 4, 6)).transpose(1, 3),
    "every other channel": lambda: make_input((3, 12, 4, 5))[:, ::2],
    "every other column": lambda: make_input((3, 6, 4, 10))[..., ::2],
    "batch expanded (stride 0)": lambda: make_input((1, 6, 4, 5)).expand(3, 6, 4, 5),
    "sliced channels_last": lambda: make_input((3, 6, 4, 10), "channels_last")[..., 1:8],
    "permuted (N,C,L)": lambda: make_input((6, 3, 7)).permute(1, 0, 2)[:, :, :],
    "transposed (N,C)": lambda: make_input((6, 5)).t(),
    "rank 5, last two dims swapped": lambda: make_input((2, 6, 3, 4, 5)).transpose(3, 4),
}


def _stats(C):
    g = torch.Generator().manual_seed(1)
    return torch.randn(C, generator=g, dtype=torch.float64), torch.rand(C, generator=g, dtype=torch.float64) + 0.5


def _params(shape):
    g = torch.Generator().manual_seed(2)
    return torch.rand(shape, generator=g, dtype=torch.float64) + 0.5, torch.randn(shape, generator=g, dtype=torch.float64)


# Each call takes a functional module (torch.nn.functional or normcode.functional) and an input,
# and returns the output and the tensors it updated in place (running statistics).
def _batch_norm_train(F, x):
    running = _stats(x.shape[1])
    return F.batch_norm(x, *running, *_params(x.shape[1]), True, 0.3, 1e-5), running


def _batch_norm_eval(F, x):
    return F.batch_norm(x, *_stats(x.shape[1]), *_params(x.shape[1]), False), ()


def _instance_norm(F, x):
    running = _stats(x.shape[1])
    return F.instance_norm(x, *running, *_params(x.shape[1]), True, 0.3), running


def _layer_norm(F, x):
    return F.layer_norm(x, x.shape[-2:], *_params(x.shape[-2:])), ()


def _group_norm(F, x):
    G = x.shape[1] // 2 if x.shape[1] % 2 == 0 else 1
    return F.group_norm(x, G, *_params(x.shape[1])), ()


def _rms_norm(F, x):
    return F.rms_norm(x, x.shape[-1:], _params(x.shape[-1:])[0]), ()


def _local_response_norm(F, x):
    return F.local_response_norm(x, 3, 0.3, 0.7, 1.5), ()


#: name -> (call, the least input rank it takes)
FUNCTIONALS = {
    "batch_norm train": (_batch_norm_train, 2),
    "batch_norm eval": (_batch_norm_eval, 2),
    "instance_norm": (_instance_norm, 3),
    "layer_norm": (_layer_norm, 2),
    "group_norm": (_group_norm, 2),
    "rms_norm": (_rms_norm, 1),
    "local_response_norm": (_local_response_norm, 3),
}

#: Views torch itself cannot take: its local_response_norm flattens a rank-5 input with .view,
#: which fails on this layout. normcode computes it; it is compared with torch on a contiguous copy.
TORCH_VIEW_FAILS = {("local_response_norm", "rank 5, last two dims swapped")}


NON_CONTIGUOUS = [(fn, view) for fn, (_, least_rank) in FUNCTIONALS.items() for view in VIEWS
                  if VIEWS[view]().dim() >= least_rank]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn, view", NON_CONTIGUOUS, ids=[f"{f}-{v}" for f, v in NON_CONTIGUOUS])
def test_non_contiguous_input(fn, view, device, record):
    """Output values and memory format, running statistics, and input gradient on the view itself."""
    call, _ = FUNCTIONALS[fn]
    x = VIEWS[view]().to(device)
    assert not x.is_contiguous()
    x_ours = x.detach().requires_grad_(True)
    x_theirs = x.detach().requires_grad_(True)             # the very same view, strides and all
    if (fn, view) in TORCH_VIEW_FAILS:
        with pytest.raises(RuntimeError, match="view size is not compatible"):
            call(torch.nn.functional, x_theirs)
        x_theirs = x.detach().contiguous().requires_grad_(True)
    y_ours, state_ours = call(NF, x_ours)
    y_theirs, state_theirs = call(torch.nn.functional, x_theirs)
    torch.testing.assert_close(y_ours, y_theirs, rtol=F64.rtol, atol=F64.atol)
    if (fn, view) not in TORCH_VIEW_FAILS:
        assert_same_layout(y_ours, y_theirs)
    for ours, theirs in zip(state_ours, state_theirs, strict=True):      # running statistics
        torch.testing.assert_close(ours, theirs, rtol=F64.rtol, atol=F64.atol)
    dy = torch.randn(y_theirs.shape, generator=torch.Generator().manual_seed(3), dtype=y_theirs.dtype)
    y_ours.backward(dy.to(device))
    y_theirs.backward(dy.to(device))
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=F64.rtol, atol=F64.atol)
    record(torch.float64, {"output": (y_ours - y_theirs).abs().max().item(),
                           "input gradient": (x_ours.grad - x_theirs.grad).abs().max().item()})


# --------------------------------------------------------------------------------------------
# Running-statistics bookkeeping over a sequence of steps (T: training, E: evaluation):
# (layer, kwargs, shape, steps, change of num_batches_tracked, whether the running stats move).
# The buffers are compared with torch's after every step too.
# --------------------------------------------------------------------------------------------
BOOKKEEPING = {
    "bn counts training steps": ("BatchNorm1d", {}, (4, 3), "TTT", 3, True),
    "bn eval steps do not count": ("BatchNorm1d", {}, (4, 3), "TEETE", 2, True),
    "bn momentum=None: cumulative average": ("BatchNorm2d", {"momentum": None}, (3, 2, 2, 2), "TTTT", 4, True),
    "bn momentum=0: stats stay, counter moves": ("BatchNorm1d", {"momentum": 0.0}, (4, 3), "TT", 2, False),
    "bn N=0: stats stay, counter moves": ("BatchNorm2d", {}, (0, 3, 2, 2), "TT", 2, False),
    "bn tracking stopped: nothing moves": ("BatchNorm1d", {}, (4, 3), "TTE", 0, False),
    "in never counts": ("InstanceNorm1d", {"track_running_stats": True}, (2, 3, 5), "TTE", 0, True),
    "in momentum=None: stats never move": ("InstanceNorm2d", {"track_running_stats": True, "momentum": None},
                                           (2, 3, 2, 2), "TT", 0, False),
}


@pytest.mark.parametrize("name", BOOKKEEPING)
def test_running_statistics_bookkeeping(name):
    layer, kwargs, shape, steps, count, stats_move = BOOKKEEPING[name]
    theirs = randomize_(getattr(nn, layer)(shape[1], **kwargs).double())
    ours = getattr(normcode, layer)(shape[1], **kwargs).double()
    ours.load_state_dict(theirs.state_dict())
    start = {k: v.clone() for k, v in ours.named_buffers()}
    if "tracking stopped" in name:
        stop_tracking(theirs)
        stop_tracking(ours)
    for step, mode in enumerate(steps):
        x = make_input(shape, seed=step)
        theirs.train(mode == "T")
        ours.train(mode == "T")
        torch.testing.assert_close(ours(x), theirs(x), rtol=F64.rtol, atol=F64.atol)
        for (k, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
            torch.testing.assert_close(a, b, rtol=F64.rtol, atol=F64.atol, msg=f"{k} after step {step}")
    assert int(ours.num_batches_tracked - start["num_batches_tracked"]) == count
    for k in ("running_mean", "running_var"):
        moved = not torch.equal(getattr(ours, k), start[k])
        assert moved == stats_move, f"{k} {'moved' if moved else 'stayed'}"


# --------------------------------------------------------------------------------------------
# The modules' state: repr, attributes, parameters and buffers (names, order, shapes, dtypes,
# initial values), state_dict, and load_state_dict both ways. One row per constructor call.
# --------------------------------------------------------------------------------------------
CONSTRUCTORS = [
    (layer, args, kwargs)
    for layer in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d")
    for args, kwargs in [((3,), {}), ((3,), {"momentum": None}), ((3,), {"affine": False}),
                         ((3,), {"bias": False}), ((3,), {"track_running_stats": False}),
                         ((3,), {"eps": 1e-3, "momentum": 0.25, "affine": False, "track_running_stats": False}),
                         ((3,), {"dtype": torch.float64})]
] + [
    (layer, args, kwargs)
    for layer in ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")
    for args, kwargs in [((3,), {}), ((3,), {"affine": True}), ((3,), {"track_running_stats": True}),
                         ((3,), {"affine": True, "bias": False, "track_running_stats": True}),
                         ((3,), {"momentum": None, "eps": 0.1}), ((3,), {"dtype": torch.float16})]
] + [
    ("LayerNorm", (5,), {}), ("LayerNorm", ((2, 3),), {}), ("LayerNorm", ([4, 5],), {}),
    ("LayerNorm", (torch.Size([4, 5]),), {}),
    ("LayerNorm", ((3,),), {"elementwise_affine": False}), ("LayerNorm", ((3,),), {"bias": False}),
    ("LayerNorm", ((3,),), {"eps": 1e-6, "elementwise_affine": False, "bias": False}),
    ("LayerNorm", ((3,),), {"dtype": torch.bfloat16}),
    ("GroupNorm", (2, 4), {}), ("GroupNorm", (1, 3), {"affine": False}), ("GroupNorm", (3, 6), {"bias": False}),
    ("GroupNorm", (4, 4), {"eps": 0.01}), ("GroupNorm", (2, 4), {"dtype": torch.float64}),
    ("RMSNorm", (5,), {}), ("RMSNorm", ((2, 3),), {"eps": 1e-6}), ("RMSNorm", ((3,),), {"elementwise_affine": False}),
    ("RMSNorm", ([4],), {"dtype": torch.float64}),
    ("LocalResponseNorm", (2,), {}), ("LocalResponseNorm", (3,), {"alpha": 0.1, "beta": 0.5, "k": 2.0}),
    ("LocalResponseNorm", (5,), {"alpha": 1, "beta": 1, "k": 1}),
]
ATTRIBUTES = ("num_features", "eps", "momentum", "affine", "track_running_stats", "normalized_shape",
              "elementwise_affine", "num_groups", "num_channels", "size", "alpha", "beta", "k", "training")


def _described(module):
    """Everything a user can see of a module's state, minus the tensor values."""
    return {
        "repr": repr(module),
        "attributes": {a: getattr(module, a) for a in ATTRIBUTES if hasattr(module, a)},
        "parameters": [(k, None if p is None else (tuple(p.shape), p.dtype, p.requires_grad))
                       for k, p in module._parameters.items()],
        "buffers": [(k, None if b is None else (tuple(b.shape), b.dtype)) for k, b in module._buffers.items()],
        "state_dict": [(k, tuple(v.shape), v.dtype) for k, v in module.state_dict().items()],
        "non_persistent": sorted(module._non_persistent_buffers_set),
    }


@pytest.mark.parametrize("layer, args, kwargs", CONSTRUCTORS,
                         ids=[f"{l}{a}{k}" for l, a, k in CONSTRUCTORS])
def test_module_state_matches_torch(layer, args, kwargs):
    theirs = getattr(nn, layer)(*args, **kwargs)
    ours = getattr(normcode, layer)(*args, **kwargs)
    assert _described(ours) == _described(theirs)
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):   # initial values
        assert torch.equal(a, b), k
    # load_state_dict both ways, with random (never default) values
    randomize_(theirs, torch.Generator().manual_seed(4))
    assert not ours.load_state_dict(theirs.state_dict()).missing_keys
    randomize_(ours, torch.Generator().manual_seed(5))
    theirs_again = getattr(nn, layer)(*args, **kwargs)
    result = theirs_again.load_state_dict(ours.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs_again.state_dict().items()):
        assert torch.equal(a, b), k
    if ours.state_dict():
        assert any(not torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                         theirs.state_dict().values())), \
            "the two random draws coincide: the load checks above prove nothing"


def test_legacy_checkpoint_without_counter_loads_as_in_torch():
    """A BatchNorm checkpoint from before num_batches_tracked (metadata version 1) loads with
    the counter at 0 on both sides; an InstanceNorm one without tracking reports its stats."""
    theirs = randomize_(nn.BatchNorm1d(3))
    state = theirs.state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    ours, fresh = normcode.BatchNorm1d(3), nn.BatchNorm1d(3)
    ours.load_state_dict(state)
    fresh.load_state_dict(state)
    assert int(ours.num_batches_tracked) == int(fresh.num_batches_tracked) == 0
    assert torch.equal(ours.running_mean, fresh.running_mean)

    legacy = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    errors = []
    for module in (normcode.InstanceNorm1d(3), nn.InstanceNorm1d(3)):
        with pytest.raises(RuntimeError) as raised:
            module.load_state_dict(dict(legacy))          # a plain dict: no metadata, version None
        errors.append(str(raised.value).replace("normcode.", "").split("\n", 1)[1])
    assert errors[0] == errors[1] and "Unexpected running stats buffer" in errors[0]

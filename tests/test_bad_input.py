"""Bad input, differentially: torch raises if and only if normcode raises, with the same class.

Each case is one call, written once against a namespace ``L`` (``L.nn``: the module classes,
``L.F``: the functionals) and run against torch.nn and against normcode. Where torch raises,
normcode must raise the same exception class and its message must name the problem (the
offending shape or value). Where torch warns, normcode warns alike. Where torch computes, normcode
computes the same values. A few cases are intended deviations, each listed with its reason:
where torch silently returns NaN (or a wrong number), normcode raises instead, because the
project's rule is that bad input gets a clear error, never a silent NaN.
"""
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import normcode
from normcode import functional as NF

from conftest import make_input

TORCH = SimpleNamespace(nn=torch.nn, F=torch.nn.functional)
OURS = SimpleNamespace(nn=normcode, F=NF)


def x(*shape, dtype=torch.float32, seed=0):
    return make_input(shape, dtype=dtype, seed=seed)


def ones(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype)


def zeros(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def constant_first_row(*shape, dtype=torch.float32):
    """A random input whose first row (everything under index 0 of dim 0) is constant."""
    t = x(*shape, dtype=dtype)
    t[0] = 3.0
    return t


def small_variance(*shape):
    """Rows of variance about 1e-6: a negative eps of -1e-3 takes var + eps below 0."""
    return x(*shape) * 1e-3 + 5.0


@dataclass(frozen=True)
class Case:
    id: str
    call: object                  # L -> result
    names: tuple = ()             # what normcode's message must contain
    deviation: str = ""           # why normcode differs from torch on purpose ("" where it does not)
    torch_gives: object = None    # for a deviation: torch's exception class, or "NaN", or "a value"
    ours_gives: object = None     # for a deviation: normcode's exception class, or "a value"


C = Case
BAD = [
    # ---- wrong rank ----
    C("bn1d 1D input", lambda L: L.nn.BatchNorm1d(3)(x(3)), ("1D",)),
    C("bn1d 4D input", lambda L: L.nn.BatchNorm1d(3)(x(2, 3, 4, 5)), ("4D",)),
    C("bn2d 3D input", lambda L: L.nn.BatchNorm2d(3)(x(2, 3, 4)), ("3D",)),
    C("bn3d 4D input", lambda L: L.nn.BatchNorm3d(3)(x(2, 3, 4, 5)), ("4D",)),
    C("F.batch_norm 1D input with running stats", lambda L: L.F.batch_norm(x(3), zeros(3), ones(3)), ("1D", "[3]")),
    C("F.batch_norm 1D input, training, no stats", lambda L: L.F.batch_norm(x(3), None, None, training=True),
      ("1D", "[3]")),
    C("in1d 1D input", lambda L: L.nn.InstanceNorm1d(3)(x(3)), ("1D",)),
    C("in2d 2D input", lambda L: L.nn.InstanceNorm2d(3)(x(3, 4)), ("2D",)),
    C("in3d 6D input", lambda L: L.nn.InstanceNorm3d(3)(x(2, 3, 2, 2, 2, 2)), ("6D",)),
    C("F.instance_norm (N, C) input", lambda L: L.F.instance_norm(x(4, 3)), ("[4, 3]",)),
    C("F.instance_norm 1D input, running stats", lambda L: L.F.instance_norm(x(4), zeros(3), ones(3),
                                                                             use_input_stats=False), ("1D",)),
    C("gn 1D input", lambda L: L.F.group_norm(x(4), 2), ("1",)),
    C("GroupNorm 0D input", lambda L: L.nn.GroupNorm(1, 1)(torch.tensor(1.0)), ("0",)),
    C("lrn 2D input", lambda L: L.nn.LocalResponseNorm(2)(x(2, 3)), ("2",)),
    C("ln 0D input", lambda L: L.nn.LayerNorm(1)(torch.tensor(1.0)), ("[1]", "[]")),
    C("rms 0D input", lambda L: L.nn.RMSNorm(1)(torch.tensor(1.0)), ("0",)),
    # ---- channels ----
    C("bn channels != num_features, training", lambda L: L.nn.BatchNorm1d(5)(x(4, 3)), ("running_mean", "3", "5")),
    C("bn channels != num_features, eval", lambda L: L.nn.BatchNorm2d(5).eval()(x(2, 3, 2, 2)), ("3", "5")),
    C("bn channels != num_features, untracked", lambda L: L.nn.BatchNorm1d(5, track_running_stats=False)(x(4, 3)),
      ("weight", "3", "5")),
    C("in channels != num_features, affine", lambda L: L.nn.InstanceNorm1d(5, affine=True)(x(2, 3, 4)),
      ("dim=1", "(5)", "3")),
    C("in unbatched channels != num_features, affine",
      lambda L: L.nn.InstanceNorm2d(5, affine=True)(x(3, 4, 4)), ("dim=0", "(5)", "3")),
    C("in channels != num_features, tracked", lambda L: L.nn.InstanceNorm1d(5, track_running_stats=True)(x(2, 3, 4)),
      ("running_mean", "3", "5")),
    C("gn channels != num_channels, affine", lambda L: L.nn.GroupNorm(2, 4)(x(2, 6, 3)), ("[4]", "[2, 6, 3]")),
    # ---- one value per statistic, while training ----
    C("bn1d one value per channel", lambda L: L.nn.BatchNorm1d(3)(x(1, 3)), ("[1, 3]",)),
    C("bn2d one value per channel", lambda L: L.nn.BatchNorm2d(3)(x(1, 3, 1, 1)), ("[1, 3, 1, 1]",)),
    C("bn untracked, eval: batch stats of one value", lambda L: L.nn.BatchNorm1d(3, track_running_stats=False).eval()(x(1, 3)),
      ("[1, 3]",)),
    C("F.batch_norm (1, 0): N * prod(spatial) == 1", lambda L: L.F.batch_norm(x(1, 0), None, None, training=True),
      ("[1, 0]",)),
    C("in one spatial element", lambda L: L.nn.InstanceNorm1d(3)(x(2, 3, 1)), ("[2, 3, 1]",)),
    C("in unbatched one spatial element", lambda L: L.nn.InstanceNorm2d(3)(x(3, 1, 1)), ("[1, 3, 1, 1]",)),
    C("gn (N*C/G)*prod(spatial) == 1", lambda L: L.nn.GroupNorm(4, 4)(x(1, 4)), ("[1, 4]",)),
    C("gn (N*C/G)*prod(spatial) == 1, eval", lambda L: L.nn.GroupNorm(4, 4).eval()(x(1, 4, 1)), ("[1, 4, 1]",)),
    # ---- groups ----
    C("GroupNorm(3, 4)", lambda L: L.nn.GroupNorm(3, 4), ("(4)", "(3)")),
    C("GroupNorm(0, 4)", lambda L: L.nn.GroupNorm(0, 4), ("num_groups=0",)),
    C("GroupNorm(-2, 4) forward", lambda L: L.nn.GroupNorm(-2, 4)(x(2, 4)), ("-2",)),
    C("F.group_norm C % G != 0", lambda L: L.F.group_norm(x(2, 4, 3), 3), ("num_groups=3", "[2, 4, 3]")),
    C("F.group_norm G > C", lambda L: L.F.group_norm(x(2, 4, 3), 8), ("num_groups=8", "[2, 4, 3]")),
    C("F.group_norm G = 0", lambda L: L.F.group_norm(x(2, 4, 3), 0), ("num_groups=0",)),
    C("F.group_norm G < 0", lambda L: L.F.group_norm(x(2, 4, 3), -2), ("-2",)),
    # ---- normalized_shape ----
    C("ln normalized_shape mismatch", lambda L: L.nn.LayerNorm((2, 3))(x(4, 3, 2)), ("[2, 3]", "[4, 3, 2]")),
    C("ln normalized_shape longer than input", lambda L: L.F.layer_norm(x(4, 3), (1, 4, 3)), ("[1, 4, 3]", "[4, 3]")),
    C("ln normalized_shape=()", lambda L: L.nn.LayerNorm(())(x(4, 3)), ("[]",)),
    C("F.layer_norm normalized_shape=()", lambda L: L.F.layer_norm(x(4, 3), ()), ("[]",)),
    C("rms normalized_shape=()", lambda L: L.nn.RMSNorm(())(x(4, 3)), ("[]",)),
    C("rms normalized_shape mismatch", lambda L: L.F.rms_norm(x(2, 4, 3), (4,)), ("[4]", "[2, 4, 3]")),
    # ---- parameters of the wrong size (functional calls) ----
    C("F.batch_norm weight size", lambda L: L.F.batch_norm(x(4, 3, 5), zeros(3), ones(3), ones(4), None, True),
      ("weight", "3", "4")),
    C("F.batch_norm bias size", lambda L: L.F.batch_norm(x(4, 3, 5), zeros(3), ones(3), None, ones(4)),
      ("bias", "3", "4")),
    C("F.batch_norm running_mean size", lambda L: L.F.batch_norm(x(4, 3), zeros(4), ones(3), training=True),
      ("running_mean", "3", "4")),
    C("F.batch_norm eval without running stats", lambda L: L.F.batch_norm(x(4, 3), None, None), ("running_mean",)),
    C("F.batch_norm eval without running_var", lambda L: L.F.batch_norm(x(4, 3), zeros(3), None), ("running_var",)),
    C("F.batch_norm training with one running stat", lambda L: L.F.batch_norm(x(4, 3), zeros(3), None, training=True),
      ("running_var=None",)),
    C("F.instance_norm weight size", lambda L: L.F.instance_norm(x(4, 3, 5), weight=ones(4)), ("weight", "3", "4")),
    C("F.instance_norm running_var size", lambda L: L.F.instance_norm(x(4, 3, 5), zeros(3), ones(2)),
      ("running_var", "3", "2")),
    C("F.instance_norm no running stats, use_input_stats=False",
      lambda L: L.F.instance_norm(x(4, 3, 5), use_input_stats=False), ("running_mean",)),
    C("F.instance_norm one running stat", lambda L: L.F.instance_norm(x(4, 3, 5), zeros(3), None),
      ("running_var=None",)),
    C("F.layer_norm weight shape", lambda L: L.F.layer_norm(x(2, 3), (3,), ones(4)), ("[4]", "[3]")),
    C("F.layer_norm weight transposed", lambda L: L.F.layer_norm(x(2, 4, 3), (4, 3), ones(3, 4)), ("[3, 4]", "[4, 3]")),
    C("F.layer_norm bias shape", lambda L: L.F.layer_norm(x(2, 3), (3,), None, ones(4)), ("[4]", "[3]")),
    C("F.group_norm weight size", lambda L: L.F.group_norm(x(2, 4, 3), 2, ones(3)), ("[3]", "[2, 4, 3]")),
    C("F.group_norm weight (2, 2)", lambda L: L.F.group_norm(x(2, 4, 3), 2, ones(2, 2)), ("[2, 2]", "[2, 4, 3]")),
    C("F.group_norm bias size", lambda L: L.F.group_norm(x(2, 4, 3), 2, None, ones(5)), ("bias", "[2, 4, 3]")),
    C("F.rms_norm weight shape", lambda L: L.F.rms_norm(x(2, 3), (3,), ones(4)), ("[4]", "[3]")),
    C("F.local_response_norm size=0", lambda L: L.F.local_response_norm(x(2, 3, 4), 0), ("0",)),
    C("F.local_response_norm size=-1", lambda L: L.F.local_response_norm(x(2, 3, 4), -1), ("-1",)),
    # ---- eps ----
    C("bn eps=0, training", lambda L: L.nn.BatchNorm1d(3, eps=0.0)(x(4, 3)), ("0.0",)),
    C("bn eps<0, training", lambda L: L.nn.BatchNorm1d(3, eps=-1e-5)(x(4, 3)), ("-1e-05",)),
    C("bn eps<0, eval", lambda L: L.nn.BatchNorm1d(3, eps=-1e-5).eval()(x(4, 3)), ("-1e-05",)),
    C("F.batch_norm eps=0 on an empty batch", lambda L: L.F.batch_norm(x(0, 3), None, None, training=True, eps=0.0),
      ("0.0",)),
    # ---- dtypes ----
    C("bn int64 input", lambda L: L.nn.BatchNorm1d(3)(x(4, 3).long()), ("int64",)),
    C("bn bool input", lambda L: L.nn.BatchNorm1d(3)(x(4, 3) > 0), ("bool",)),
    C("in int32 input", lambda L: L.F.instance_norm(x(2, 3, 4).int()), ("int32",)),
    C("ln int64 input", lambda L: L.F.layer_norm(x(2, 3).long(), (3,)), ("int64",)),
    C("gn int64 input", lambda L: L.F.group_norm(x(2, 4).long(), 2), ("int64",)),
    C("rms int64 input", lambda L: L.F.rms_norm(x(2, 3).long(), (3,)), ("int64",)),
    C("lrn int32 input", lambda L: L.F.local_response_norm(x(2, 3, 4).int(), 2), ("int32",)),
    C("bn f64 input, f32 module", lambda L: L.nn.BatchNorm1d(3)(x(4, 3, dtype=torch.float64)), ("float64", "float32")),
    C("bn f16 params, f32 running stats", lambda L: L.F.batch_norm(x(4, 3, dtype=torch.float16), zeros(3), ones(3),
                                                                   ones(3, dtype=torch.float16)), ("float16", "float32")),
    C("in f64 input, f32 affine module", lambda L: L.nn.InstanceNorm1d(3, affine=True)(x(2, 3, 4, dtype=torch.float64)),
      ("float64", "float32")),
    C("ln f64 input, f32 module", lambda L: L.nn.LayerNorm(3)(x(2, 3, dtype=torch.float64)), ("float64", "float32")),
    C("ln f32 input, f16 weight", lambda L: L.F.layer_norm(x(2, 3), (3,), ones(3, dtype=torch.float16)), ("float16",)),
    C("ln f16 input, f16 weight, f32 bias", lambda L: L.F.layer_norm(x(2, 3, dtype=torch.float16), (3,),
                                                                     ones(3, dtype=torch.float16), zeros(3)), ("float16", "float32")),
    C("gn f64 input, f32 module", lambda L: L.nn.GroupNorm(2, 4)(x(2, 4, dtype=torch.float64)), ("float64", "float32")),
    C("gn bf16 input, f16 weight", lambda L: L.F.group_norm(x(2, 4, dtype=torch.bfloat16), 2, ones(4, dtype=torch.float16)),
      ("bfloat16", "float16")),
]

# Intended deviations: normcode raises where torch computes NaN (or a wrong value), or computes
# where torch fails on a layout. Each names what torch gives.
NAN = "a silent NaN: normcode's rule is that bad input gets a clear error, never a silent NaN"
DEVIATIONS = [
    C("ln eps<0", lambda L: L.F.layer_norm(small_variance(4, 5), (5,), eps=-1e-3), ("-0.001",),
      f"negative eps takes var + eps below 0 on low-variance rows: {NAN}", "NaN", ValueError),
    C("gn eps<0", lambda L: L.nn.GroupNorm(2, 4, eps=-1e-3)(small_variance(2, 4, 3)), ("-0.001",),
      f"as LayerNorm: {NAN}", "NaN", ValueError),
    C("rms eps<0", lambda L: L.nn.RMSNorm(5, eps=-1e-3)(x(4, 5) * 1e-3), ("-0.001",),
      f"negative eps takes the mean square + eps below 0 on small rows: {NAN}", "NaN", ValueError),
    C("in eps<0", lambda L: L.nn.InstanceNorm1d(3, eps=-1e-3)(small_variance(2, 3, 5)), ("-0.001",),
      f"as LayerNorm (torch checks eps only in batch_norm): {NAN}", "NaN", ValueError),
    C("ln eps=0, constant row", lambda L: L.nn.LayerNorm(5, eps=0.0)(constant_first_row(4, 5)), ("eps=0", "zero variance"),
      f"0 / sqrt(0 + 0): {NAN}", "NaN", ValueError),
    C("gn eps=0, constant group", lambda L: L.nn.GroupNorm(2, 4, eps=0.0)(constant_first_row(2, 4, 3)),
      ("eps=0", "zero variance"), f"0 / sqrt(0 + 0): {NAN}", "NaN", ValueError),
    C("rms eps=0, zero row", lambda L: L.nn.RMSNorm(5, eps=0.0)(constant_first_row(4, 5) * 0), ("eps=0",),
      f"0 / sqrt(0 + 0): {NAN}", "NaN", ValueError),
    C("bn eval eps=0, a running_var of 0", lambda L: L.F.batch_norm(x(4, 3), zeros(3), torch.tensor([1.0, 0.0, 1.0]),
                                                                    eps=0.0), ("eps=0", "zero variance"),
      f"(x - mean) / sqrt(0 + 0): {NAN}", "NaN", ValueError),
    C("in eval eps=0, a running_var of 0", lambda L: L.F.instance_norm(x(2, 3, 4), zeros(3), torch.tensor([1.0, 0.0, 1.0]),
                                                                       use_input_stats=False, eps=0.0),
      ("eps=0", "zero variance"), f"as BatchNorm in evaluation: {NAN}", "NaN", ValueError),
    C("lrn int64 input", lambda L: L.F.local_response_norm(x(2, 3, 4).long(), 2), ("int64",),
      "torch averages the window of an int64 input with integer (floor) division, a silently wrong value; "
      "normcode refuses integer input as every other norm does (and as torch does for int32)",
      "a value", NotImplementedError),
    C("lrn rank 5, trailing dims not viewable", lambda L: L.F.local_response_norm(x(2, 3, 2, 4, 5).transpose(3, 4), 3),
      (), "torch's local_response_norm flattens the trailing dims with .view and fails on this (valid) layout; "
      "normcode computes the answer (checked against torch on a contiguous copy in test_parity)",
      RuntimeError, "a value"),
]

# Good edge inputs: neither side raises, and the values agree.
GOOD = [
    C("bn eval, N=1", lambda L: L.nn.BatchNorm1d(3).eval()(x(1, 3))),
    C("bn training, N=1 with 2 positions", lambda L: L.nn.BatchNorm1d(3)(x(1, 3, 2))),
    C("bn training, N=0", lambda L: L.nn.BatchNorm2d(3)(x(0, 3, 2, 2))),
    C("bn eval, N=0", lambda L: L.nn.BatchNorm1d(3).eval()(x(0, 3))),
    C("bn training, C=0", lambda L: L.F.batch_norm(x(2, 0), None, None, training=True)),
    C("bn eval eps=0", lambda L: L.F.batch_norm(x(4, 3), zeros(3), ones(3), eps=0.0)),
    C("bn untracked, no affine: channels != num_features",
      lambda L: L.nn.BatchNorm1d(5, track_running_stats=False, affine=False)(x(4, 3))),
    C("bn f16 input, f32 module", lambda L: L.nn.BatchNorm1d(3)(x(4, 3, dtype=torch.float16))),
    C("in eval tracked, one spatial element", lambda L: L.nn.InstanceNorm1d(3, track_running_stats=True).eval()(x(2, 3, 1))),
    C("F.instance_norm (N, C) with running stats", lambda L: L.F.instance_norm(x(4, 3), zeros(3), ones(3),
                                                                              use_input_stats=False)),
    C("in eps=0, constant instance (torch defines 1/sqrt(0) as 0 here)",
      lambda L: L.nn.InstanceNorm1d(3, eps=0.0, affine=True)(constant_first_row(2, 3, 4))),
    C("in N=0", lambda L: L.F.instance_norm(x(0, 3, 4))),
    C("in f32 input, f64 running stats", lambda L: L.F.instance_norm(x(2, 3, 4), zeros(3, dtype=torch.float64),
                                                                     ones(3, dtype=torch.float64))),
    C("in f16 input, f32 tracked affine module",
      lambda L: L.nn.InstanceNorm1d(3, affine=True, track_running_stats=True)(x(2, 3, 4, dtype=torch.float16))),
    C("ln eps=0, non-constant rows", lambda L: L.nn.LayerNorm(5, eps=0.0)(x(4, 5))),
    C("ln (3, 0) input, normalized_shape (0,)", lambda L: L.F.layer_norm(x(3, 0), (0,))),
    C("ln empty batch", lambda L: L.nn.LayerNorm(5)(x(0, 5))),
    C("ln bf16 input, f32 module", lambda L: L.nn.LayerNorm(5)(x(4, 5, dtype=torch.bfloat16))),
    C("gn (1, 4), G=2", lambda L: L.nn.GroupNorm(2, 4)(x(1, 4))),
    C("gn N=0", lambda L: L.F.group_norm(x(0, 4, 3), 2)),
    C("gn no affine, channels != num_channels", lambda L: L.nn.GroupNorm(2, 4, affine=False)(x(2, 6, 3))),
    C("gn f16 input, f32 module", lambda L: L.nn.GroupNorm(2, 4)(x(2, 4, 3, dtype=torch.float16))),
    C("rms eps=0, non-zero rows", lambda L: L.nn.RMSNorm(5, eps=0.0)(x(4, 5))),
    C("rms f64 input, f32 weight", lambda L: L.F.rms_norm(x(2, 3, dtype=torch.float64), (3,), ones(3) * 1.5)),
    C("rms f32 input, f16 weight", lambda L: L.F.rms_norm(x(2, 3), (3,), ones(3, dtype=torch.float16) * 1.5)),
    C("rms N=0", lambda L: L.nn.RMSNorm(5)(x(0, 5))),
    C("lrn N=0", lambda L: L.nn.LocalResponseNorm(2)(x(0, 3, 4))),
    C("lrn size > C", lambda L: L.nn.LocalResponseNorm(7)(x(2, 3, 4))),
]


def outcome(call, L):
    """(exception or None, result or None, warnings) of ``call(L)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return None, call(L), caught
        except Exception as e:               # noqa: BLE001 - the class is what is compared
            return e, None, caught


def _ids(cases):
    return [c.id for c in cases]


@pytest.mark.parametrize("case", BAD, ids=_ids(BAD))
def test_raises_like_torch(case):
    e_theirs, _, _ = outcome(case.call, TORCH)
    e_ours, _, _ = outcome(case.call, OURS)
    assert e_theirs is not None, "torch accepts this: move it to GOOD"
    assert e_ours is not None, f"torch raises {type(e_theirs).__name__}: {e_theirs}; normcode does not"
    assert type(e_ours) is type(e_theirs), f"torch: {e_theirs!r}\nnormcode: {e_ours!r}"
    for name in case.names:
        assert name in str(e_ours), f"normcode's message does not name {name!r}: {e_ours}"


@pytest.mark.parametrize("case", GOOD, ids=_ids(GOOD))
def test_good_edge_inputs_match_torch(case):
    e_theirs, y_theirs, w_theirs = outcome(case.call, TORCH)
    e_ours, y_ours, w_ours = outcome(case.call, OURS)
    assert e_theirs is None, f"torch raises {e_theirs!r}: move it to BAD"
    assert e_ours is None, f"normcode raises {e_ours!r} where torch computes"
    # Good input is silent. (torch warns once per process, about its fused kernel, when rms_norm's
    # weight dtype differs from the input's; normcode has no such kernel and does not.)
    assert not w_ours, [str(w.message) for w in w_ours]
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-6}.get(y_theirs.dtype, 1e-12)
    torch.testing.assert_close(y_ours, y_theirs, rtol=tol, atol=tol)
    assert not y_ours.isnan().any()


@pytest.mark.parametrize("case", DEVIATIONS, ids=_ids(DEVIATIONS))
def test_intended_deviations(case):
    """Each deviation as stated: what torch gives, what normcode gives instead, and why."""
    assert case.deviation and case.torch_gives and case.ours_gives
    e_theirs, y_theirs, _ = outcome(case.call, TORCH)
    e_ours, y_ours, _ = outcome(case.call, OURS)
    if case.torch_gives == "NaN":
        assert e_theirs is None and y_theirs.isnan().any(), "torch no longer gives NaN here"
    elif case.torch_gives == "a value":
        assert e_theirs is None and not y_theirs.isnan().any()
    else:
        assert type(e_theirs) is case.torch_gives, repr(e_theirs)
    if case.ours_gives == "a value":
        assert e_ours is None, repr(e_ours)
        assert not y_ours.isnan().any()
    else:
        assert type(e_ours) is case.ours_gives, repr(e_ours)
        for name in case.names:
            assert name in str(e_ours), f"normcode's message does not name {name!r}: {e_ours}"


WARN = [
    C("in channels != num_features, affine=False", lambda L: L.nn.InstanceNorm1d(5)(x(2, 3, 4)), ("dim=1",)),
    C("in unbatched channels != num_features, affine=False", lambda L: L.nn.InstanceNorm3d(5)(x(3, 2, 2, 2)),
      ("dim=0",)),
]


@pytest.mark.parametrize("case", WARN, ids=_ids(WARN))
def test_warns_like_torch(case):
    e_theirs, y_theirs, w_theirs = outcome(case.call, TORCH)
    e_ours, y_ours, w_ours = outcome(case.call, OURS)
    assert e_theirs is None and e_ours is None
    assert [w.category for w in w_theirs] == [UserWarning]
    assert [w.category for w in w_ours] == [UserWarning]
    for name in case.names:
        assert name in str(w_ours[0].message)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-6, atol=1e-6)

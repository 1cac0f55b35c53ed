"""Masked batch norm against torch.nn.BatchNorm1d applied to the real positions only.

The reference is exact: gather the real positions of a padded (N, C, L) batch into one (n, C)
batch, run torch.nn.BatchNorm1d on it, scatter back. Every case runs several training or eval
steps in float64, with fresh lengths and NaN padding each step, and compares outputs, input
gradients, parameter gradients and buffers.
"""
import copy

import pytest
import torch

import normcode
from normcode.masked import MaskedBatchNorm1d, masked_batch_norm, pack_real, unpack_real
from normcode.testing import assert_matches_torch, randomize_

TOL = {"rtol": 1e-10, "atol": 1e-12}         # float64: the two sides sum in different orders

#: One row per case: the constructor options, the mode, and the (N, C, L) layout.
CASES = {
    "train": dict(kwargs={}, train=True, shape=(5, 4, 9)),
    "eval": dict(kwargs={}, train=False, shape=(5, 4, 9)),
    "cumulative momentum": dict(kwargs={"momentum": None}, train=True, shape=(3, 2, 6)),
    "momentum 0.5": dict(kwargs={"momentum": 0.5}, train=True, shape=(3, 2, 6)),
    "no affine": dict(kwargs={"affine": False}, train=True, shape=(4, 3, 5)),
    "no bias": dict(kwargs={"bias": False}, train=True, shape=(4, 3, 5)),
    "untracked, train": dict(kwargs={"track_running_stats": False}, train=True, shape=(4, 3, 5)),
    "untracked, eval": dict(kwargs={"track_running_stats": False}, train=False, shape=(4, 3, 5)),
    "one sequence": dict(kwargs={}, train=True, shape=(1, 3, 12)),
    "(N, C) input, mask (N,)": dict(kwargs={}, train=True, shape=(8, 3)),
}


def random_mask(shape, generator):
    """A (N, L) mask of real prefixes of random lengths (at least 2 real positions in all),
    or for an (N, C) input a (N,) mask with at least 2 samples kept."""
    N, L = shape[0], shape[2] if len(shape) == 3 else None
    while True:
        if L is None:
            mask = torch.rand(N, generator=generator) < 0.7
        else:
            lengths = torch.randint(0, L + 1, (N,), generator=generator)
            mask = torch.arange(L) < lengths[:, None]                   # (N, L)
        if mask.sum() >= 2:
            return mask


def padded_input(shape, mask, generator):
    """Random values at real positions, NaN at padded ones: the padding must never be read."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1
    return x.masked_fill(~mask.unsqueeze(1), float("nan"))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_batchnorm1d_on_the_real_positions(case):
    g = torch.Generator().manual_seed(0)
    theirs = randomize_(torch.nn.BatchNorm1d(case["shape"][1], **case["kwargs"]), g).double()
    ours = MaskedBatchNorm1d(case["shape"][1], **case["kwargs"]).double()
    ours.load_state_dict(theirs.state_dict())
    ours.train(case["train"])
    theirs.train(case["train"])
    for step in range(4):
        mask = random_mask(case["shape"], g)
        x = padded_input(case["shape"], mask, g)
        x_ours = x.clone().requires_grad_(True)
        x_real = pack_real(x, mask).detach().requires_grad_(True)          # (n, C)
        y_ours, y_real = ours(x_ours, mask), theirs(x_real)

        torch.testing.assert_close(y_ours, unpack_real(y_real, mask), **TOL)  # padded outputs are 0
        dy = torch.randn(y_ours.shape, generator=g, dtype=torch.float64)  # padded dy must be ignored
        y_ours.backward(dy)
        y_real.backward(pack_real(dy, mask))
        torch.testing.assert_close(x_ours.grad, unpack_real(x_real.grad, mask), **TOL)
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=f"step {step}: grad of {name}")
        for (name, b), c in zip(ours.named_buffers(), theirs.buffers()):
            torch.testing.assert_close(b, c, **TOL, msg=f"step {step}: buffer {name}")
        ours.zero_grad()
        theirs.zero_grad()


class AllReal(MaskedBatchNorm1d):
    """MaskedBatchNorm1d with an all-True mask, callable with one argument like BatchNorm1d."""

    def forward(self, input):
        mask = torch.ones((input.shape[0],) + input.shape[2:], dtype=torch.bool)
        return super().forward(input, mask)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 4, 5), (7, 3)], ids=["NCL", "NC"])
def test_an_all_true_mask_is_batchnorm1d(shape, train):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for kwargs in ({}, {"momentum": None}, {"affine": False}):
        assert_matches_torch(AllReal(shape[1], **kwargs), torch.nn.BatchNorm1d(shape[1], **kwargs),
                             x, train=train, steps=3)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_padding_changes_nothing(train):
    """The same sequences padded to two lengths, with different padding values: equal real
    outputs, gradients and running statistics; zero output and gradient at every pad."""
    g = torch.Generator().manual_seed(1)
    lengths, C = torch.tensor([6, 2, 9, 4]), 5
    real = torch.randn(len(lengths), C, int(lengths.max()), generator=g, dtype=torch.float64)
    layer = randomize_(MaskedBatchNorm1d(C), g).double().train(train)
    results = []
    for L, pad in ((9, 0.0), (40, float("nan")), (17, 1e6)):
        mask = torch.arange(L) < lengths[:, None]
        x = torch.full((len(lengths), C, L), pad, dtype=torch.float64)
        x[:, :, :9] = real
        x = x.masked_fill(~mask.unsqueeze(1), pad).requires_grad_(True)
        copy_ = copy.deepcopy(layer)
        y = copy_(x, mask)
        y.backward(torch.ones_like(y).cumsum(-1))
        assert torch.equal(y[~mask.unsqueeze(1).expand_as(y)], torch.zeros_like(y)[~mask.unsqueeze(1).expand_as(y)])
        assert not x.grad[~mask.unsqueeze(1).expand_as(x)].any()
        results.append((pack_real(y, mask), pack_real(x.grad, mask), copy_.running_mean, copy_.running_var))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, **TOL)


def test_float32_input_matches_torch_in_float32():
    g = torch.Generator().manual_seed(2)
    mask = random_mask((6, 4, 11), g)
    x = padded_input((6, 4, 11), mask, g).float()
    theirs = randomize_(torch.nn.BatchNorm1d(4), g)
    ours = MaskedBatchNorm1d(4)
    ours.load_state_dict(theirs.state_dict())
    y = ours(x, mask)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, unpack_real(theirs(pack_real(x, mask)), mask))
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_gradcheck():
    g = torch.Generator().manual_seed(3)
    mask = random_mask((3, 2, 5), g)
    x = torch.randn(3, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: masked_batch_norm(x, mask, None, None, w, b, training=True)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


#: Bad input: (input shape, mask, training, the exception, a phrase its message must contain).
_N, _C, _L = 2, 3, 4
ERRORS = {
    "mask shape": ((_N, _C, _L), torch.ones(_N, _L + 1, dtype=torch.bool), True, ValueError, "does not fit"),
    "mask with C": ((_N, _C, _L), torch.ones(_N, _C, _L, dtype=torch.bool), True, ValueError, "does not fit"),
    "int mask": ((_N, _C, _L), torch.ones(_N, _L, dtype=torch.long), True, TypeError, "bool"),
    "float mask": ((_N, _C, _L), torch.ones(_N, _L), False, TypeError, "bool"),
    "list mask": ((_N, _C, _L), [[True] * _L] * _N, True, TypeError, "bool"),
    "one real position": ((_N, _C, _L), torch.arange(_N * _L).reshape(_N, _L) == 0, True, ValueError, "at least 2"),
    "no real position": ((_N, _C, _L), torch.zeros(_N, _L, dtype=torch.bool), True, ValueError, "at least 2"),
    "1D input": ((_C,), torch.ones(1, dtype=torch.bool), True, ValueError, "at least 2 dimensions"),
    "eval without running stats": ((_N, _C, _L), torch.ones(_N, _L, dtype=torch.bool), False,
                                   RuntimeError, "must be defined"),
}


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
def test_bad_input_raises(case):
    shape, mask, training, error, phrase = case
    with pytest.raises(error, match=phrase):
        masked_batch_norm(torch.randn(shape), mask, None, None, training=training)


@pytest.mark.parametrize("training, eps", [(True, 0.0), (True, -1e-5), (False, -1e-5)])
def test_bad_eps_raises(training, eps):
    x, mask = torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="eps must be"):
        masked_batch_norm(x, mask, torch.zeros(3), torch.ones(3), training=training, eps=eps)


def test_module_errors():
    layer = MaskedBatchNorm1d(3)
    with pytest.raises(ValueError, match="2D or 3D"):
        layer(torch.randn(2, 3, 4, 5), torch.ones(2, 4, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="should contain 5 elements"):
        layer(torch.randn(2, 5, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(NotImplementedError):
        layer(torch.ones(2, 3, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
    one_real = torch.zeros(2, 4, dtype=torch.bool)
    one_real[0, 0] = True
    layer.eval()                                   # eval normalizes with the running estimates
    y = layer(torch.randn(2, 3, 4), one_real)
    assert torch.isfinite(y).all() and not y[:, :, 1:].any()


def test_state_dict_is_batchnorm1ds():
    ours, theirs = MaskedBatchNorm1d(5, momentum=None), torch.nn.BatchNorm1d(5, momentum=None)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs).replace("BatchNorm1d", "MaskedBatchNorm1d")
    theirs.load_state_dict(randomize_(ours).state_dict())
    assert normcode.MaskedBatchNorm1d is MaskedBatchNorm1d
    assert normcode.masked_batch_norm is masked_batch_norm


def test_uses_no_torch_normalization_routine():
    import inspect

    import normcode.masked as module

    source = inspect.getsource(module)
    for forbidden in ("F.batch_norm", "torch.batch_norm", "torch.native", "layer_norm(",
                      "group_norm(", "instance_norm(", "rms_norm("):
        assert forbidden not in source, forbidden

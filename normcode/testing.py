"""The checks every chapter and test uses to hold normcode to torch.nn."""
import copy

import torch


def randomize_(module, generator=None):
    """Give ``module`` random parameters and buffers in place, never the ones/zeros defaults.

    Defaults hide bugs: with gamma = 1 and beta = 0 a swapped weight and bias still passes. Weights
    and variances are drawn positive and away from 0, ``num_batches_tracked`` a small count.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            draw = torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5 if "weight" in name \
                else torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.copy_(draw)
        for name, b in module.named_buffers():
            if name.endswith("num_batches_tracked"):
                b.fill_(int(torch.randint(1, 10, (), generator=g)))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=torch.float64) + 0.5)
            elif b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=g, dtype=torch.float64))
    return module


def _report(what, ours, theirs, rtol, atol, diffs):
    if ours is None or theirs is None:
        if ours is not theirs:
            raise AssertionError(f"{what}: one side is None (ours: {ours is None}, torch's: {theirs is None})")
        return
    if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
        raise AssertionError(f"{what}: ours has shape {tuple(ours.shape)} and dtype {ours.dtype}, "
                             f"torch's {tuple(theirs.shape)} and {theirs.dtype}")
    if ours.numel():
        diffs[what] = (ours.double() - theirs.double()).abs().max().item()
    try:
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol, equal_nan=False)
    except AssertionError as e:
        raise AssertionError(f"{what} differs from torch.nn's:\n{e}") from None


def assert_same_layout(ours, theirs, what="output"):
    """Assert that two tensors of one shape lie in memory alike: equal strides on every dim longer
    than 1 (a stride along a dim of size 1 is never used, and torch leaves it arbitrary)."""
    used = [d for d, n in enumerate(theirs.shape) if n > 1]
    if ours.shape != theirs.shape or [ours.stride(d) for d in used] != [theirs.stride(d) for d in used]:
        raise AssertionError(f"{what}: ours has strides {ours.stride()}, torch's {theirs.stride()} "
                             f"(shape {tuple(theirs.shape)}): a different memory format")


def assert_matches_torch(ours, theirs, x, *, train=True, steps=3, dtype=torch.float64,
                         rtol=1e-10, atol=1e-12, seed=0, grad_rtol=None, grad_atol=None):
    """Assert that normcode module ``ours`` computes what torch.nn module ``theirs`` computes.

    Works on copies: gives the torch module random (never default) parameters and buffers,
    copies them into ours, casts both and ``x`` to ``dtype`` (float64 by default), and runs
    ``steps`` forward and backward passes in training (``train=True``) or evaluation mode, on ``x``
    and then on fresh random inputs of its shape. After each step it compares the output, the
    input gradient, every parameter gradient and every buffer (running statistics included), and
    that the output has torch's memory format (channels_last in, channels_last out, where torch does so).

    ``rtol`` and ``atol`` bound every comparison; ``grad_rtol`` and ``grad_atol``, where given,
    replace them for the gradients, which in float16/bfloat16 are sums over the whole batch whose
    rounding error scales with the summed terms rather than with the (cancelled) result.

    Raises AssertionError naming what differs. Returns the largest absolute difference seen for
    each compared quantity, as a dict.
    """
    g = torch.Generator().manual_seed(seed)
    theirs = randomize_(copy.deepcopy(theirs), g).to(dtype)
    ours = copy.deepcopy(ours).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    ours.train(train)
    theirs.train(train)
    x = x.detach().to(dtype)
    diffs = {}
    for step in range(steps):
        if step:                                           # later steps: new data, same layout
            x = torch.empty_like(x).copy_(torch.randn(x.shape, generator=g, dtype=dtype) * 2 + 1)  # any device
        x_ours = x.clone().requires_grad_(True)
        x_theirs = x.clone().requires_grad_(True)
        y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
        _report(f"step {step}: output", y_ours, y_theirs, rtol, atol, diffs)
        assert_same_layout(y_ours, y_theirs, f"step {step}: output")
        dy = torch.randn(y_theirs.shape, generator=g, dtype=dtype).to(y_theirs.device)
        if y_ours.requires_grad:
            y_ours.backward(dy)
        if y_theirs.requires_grad:
            y_theirs.backward(dy)
        g_rtol = rtol if grad_rtol is None else grad_rtol
        g_atol = atol if grad_atol is None else grad_atol
        _report(f"step {step}: input gradient", x_ours.grad, x_theirs.grad, g_rtol, g_atol, diffs)
        named = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            _report(f"step {step}: gradient of {name}", p.grad, named[name].grad, g_rtol, g_atol, diffs)
        theirs_buffers = dict(theirs.named_buffers())
        ours_buffers = dict(ours.named_buffers())
        if ours_buffers.keys() != theirs_buffers.keys():
            raise AssertionError(f"buffers differ: ours {sorted(ours_buffers)}, torch's {sorted(theirs_buffers)}")
        for name, b in ours_buffers.items():
            _report(f"step {step}: buffer {name}", b, theirs_buffers[name], rtol, atol, diffs)
        ours.zero_grad()
        theirs.zero_grad()
    return diffs


def jacobian_statistic_groups(fn, x):
    """Which elements of ``x`` share statistics under ``fn``, read off its Jacobian's sparsity.

    For a normalization, output i depends on input j exactly when i and j belong to one
    statistics set (the mean and variance couple them). Returns a boolean (numel, numel) matrix
    ``same[i, j]``. Use a float64 input with distinct random values, so no entry vanishes by chance.
    """
    jac = torch.autograd.functional.jacobian(fn, x.detach().double())
    jac = jac.reshape(x.numel(), x.numel())
    return jac.abs() > 1e-12


def same_statistic_matrix(ids):
    """The boolean (numel, numel) relation "shares a statistic" from :func:`normcode.statistic_ids`."""
    flat = ids.reshape(-1)
    return flat[:, None] == flat[None, :]

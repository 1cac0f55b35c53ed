r"""Measurements behind the chapters on gradients, numerics, and RMSNorm and LRN.

Everything here is deterministic (seeded, single-threaded where torch's result depends on the
thread count) and returns plain Python numbers or tensors; the chapters print, plot and assert
them.

- :func:`backward_memory`: what a forward keeps for its backward, counted through
  ``torch.autograd.graph.saved_tensors_hooks``, and how many autograd nodes it records.
- :func:`gradient_cases` and :func:`forward_backward`: the table of norms the gradients
  chapter checks against autograd and ``torch.nn``.
- :func:`batchnorm1d_error`: ``torch.nn.BatchNorm1d``'s float32 error on an ``(N, C)`` input
  against the batch size N and the mean of the data, beside the same numbers laid out as
  ``(1, C, N)`` and beside normcode.
- :func:`saved_mean_ulps`: how far torch's float32 LayerNorm and GroupNorm means are from the
  exact mean, in units in the last place.
- :func:`half_precision_ulps`: the error, in ulps, of float16/bfloat16 norms.
- :func:`count_ops`: the aten operations a call runs (a ``TorchDispatchMode``).
- :func:`variance_study`: four variance algorithms and two norms, float32 against float64.
- :func:`draw_graph`: the computation graph figure of the gradients chapter.
"""
import contextlib

import torch
import torch.nn.functional as TF

from .. import variance
from torch.utils._python_dispatch import TorchDispatchMode

from .. import BatchNorm1d
from .. import functional as NF

__all__ = ["single_thread", "backward_memory", "autograd_nodes", "gradient_cases",
           "forward_backward", "batchnorm1d_error", "saved_mean_ulps", "float32_spacing",
           "half_precision_ulps", "count_ops", "backward_table",
           "variance_study", "draw_graph"]


@contextlib.contextmanager
def single_thread():
    """Run the block with one intra-op thread (torch's CPU reductions split work by thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# What a backward keeps
# --------------------------------------------------------------------------------------------
def autograd_nodes(output):
    """The number of autograd nodes recorded behind ``output`` (leaf accumulators excluded)."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(type(node).__name__ != "AccumulateGrad" for node in seen)


def backward_memory(call, x, *params):
    """Run ``call(x, *params)`` and describe what autograd keeps for the backward.

    Returns a dict: ``bytes_per_element`` (all saved storages, each counted once, over
    ``x.numel()``), ``full_size`` (how many saved storages hold at least ``x.numel()``
    elements: the input itself counts when it is kept), ``nodes`` (autograd nodes recorded).
    """
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = (storage.nbytes(), storage.nbytes() // t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = call(x, *params)
    return dict(
        bytes_per_element=sum(nbytes for nbytes, _ in storages.values()) / x.numel(),
        full_size=sum(numel >= x.numel() for _, numel in storages.values()),
        nodes=autograd_nodes(y),
    )


# --------------------------------------------------------------------------------------------
# The gradients chapter's table of norms
# --------------------------------------------------------------------------------------------
def gradient_cases(C):
    """``{name: (parameter shape for an input x, call(F, x, weight, bias, running))}``.

    ``F`` is a functional module (``normcode.functional``, ``normcode.manual`` or
    ``torch.nn.functional``); ``running`` is ``[running_mean, running_var]``.
    """
    per_channel = {                 # weight and bias of shape (C,)
        "batch_norm, training": lambda F, x, w, b, s: F.batch_norm(x, *s, w, b, True, 0.1),
        "batch_norm, eval": lambda F, x, w, b, s: F.batch_norm(x, *s, w, b, False),
        "instance_norm": lambda F, x, w, b, s: F.instance_norm(x, *s, w, b, True, 0.1),
        "instance_norm, running statistics":
            lambda F, x, w, b, s: F.instance_norm(x, *s, w, b, False),
        "group_norm, G = 2": lambda F, x, w, b, s: F.group_norm(x, 2, w, b),
    }
    cases = {name: (lambda x: (C,), call) for name, call in per_channel.items()}
    cases["layer_norm"] = (
        lambda x: x.shape[1:], lambda F, x, w, b, s: F.layer_norm(x, x.shape[1:], w, b))
    cases["rms_norm"] = (
        lambda x: x.shape[2:], lambda F, x, w, b, s: F.rms_norm(x, x.shape[2:], w))
    return cases


def forward_backward(F, call, x, w, b, running, dy):
    """``[y, dx, dweight, dbias, running_mean, running_var]`` of one forward and backward."""
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    running = [s.clone() for s in running]
    y = call(F, x, w, b, running)
    y.backward(dy)
    return [y, x.grad, w.grad, b.grad, *running]


# --------------------------------------------------------------------------------------------
# torch.nn's float32 statistics
# --------------------------------------------------------------------------------------------
def float32_spacing(exact):
    """The gap between the float32 value nearest to ``exact`` (float64) and the next one up."""
    nearest = exact.float()
    return (torch.nextafter(nearest, torch.tensor(float("inf"))).double() - nearest.double())


def batchnorm1d_error(sizes, means, channels=16, std=3.0, seed=0):
    """``torch.nn.BatchNorm1d``'s float32 error against the batch size and the mean.

    For each mean, ``max(sizes)`` samples of ``channels`` features (float32 numbers drawn
    around ``mean`` with standard deviation ``std``); the first N of them form the batch of
    size N. Measured with one thread. Returns ``{key: tensor (len(means), len(sizes))}``:

    - ``"(N, C)"``: max |output - exact| of ``BatchNorm1d`` in training on the (N, C) batch;
    - ``"(1, C, N)"``: the same numbers laid out as one sample of length N;
    - ``"normcode"``: ``normcode.BatchNorm1d`` on the (N, C) batch, for the last mean only
      (NaN for the others);
    - ``"running_var"``: the relative error of torch's ``running_var`` after that one step
      (``momentum=1``: the unbiased batch variance).

    "exact" is the float64 computation on the same float32 numbers.
    """
    generator = torch.Generator().manual_seed(seed)
    keys = ("(N, C)", "(1, C, N)", "normcode", "running_var")
    out = {key: torch.full((len(means), len(sizes)), float("nan"), dtype=torch.float64)
           for key in keys}
    with single_thread():
        for i, mean in enumerate(means):
            data = torch.randn(max(sizes), channels, generator=generator) * std + mean
            for j, n in enumerate(sizes):
                x = data[:n]
                x64 = x.double()
                var = x64.var(0, correction=0)
                exact = (x64 - x64.mean(0)) / torch.sqrt(var + 1e-5)
                error = lambda y: (y.double() - exact).abs().max().item()
                bn = torch.nn.BatchNorm1d(channels, momentum=1.0)
                out["(N, C)"][i, j] = error(bn(x))
                unbiased = var * n / (n - 1)
                out["running_var"][i, j] = ((bn.running_var.double() - unbiased).abs()
                                            / unbiased).max().item()
                as_length = x.T.contiguous().unsqueeze(0)             # (1, C, N)
                y = TF.batch_norm(as_length, None, None, training=True)
                out["(1, C, N)"][i, j] = error(y[0].T)
                if i == len(means) - 1:                        # normcode: the last mean only
                    out["normcode"][i, j] = error(NF.batch_norm(x, None, None, training=True))
    return out


def saved_mean_ulps(rows=8, size=2**20, mean=1e4, seed=0):
    """How far torch's float32 LayerNorm and GroupNorm means are from the exact mean, in ulps.

    ``rows`` rows of ``size`` float32 values around ``mean`` (standard deviation 1); the
    exact mean is the float64 mean of the same float32 numbers, and an ulp is the float32
    spacing there. A mean accumulated in float64 and rounded once is within 0.5 ulp.
    Returns ``{"LayerNorm": [...], "GroupNorm": [...], "torch.mean": [...]}``, per row.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, size, generator=generator) + mean
    exact = x.double().mean(1)
    ulp = float32_spacing(exact)
    with single_thread():
        _, ln_mean, _ = torch.native_layer_norm(x, (size,), None, None, 1e-5)
        grouped = x.reshape(rows, 16, size // 16)                 # G = 1: one group per row
        _, gn_mean, _ = torch.native_group_norm(grouped, None, None, rows, 16, size // 16,
                                                1, 1e-5)
        plain = x.mean(1)
    ulps = lambda m: ((m.double().reshape(-1) - exact).abs() / ulp).tolist()
    return {"LayerNorm": ulps(ln_mean), "GroupNorm": ulps(gn_mean), "torch.mean": ulps(plain)}


def half_precision_ulps(layers, dtypes, means, shape=(16, 256), seed=0):
    """Max error in ulps of each layer's half-precision output against float64.

    ``layers``: ``{name: call(F, x)}``. Returns ``{(dtype, mean, name, side): ulps}`` with
    side ``"torch.nn"`` or ``"normcode"``. An ulp is the format's epsilon times
    ``max(|exact|, 1)``: the spacing at the exact value, or at 1 below 1.
    """
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for dtype in dtypes:
        for mean in means:
            x = (torch.randn(shape, generator=generator) + mean).to(dtype)
            for name, layer in layers.items():
                exact = layer(TF, x.double())
                ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=1)
                for side, F in (("torch.nn", TF), ("normcode", NF)):
                    y = layer(F, x)
                    assert y.dtype == dtype
                    result[dtype, mean, name, side] = (
                        ((y.double() - exact).abs() / ulp).max().item())
    return result


# --------------------------------------------------------------------------------------------
# Counting operations
# --------------------------------------------------------------------------------------------
class _CountOps(TorchDispatchMode):
    """Records the name of every aten operation that runs inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def count_ops(call):
    """The names of the aten operations ``call()`` runs, in order."""
    with _CountOps() as log:
        call()
    return log.ops


def backward_table(cases, implementations):
    """:func:`backward_memory` for every case and functional.

    ``cases``: ``{name: (input, parameter shape, call(F, x, weight, bias))}``;
    ``implementations``: ``{name: F}``. Weights are random (``rand + 0.5``), biases
    ``randn``, drawn from the global generator in table order. Returns
    ``{(case, implementation): {measure: value}}``.
    """
    measured = {}
    for name, (x, shape, call) in cases.items():
        x = x.clone().requires_grad_()
        w = (torch.rand(shape) + 0.5).requires_grad_()
        b = torch.randn(shape).requires_grad_()
        for impl, F in implementations.items():
            f = lambda x, w, b: call(F, x, w, b)
            measured[name, impl] = backward_memory(f, x, w, b)
    return measured


# --------------------------------------------------------------------------------------------
# The numerics chapter's first study
# --------------------------------------------------------------------------------------------
def variance_study(x):
    """Float32 variances and normalized outputs of ``x`` (M, K), one set per column.

    Returns ``(var_error, output_error, ulps_off)``:

    - ``var_error[name]``: per column, the relative error of the variance of four algorithms
      (naive, two-pass, Welford, Chan over 8 chunks) and of ``torch.nn.BatchNorm1d`` and
      ``normcode.BatchNorm1d`` (read from ``running_var`` after one step with
      ``momentum=1``, Bessel's factor undone), against the float64 variance of the same
      float32 numbers;
    - ``output_error["torch.nn BatchNorm1d"]`` etc.: per column, the largest error of the
      normalized output of batch_norm (a set per column) and layer_norm (the same sets as
      rows), against the float64 computation;
    - ``ulps_off[...]``: per element, how many float32 steps the output is from the float64
      result correctly rounded (the gap of the int32 bit patterns; the signs agree).

    torch is run with one thread: its (N, C) BatchNorm sums per thread.
    """
    M, K = x.shape
    reference = x.double().var(0, correction=0)

    def relative_error(var):
        return (var.double().reshape(-1) - reference).abs() / reference

    def module_variance(module):
        with single_thread():
            module(x)                                      # momentum=1: the batch variance
        return module.running_var * (M - 1) / M            # undo Bessel's correction

    var_error = {
        "naive E[x²] − E[x]²": relative_error(variance.naive_var(x, 0)[1]),
        "two-pass": relative_error(variance.two_pass_var(x, 0)[1]),
        "Welford": relative_error(variance.welford_var(x, 0)[1]),
        "Chan (8 chunks)": relative_error(variance.chan_var(x, 0, chunks=8)[1]),
        "torch.nn.BatchNorm1d": relative_error(
            module_variance(torch.nn.BatchNorm1d(K, momentum=1.0))),
        "normcode.BatchNorm1d": relative_error(
            module_variance(BatchNorm1d(K, momentum=1.0))),
    }
    layers = {"BatchNorm1d": lambda F, x: F.batch_norm(x, None, None, training=True),
              "LayerNorm": lambda F, x: F.layer_norm(x.T, (M,)).T}
    output_error, ulps_off = {}, {}
    for name, layer in layers.items():
        exact = layer(TF, x.double())
        rounded = exact.float().view(torch.int32)
        for side, F in (("torch.nn", TF), ("normcode", NF)):
            with single_thread():
                y = layer(F, x)
            output_error[f"{side} {name}"] = (y.double() - exact).abs().amax(0)
            ulps_off[f"{side} {name}"] = (y.view(torch.int32) - rounded).abs()
    return var_error, output_error, ulps_off


# --------------------------------------------------------------------------------------------
# A figure
# --------------------------------------------------------------------------------------------
def draw_graph(ax, nodes, edges, highlight=("gamma", "beta")):
    """Draw boxes ``nodes`` ({name: (x, y, label)}) joined by arrows ``edges`` on ``ax``.

    Nodes named in ``highlight`` (the learnable parameters) are drawn orange, others blue.
    """
    boxes = {}
    for name, (x, y, label) in nodes.items():
        colour = "#fdf1e3" if name in highlight else "#eef3fb"
        boxes[name] = ax.text(x, y, label, ha="center", va="center", fontsize=12,
                              bbox=dict(boxstyle="round,pad=0.35", fc=colour, ec="#555"))
    ax.figure.canvas.draw()                     # lay the boxes out before arrows attach
    for a, b in edges:
        arrow = dict(arrowstyle="-|>", color="#444", shrinkA=1, shrinkB=1,
                     patchA=boxes[a].get_bbox_patch(), patchB=boxes[b].get_bbox_patch())
        ax.annotate("", xy=(0.5, 0.5), xycoords=boxes[b], xytext=(0.5, 0.5),
                    textcoords=boxes[a], arrowprops=arrow)
    ax.axis("off")

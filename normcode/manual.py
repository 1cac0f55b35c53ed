r"""The norms with hand-written backward passes, in :mod:`normcode.functional`'s signatures.

Each function here computes exactly what its namesake in :mod:`normcode.functional` computes
(the forward *is* that function: same checks, errors, running-statistics updates, output layout),
but through a ``torch.autograd.Function`` whose backward is derived by hand instead of
recorded by autograd. All of them are one mechanism: standardize over a statistics set, then a
per-channel or per-element affine,

.. math:: \hat{x} = (x - \mu)\, r, \quad r = \frac{1}{\sqrt{\sigma^2 + \epsilon}}, \qquad
          y = \gamma \hat{x} + \beta,

so one backward serves them all. With :math:`g = \partial L / \partial \hat{x} = \gamma\, \partial L / \partial y`
and means taken over the statistics set,

.. math:: \frac{\partial L}{\partial x} = r \left(g - \overline{g} - \hat{x}\, \overline{g \hat{x}}\right)
          \quad\text{(batch statistics)}, \qquad
          \frac{\partial L}{\partial x} = r\, g \quad\text{(fixed statistics)}.

RMSNorm is the same without the centring: drop :math:`\overline{g}` and :math:`\mu`.

What the backward keeps is the input (in its own dtype) and, per statistics set, the mean and
``r``; autograd through :mod:`normcode.functional` keeps one to three full-size intermediates
in the computation dtype (float64 for a float32 input on the CPU). The statistics are computed
once, in the forward, by the functional's own ``normcode.functional._shifted_sums`` (one pass
over the input on the CPU); the backward recomputes :math:`\hat{x}` from the saved input and
takes two sums per set. It runs in place on its own temporaries; when autograd records it
(``create_graph=True``, double backward) it is written in differentiable torch operations
instead, so that it has a derivative of its own.
"""
import contextlib
import math
from typing import Callable, NamedTuple, Optional

import torch

from . import _checks as check
from . import functional as F
from ._axes import set_size, statistics_view
from .functional import _channel_shape, _compute_dtype, _inverse_std, _moments, _rms_eps
# The forwards for the inputs the hand-written path leaves to them (empty, or without channels).
from .functional import batch_norm as _batch_norm, group_norm as _group_norm
from .functional import instance_norm as _instance_norm, layer_norm as _layer_norm
from .functional import local_response_norm as _local_response_norm
from .functional import rms_norm as _rms_norm

__all__ = ["batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm",
           "local_response_norm", "enabled", "standardize_backward", "saved_bytes"]

_enabled = False


@contextlib.contextmanager
def enabled(on=True):
    """Within this block normcode's layers compute with this module's functions: the same
    forward, the hand-written backward.

    ``BatchNorm*d``, ``InstanceNorm*d``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm`` and
    ``LocalResponseNorm`` call :mod:`normcode.functional`, whose backward autograd records
    operation by operation. Inside ``with normcode.manual.enabled():`` they call their
    namesakes here instead, in eager mode: a layer that ``torch.compile`` is tracing keeps
    :mod:`normcode.functional`, which inductor fuses. Direct calls to
    :mod:`normcode.functional` are unchanged. Like torch's backend flags it is one switch for
    the process, not per thread; ``enabled(False)`` turns it off inside an enabled block.
    ``torch.func`` transforms (``vmap``, ``grad``, ``jvp``) need the layers outside it: the
    autograd.Functions here define no ``setup_context``, ``vmap`` or ``jvp`` rule.
    """
    global _enabled
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


def standardize_backward(g, x_hat, r, dims, centre=True):
    r"""The gradient of :math:`\hat{x} = (x - \mu) r` with respect to ``x``, given ``g`` = dL/dx_hat.

    .. math:: \frac{\partial L}{\partial x} = r \left(g - \overline{g} - \hat{x}\,\overline{g\hat{x}}\right)

    Means over ``dims``, the statistics set. Through :math:`\mu` every element receives
    :math:`-\overline{g}`; through :math:`r` it receives :math:`-\hat{x}\,\overline{g\hat{x}}`.
    What is left is ``g`` with its mean and its component along :math:`\hat{x}` projected out.
    ``centre=False`` is RMSNorm's :math:`\hat{x} = x r`: no mean, so no :math:`\overline{g}` term.
    """
    along_x_hat = x_hat * (g * x_hat).mean(dims, keepdim=True)
    if centre:
        return r * (g - g.mean(dims, keepdim=True) - along_x_hat)
    return r * (g - along_x_hat)


# --------------------------------------------------------------------------------------------
# What a norm tells the one autograd.Function
# --------------------------------------------------------------------------------------------
class _Plan(NamedTuple):
    norm: str                         # the statistics set, as normcode._axes.statistics_view names it
    view_options: dict
    affine_shape: Optional[tuple]     # weight and bias as they broadcast on the input; None: per channel
    eps: float
    batch_stats: bool = True          # statistics from this input; False: fixed (running) estimates
    fixed: Optional[tuple] = None     # (running_mean, running_var) when not batch_stats
    update: Optional[Callable] = None  # (mean, var, count) -> None: moves the running estimates
    keeps_layout: bool = True         # channels_last in, channels_last out (False: contiguous out)

    def param_shape(self, input):
        return _channel_shape(input) if self.affine_shape is None else self.affine_shape

    @property
    def centre(self):
        return self.norm != "rms"

    @property
    def name(self):
        return f"{self.norm}_norm"

    def view(self, x):
        return statistics_view(x, self.norm, **self.view_options)

    def per_channel(self, statistic, input):
        """A statistic shaped for the view, shaped for the input: GroupNorm's (N, G, 1, ...) repeated
        for each group's channels, (N, C, 1, ...); the others' views are the input already."""
        if statistic is None or self.norm != "group":
            return statistic
        return F._per_channel(statistic, input)

    def set_sum(self, per_nc):
        """Sums of per-(sample, channel) partial sums ``(N, C, 1, ...)`` over each statistics set,
        broadcastable on the input (BatchNorm's over N; GroupNorm's over the group's channels)."""
        if self.norm == "batch":
            return per_nc.sum(0, keepdim=True)
        if self.norm == "group":
            N, C = per_nc.shape[:2]
            G = self.view_options["num_groups"]
            grouped = per_nc.reshape(N, G, C // G).sum(2, keepdim=True).expand(N, G, C // G)
            return grouped.reshape(per_nc.shape)
        return per_nc                                   # instance: one set per (n, c)


def _spatial_sum(t):
    """``(N, C, *)`` summed over every position, kept: ``(N, C, 1, ...)``."""
    return t if t.dim() == 2 else t.sum(tuple(range(2, t.dim())), keepdim=True)


def _output(input, plan):
    """The output tensor, in the input's dtype and torch's memory format for this norm."""
    layout = F.suggest_memory_format(input) if plan.keeps_layout else torch.contiguous_format
    return torch.empty_like(input, memory_format=layout)


class _Normalize(torch.autograd.Function):
    """y = (x - mean) r gamma + beta over a statistics set, with a hand-written backward.

    forward: the statistics once (the shifted sums, block by block), then the output in the fewest
    elementwise passes: with per-channel parameters, y = d (r gamma) + (beta - mean_d r gamma)
    is one multiply-add of the shifted input d, computed wide and rounded once into the output.
    It saves the input in its own dtype, gamma, and per set the mean and r.

    backward: x_hat recomputed from them in the input's dtype (float32, as torch's kernels
    compute a float32 backward: the forward's output is the reference answer, the gradient is
    float32 arithmetic), then two sums per set (of g and of g x_hat, by way of per-(sample,
    channel) partial sums or, for a per-element affine, matrix-vector products) and
    dx = r (g - mean(g) - x_hat mean(g x_hat)) as two multiply-adds.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, plan):
        compute = _compute_dtype(input)
        view, dims = plan.view(input)
        count = set_size(view, dims)
        y = _output(input, plan)
        shape = plan.param_shape(input)
        w = None if weight is None else weight.to(compute).reshape(shape)
        b = None if bias is None else bias.to(compute).reshape(shape)
        if not plan.batch_stats:                      # fixed estimates: one multiply-add
            mean, var = (t.detach().to(compute).reshape(_channel_shape(input)) for t in plan.fixed)
            r = _inverse_std(var, plan.eps, plan.name)
            scale = r if w is None else r * w
            if compute != input.dtype:                # x scale is exact enough computed wide
                offset = -mean * scale if b is None else b - mean * scale
                torch.addcmul(offset, input, scale, out=y)
            else:                                     # same width: centre first
                torch.mul(input - mean, scale, out=y) if b is None else \
                    torch.addcmul(b, input - mean, scale, out=y)
        elif not plan.centre:                         # RMSNorm: x r gamma
            mean = None
            (sum_squares,) = _blockwise(view, dims, lambda block, rows: (
                torch.linalg.vector_norm(block.to(compute), 2, dims, keepdim=True).square(),))
            r = _inverse_std(sum_squares / count, plan.eps, plan.name)
            for rows in _blocks(input):
                scaled = torch.mul(input[rows], r[_rows_of(r, rows)])
                torch.mul(scaled, 1 if w is None else w[_rows_of(w, rows, input.dim())], out=y[rows])
        else:
            shift = F._shift(view, dims).to(compute)
            wider = compute != input.dtype
            sum_d, sum_d2 = _blockwise(view, dims, lambda block, rows: _shifted_block_sums(
                block, shift[_rows_of(shift, rows)], dims))
            mean_d = sum_d / count
            if wider:                                 # exact terms: one pass (F._shifted_sums)
                m2 = (sum_d2 - mean_d * sum_d).clamp_min(0)
            else:                                     # same width: a second pass
                (m2,) = _blockwise(view, dims, lambda block, rows: ((
                    (block - shift[_rows_of(shift, rows)] - mean_d[_rows_of(mean_d, rows)]) ** 2
                ).sum(dims, keepdim=True),))
            var = m2 / count
            mean = shift + mean_d
            if plan.update is not None:
                plan.update(mean, var, count)
            r = _inverse_std(var, plan.eps, plan.name, constant_is_zero=plan.norm == "instance")
            r_c, shift_c, mean_d_c = (plan.per_channel(t, input) for t in (r, shift, mean_d))
            if plan.affine_shape is None and wider:   # per-channel affine: one multiply-add
                # y = x (r gamma) + (beta - mean r gamma): computed wide, rounded once into y.
                scale = r_c if w is None else r_c * w
                offset = -(shift_c + mean_d_c) * scale
                torch.addcmul(offset if b is None else offset + b, input, scale, out=y)
            else:                                     # per-element affine, or same width
                for rows in _blocks(input):
                    x_hat = torch.sub(input[rows], shift_c[_rows_of(shift_c, rows)])
                    x_hat.sub_(mean_d_c[_rows_of(mean_d_c, rows)]).mul_(r_c[_rows_of(r_c, rows)])
                    out = y[rows]
                    w_rows = None if w is None else w[_rows_of(w, rows, input.dim())]
                    b_rows = None if b is None else b[_rows_of(b, rows, input.dim())]
                    if w is None:
                        out.copy_(x_hat if b is None else x_hat + b_rows)
                    elif b is None:
                        torch.mul(x_hat, w_rows, out=out)
                    else:
                        torch.addcmul(b_rows, x_hat, w_rows, out=out)
        ctx.save_for_backward(input, weight, mean, r)      # the input, and two numbers per set
        ctx.plan, ctx.count = plan, count
        ctx.bias_layout = None if bias is None else (bias.shape, bias.dtype)   # bias itself not needed
        return y

    @staticmethod
    def backward(ctx, dy):
        input, weight, mean, r = ctx.saved_tensors
        plan = ctx.plan
        if torch.is_grad_enabled():                  # create_graph=True: a differentiable backward
            return _recorded_backward(ctx, dy, input, weight, mean, r)
        # float32 and float64 in their own dtype; float16 and bfloat16 in float32.
        dtype = torch.promote_types(input.dtype, torch.float32)
        mean, r = plan.per_channel(mean, input), plan.per_channel(r, input)
        needs_x_hat = plan.batch_stats or ctx.needs_input_grad[1]
        x_hat = _x_hat(input, mean, r, dtype) if needs_x_hat else None
        r = r.to(dtype)
        dy = dy.to(dtype)
        shape = plan.param_shape(input)
        w = None if weight is None else weight.to(dtype).reshape(shape)
        if plan.affine_shape is None:
            dx, dweight, dbias = _channel_backward(plan, dy, x_hat, r, w, ctx.count,
                                                   ctx.needs_input_grad)
        else:
            dx, dweight, dbias = _row_backward(plan, dy, x_hat, r, w)
        if dx is not None:
            dx = dx.reshape(input.shape).to(input.dtype)
        needs = ctx.needs_input_grad
        weight_layout = None if weight is None else (weight.shape, weight.dtype)
        dweight = _as_parameter(dweight, needs[1], weight_layout)
        dbias = _as_parameter(dbias, needs[2], ctx.bias_layout)
        return dx, dweight, dbias, None


def _as_parameter(grad, needed, layout):
    """``grad`` in its parameter's ``layout`` (shape, dtype), or None where autograd does not
    need it."""
    if not needed or grad is None:
        return None
    shape, dtype = layout
    return grad.reshape(shape).to(dtype)


#: About how many elements one block of the forward holds (1 MiB of float64).
BLOCK_ELEMENTS = 1 << 17


def _blocks(t):
    """Slices of ``t``'s first dim holding about ``elements`` elements each (at least one row).

    The forward computes wide (float64 for float32 on the CPU) one block at a time: a
    full-size float64 temporary of a Transformer block is 48 MiB, above glibc's largest mmap
    threshold, so each one would be fresh pages from the kernel, faulted in one by one (the
    time of several passes over the data). A block's temporaries are small and reused."""
    n = t.shape[0] if t.dim() else 1
    step = max(1, BLOCK_ELEMENTS // max(1, t[:1].numel()))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _rows_of(t, rows, ndim=None):
    """The slice of ``t`` (a statistic, or a parameter broadcasting on an input of ``ndim``
    dims) that goes with ``rows`` of the input: all of it when it does not vary along the
    input's first dim (BatchNorm's (1, C, 1, ...), LayerNorm's weight over the last dims)."""
    if t is None or (ndim is not None and t.dim() < ndim) or t.shape[0] == 1:
        return slice(None)
    return rows


def _blockwise(view, dims, sums):
    """``sums(block, rows)`` (a tuple of sums over ``dims``, kept) over blocks of ``view``'s
    first dim, combined: added when the first dim is reduced, stacked along it otherwise."""
    parts = [sums(view[rows], rows) for rows in _blocks(view)]
    if 0 in dims:
        return tuple(sum(p[i] for p in parts) for i in range(len(parts[0])))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))


def _shifted_block_sums(block, shift, dims):
    """Sums of d = block - shift and of d * d over ``dims``; d computed in ``shift``'s dtype."""
    d = torch.sub(block, shift)
    return d.sum(dims, keepdim=True), torch.linalg.vector_norm(d, 2, dims, keepdim=True).square()


def _x_hat(input, mean, r, dtype):
    """(x - mean) r in ``dtype`` from the wide ``mean``: its high part is subtracted first
    (exact for x near the mean), then the low part, so that nothing is lost at a large mean."""
    if mean is None:
        return input.to(dtype) * r.to(dtype)
    high = mean.to(dtype)
    x_hat = torch.sub(input, high)
    if mean.dtype != dtype:
        x_hat.sub_((mean - high).to(dtype))
    return x_hat.mul_(r.to(dtype))


def _channel_backward(plan, dy, x_hat, r, w, M, needs):
    """BatchNorm, InstanceNorm, GroupNorm: per-channel parameters. Partial sums of dy and
    dy x_hat per (sample, channel) serve the parameters' gradients and the sets' sums."""
    sum_dy = _spatial_sum(dy)                                  # (N, C, 1, ...)
    sum_dy_x_hat = None if x_hat is None else _spatial_sum(dy * x_hat)
    dbias = sum_dy.sum(0)
    dweight = None if sum_dy_x_hat is None else sum_dy_x_hat.sum(0)
    scale = r if w is None else r * w                          # dL/dx = scale dy, fixed statistics
    if not needs[0]:
        return None, dweight, dbias
    if not plan.batch_stats:
        return dy * scale, dweight, dbias
    g_sum = plan.set_sum(sum_dy if w is None else sum_dy * w) / M             # mean(g)
    g_x_hat = plan.set_sum(sum_dy_x_hat if w is None else sum_dy_x_hat * w) / M   # mean(g x_hat)
    dx = torch.addcmul(-r * g_sum, dy, scale)                  # r (g - mean(g)) ...
    return dx.addcmul_(x_hat, -r * g_x_hat), dweight, dbias    # ... - r x_hat mean(g x_hat)


def _row_backward(plan, dy, x_hat, r, w):
    """LayerNorm and RMSNorm: one set per row of the trailing K elements, parameters per element.
    The rows' sums of g = dy gamma are matrix-vector products; no g is made full-size."""
    K = math.prod(plan.affine_shape)
    dy, x_hat, r = dy.reshape(-1, K), x_hat.reshape(-1, K), r.reshape(-1, 1)
    dy_x_hat = dy * x_hat
    dweight, dbias = dy_x_hat.sum(0), dy.sum(0)
    w_flat = None if w is None else w.reshape(K)
    row_sum = (lambda t: t.sum(1, keepdim=True)) if w is None else (lambda t: (t @ w_flat)[:, None])
    dx = x_hat * (-r * row_sum(dy_x_hat) / K)                   # - r x_hat mean(g x_hat)
    del dy_x_hat
    if plan.centre:
        dx.sub_(r * row_sum(dy) / K)                            # - r mean(g)
    return dx.addcmul_(dy if w is None else dy * w_flat, r), dweight, dbias   # + r g


def _recorded_backward(ctx, dy, input, weight, mean, r):
    """The backward in differentiable operations, for a graph of the backward itself. With batch
    statistics the mean and r are recomputed from x inside that graph, so that their own
    dependence on x is differentiated too (same values as the saved ones)."""
    plan = ctx.plan
    x = input.to(_compute_dtype(input))
    view, dims = plan.view(x)
    if plan.batch_stats:
        name = plan.name
        if plan.centre:
            mean, var = _moments(view, dims)
            r = _inverse_std(var, plan.eps, name, constant_is_zero=plan.norm == "instance")
            x_hat = (view - mean) * r
        else:
            r = _inverse_std((view * view).mean(dims, keepdim=True), plan.eps, name)
            x_hat = view * r
    else:
        x_hat = (view - mean) * r
    dy = dy.to(x.dtype)
    shape = plan.param_shape(input)
    g = dy if weight is None else dy * weight.to(x.dtype).reshape(shape)
    g = g.reshape(view.shape)                                          # dL/dx_hat
    if plan.batch_stats:
        dx = standardize_backward(g, x_hat, r, dims, plan.centre)
    else:
        dx = g * r
    dx = dx.reshape(input.shape).to(input.dtype)
    dweight = dbias = None
    if ctx.needs_input_grad[1]:
        dweight = (dy * x_hat.reshape(input.shape)).sum_to_size(shape)
        dweight = dweight.reshape(weight.shape).to(weight.dtype)
    if ctx.needs_input_grad[2]:
        bias_shape, bias_dtype = ctx.bias_layout
        dbias = dy.sum_to_size(shape).reshape(bias_shape).to(bias_dtype)
    return dx, dweight, dbias, None


# --------------------------------------------------------------------------------------------
# The functions, in normcode.functional's signatures
# --------------------------------------------------------------------------------------------
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """:func:`normcode.functional.batch_norm` with a hand-written backward.

    Training: the batch's statistics, so the full :func:`standardize_backward`. Evaluation: the
    running estimates are constants and the backward is ``dy * gamma * r``.
    """
    check.batch_norm(input, running_mean, running_var, weight, bias, training, eps)
    if input.dim() < 2 or input.numel() == 0:     # nothing to normalize: the functional's answer
        return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    # Checked here too: autograd.Function.forward runs without grad mode, where it passes.
    check.not_differentiable("batch_norm", running_mean, running_var)

    def update(mean, var, n):
        F._exponential_update_(running_mean, running_var, mean, var, n, momentum)
    fixed = None if training else (running_mean, running_var)
    plan = _Plan("batch", {}, None, eps, training, fixed, update if training else None)
    return _Normalize.apply(input, weight, bias, plan)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """:func:`normcode.functional.instance_norm` with a hand-written backward."""
    check.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats)
    if input.numel() == 0:
        return _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                              momentum, eps)
    check.not_differentiable("instance_norm", running_mean, running_var)     # as batch_norm's

    def update(mean, var, L):            # the batch's average of the per-instance statistics
        N_C = input.shape[:2]
        F._exponential_update_(running_mean, running_var, mean.reshape(N_C).mean(0),
                               var.reshape(N_C).mean(0), L, momentum)
    fixed = None if use_input_stats else (running_mean, running_var)
    plan = _Plan("instance", {}, None, eps, use_input_stats, fixed,
                 update if use_input_stats else None, keeps_layout=False)
    return _Normalize.apply(input, weight, bias, plan)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """:func:`normcode.functional.layer_norm` with a hand-written backward."""
    normalized_shape = check.layer_norm(input, normalized_shape, weight, bias)
    if input.numel() == 0:
        return _layer_norm(input, normalized_shape, weight, bias, eps)
    plan = _Plan("layer", {"normalized_ndim": len(normalized_shape)}, normalized_shape, eps,
                 keeps_layout=False)
    return _Normalize.apply(input, weight, bias, plan)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """:func:`normcode.functional.group_norm` with a hand-written backward."""
    check.group_norm(input, num_groups, weight, bias)
    if input.numel() == 0:
        return _group_norm(input, num_groups, weight, bias, eps)
    plan = _Plan("group", {"num_groups": num_groups}, None, eps)
    return _Normalize.apply(input, weight, bias, plan)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """:func:`normcode.functional.rms_norm` with a hand-written backward."""
    normalized_shape = check.rms_norm(input, normalized_shape, weight)
    if input.numel() == 0:
        return _rms_norm(input, normalized_shape, weight, eps)
    plan = _Plan("rms", {"normalized_ndim": len(normalized_shape)}, normalized_shape,
                 _rms_eps(eps, input))
    return _Normalize.apply(input, weight, None, plan)


def _window_sum(t, before, after):
    """Over dim 1 (channels): the sum of t over c - before .. c + after, zeros beyond the edges."""
    C = t.shape[1]
    padded = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (before, after))
    total = padded.narrow(1, 0, C).clone()
    for offset in range(1, before + after + 1):
        total += padded.narrow(1, offset, C)
    return total


class _LocalResponseNorm(torch.autograd.Function):
    r""":math:`b = a D^{-\beta}`, :math:`D = k + \frac{\alpha}{n} \sum_{window} a^2`, with its
    backward by hand: through :math:`D`, each channel's gradient collects from every window it
    belongs to, which is the window sum with ``before`` and ``after`` exchanged (its transpose):

    .. math:: \frac{\partial L}{\partial a} = g D^{-\beta} - \frac{2 \alpha \beta}{n}\, a
              \sum_{window^T} g\, a\, D^{-\beta - 1}

    Saves the input and D (in the input's dtype; autograd keeps several float64 tensors)."""

    @staticmethod
    def forward(ctx, input, size, alpha, beta, k):
        x = input.to(_compute_dtype(input))
        before, after = size // 2, (size - 1) // 2
        D = k + alpha / size * _window_sum(x * x, before, after)
        ctx.save_for_backward(input, D.to(input.dtype))
        ctx.arguments = (size, alpha, beta, before, after, k)
        return (x * D.pow(-beta)).to(input.dtype)

    @staticmethod
    def backward(ctx, dy):
        input, D = ctx.saved_tensors
        size, alpha, beta, before, after, k = ctx.arguments
        if torch.is_grad_enabled():          # create_graph=True: D recomputed inside the graph
            dtype = _compute_dtype(input)
            x = input.to(dtype)
            D = k + alpha / size * _window_sum(x * x, before, after)
        else:
            dtype = torch.promote_types(input.dtype, torch.float32)
            x, D = input.to(dtype), D.to(dtype)
        dy = dy.to(dtype)
        scaled = D.pow(-beta)                                  # D^-beta
        through_D = _window_sum(dy * x * scaled / D, after, before)   # the transposed window
        dx = torch.addcmul(dy * scaled, x, through_D, value=-2 * alpha * beta / size)
        return dx.to(input.dtype), None, None, None, None


def local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0):
    """:func:`normcode.functional.local_response_norm` with a hand-written backward."""
    check.local_response_norm(input, size)
    if input.numel() == 0:
        return _local_response_norm(input, size, alpha, beta, k)
    return _LocalResponseNorm.apply(input, size, alpha, beta, k)


# --------------------------------------------------------------------------------------------
# Measuring what a backward keeps
# --------------------------------------------------------------------------------------------
def saved_bytes(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` and count the bytes autograd keeps for its backward.

    Every tensor saved for the backward passes through a ``saved_tensors_hooks`` pack hook;
    storages are counted once however many tensors view them. Tensors already alive before the
    call (the input, the parameters) count too when saved: a backward that keeps them holds them
    alive. Returns ``(bytes, output)``.
    """
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return sum(storages.values()), out

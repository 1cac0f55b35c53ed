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
``r``; autograd through :mod:`normcode.functional` keeps several full-size intermediates in the
computation dtype. The statistics are computed once, in the forward, by the functional's own
:func:`normcode.functional._shifted_sums` (one pass over the input on the CPU); the backward
recomputes :math:`\hat{x}` from the saved input and takes two sums per set. It runs in place
on its own temporaries; when autograd records it (``create_graph=True``, double backward) it
is written in differentiable torch operations instead, so that it has a derivative of its own.
"""
from typing import Callable, NamedTuple, Optional

import torch

from . import _checks as check
from . import functional as F
from ._axes import set_size, statistics_view
from .functional import (_channel_shape, _compute_dtype, _inverse_std, _moments, _rms_eps,
                         _running_moments)
# The forwards for the inputs the hand-written path leaves to them (empty, or without channels),
# bound here so that normcode.functional's names may be swapped for this module's.
from .functional import batch_norm as _batch_norm, group_norm as _group_norm
from .functional import instance_norm as _instance_norm, layer_norm as _layer_norm
from .functional import rms_norm as _rms_norm

__all__ = ["batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm",
           "standardize_backward", "saved_bytes"]


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
    layout: Callable = F._in_layout_of  # (y, input) -> y in the memory format torch returns

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

    def statistics(self, view, dims, input):
        """``(shift, mean_d, r)``, each shaped to broadcast on ``view``: the mean is
        ``shift + mean_d`` (kept apart, so that ``view - shift`` loses nothing), ``r`` is
        1 / sqrt(var + eps). RMSNorm has no mean: ``shift`` and ``mean_d`` are None. Moves
        the running estimates when the plan says so."""
        if not self.batch_stats:             # the batch and instance views are the input itself
            mean, var = _running_moments(*self.fixed, view)
            return mean, None, _inverse_std(var, self.eps, self.name)
        count = set_size(view, dims)
        if not self.centre:
            mean_square = (view * view).sum(dims, keepdim=True) / count
            return None, None, _inverse_std(mean_square, self.eps, self.name)
        shift, mean_d, m2 = F._shifted_sums(view, dims, count, None, view.dtype != input.dtype)
        var = m2 / count
        if self.update is not None:
            self.update(shift + mean_d, var, count)
        return shift, mean_d, _inverse_std(var, self.eps, self.name,
                                           constant_is_zero=self.norm == "instance")


def _standardized(view, shift, mean_d, r, in_place):
    """x_hat = ((view - shift) - mean_d) r, on a new tensor (``view`` itself when ``in_place``)."""
    if shift is None:
        return view.mul_(r) if in_place else view * r
    x_hat = view.sub_(shift) if in_place else view - shift
    if mean_d is not None:
        x_hat.sub_(mean_d)
    return x_hat.mul_(r)


class _Normalize(torch.autograd.Function):
    """y = (x - mean) r gamma + beta over a statistics set, with a hand-written backward."""

    @staticmethod
    def forward(ctx, input, weight, bias, plan):
        x = input.to(_compute_dtype(input))          # a copy when it widens: computed in place
        view, dims = plan.view(x)
        shift, mean_d, r = plan.statistics(view, dims, input)      # once, for both directions
        x_hat = _standardized(view, shift, mean_d, r, in_place=x is not input and view is x)
        y = F._affine(x_hat.reshape(input.shape), weight, bias, plan.param_shape(input))
        mean = shift if mean_d is None else shift + mean_d        # (None for RMSNorm)
        ctx.save_for_backward(input, weight, mean, r)      # the input, and two numbers per set
        ctx.plan = plan
        ctx.bias_layout = None if bias is None else (bias.shape, bias.dtype)   # bias itself not needed
        return plan.layout(y.to(input.dtype), input)

    @staticmethod
    def backward(ctx, dy):
        input, weight, mean, r = ctx.saved_tensors
        plan = ctx.plan
        if torch.is_grad_enabled():                  # create_graph=True: a differentiable backward
            return _recorded_backward(ctx, dy, input, weight, mean, r)
        x = input.to(_compute_dtype(input))
        view, dims = plan.view(x)
        x_hat = _standardized(view, mean, None, r, in_place=x is not input and view is x)
        dy = dy.to(x.dtype)
        shape = plan.param_shape(input)
        dweight = dbias = None
        if ctx.needs_input_grad[2]:
            bias_shape, bias_dtype = ctx.bias_layout
            dbias = dy.sum_to_size(shape).reshape(bias_shape).to(bias_dtype)
        g = dy if weight is None else dy * weight.to(x.dtype).reshape(shape)    # dL/dx_hat
        g = g.reshape(view.shape)
        if not ctx.needs_input_grad[0]:
            dx = None
        elif not plan.batch_stats:
            dx = g * r                                # fixed statistics: an elementwise affine
        else:
            g_x_hat = g * x_hat
            along_x_hat = x_hat * g_x_hat.mean(dims, keepdim=True)
            del g_x_hat
            dx = g - g.mean(dims, keepdim=True) if plan.centre else g.clone()
            dx.sub_(along_x_hat).mul_(r)
        if dx is not None:
            dx = dx.reshape(input.shape).to(input.dtype)
        if ctx.needs_input_grad[1]:                 # summed over every dim the affine broadcasts along
            dweight = (dy * x_hat.reshape(input.shape)).sum_to_size(shape)
            dweight = dweight.reshape(weight.shape).to(weight.dtype)
        return dx, dweight, dbias, None


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


def _contiguous(y, input):
    return y.contiguous()            # torch returns instance and layer norm contiguous, always


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
                 update if use_input_stats else None, _contiguous)
    return _Normalize.apply(input, weight, bias, plan)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """:func:`normcode.functional.layer_norm` with a hand-written backward."""
    normalized_shape = check.layer_norm(input, normalized_shape, weight, bias)
    if input.numel() == 0:
        return _layer_norm(input, normalized_shape, weight, bias, eps)
    plan = _Plan("layer", {"normalized_ndim": len(normalized_shape)}, normalized_shape, eps,
                 layout=_contiguous)
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

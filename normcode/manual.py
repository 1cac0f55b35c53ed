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

What the backward keeps is the input (in its own dtype) and the small mean and ``r``; autograd
keeps several full-size intermediates in the computation dtype. The backward is written in
differentiable torch operations, so it can itself be differentiated (double backward).
"""
from typing import Callable, NamedTuple, Optional

import torch

from . import _checks as check
from ._axes import statistics_view
from .functional import (_channel_shape, _compute_dtype, _inverse_std, _moments, _rms_eps,
                         _running_moments)
# The forwards, bound here so that normcode.functional's names may be swapped for this module's.
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
    forward: Callable                 # (input, weight, bias) -> output: the normcode.functional call
    norm: str                         # the statistics set, as normcode._axes.statistics_view names it
    view_options: dict
    affine_shape: Optional[tuple]     # weight and bias as they broadcast on the input; None: per channel
    eps: float
    batch_stats: bool = True          # statistics from this input; False: fixed (running) estimates
    fixed: Optional[tuple] = None     # (running_mean, running_var) when not batch_stats

    def param_shape(self, input):
        return _channel_shape(input) if self.affine_shape is None else self.affine_shape

    @property
    def centre(self):
        return self.norm != "rms"

    def view(self, x):
        return statistics_view(x, self.norm, **self.view_options)

    def statistics(self, view, dims):
        """Mean (None for RMSNorm) and r = 1 / sqrt(var + eps), shaped to broadcast on ``view``.

        The forward has run normcode.functional's checks already, so ``_inverse_std`` refuses
        nothing here; it is called for its InstanceNorm rule (1 / sqrt(0 + 0) = 0)."""
        name = f"{self.norm}_norm"
        if not self.batch_stats:         # the batch and instance views are the input itself
            mean, var = _running_moments(*self.fixed, view)
            return mean, _inverse_std(var, self.eps, name)
        if not self.centre:
            return None, _inverse_std((view * view).mean(dims, keepdim=True), self.eps, name)
        mean, var = _moments(view, dims)
        return mean, _inverse_std(var, self.eps, name, constant_is_zero=self.norm == "instance")


class _Normalize(torch.autograd.Function):
    """y = (x - mean) r gamma + beta over a statistics set, with a hand-written backward."""

    @staticmethod
    def forward(ctx, input, weight, bias, plan):
        y = plan.forward(input, weight, bias)        # checks, running estimates, layout: as functional
        view, dims = plan.view(input.to(_compute_dtype(input)))
        mean, r = plan.statistics(view, dims)
        ctx.save_for_backward(input, weight, mean, r)     # the input in its own dtype, mean and r small
        ctx.plan = plan
        ctx.bias_layout = None if bias is None else (bias.shape, bias.dtype)   # bias itself not needed
        return y

    @staticmethod
    def backward(ctx, dy):
        input, weight, mean, r = ctx.saved_tensors
        plan = ctx.plan
        x = input.to(_compute_dtype(input))
        view, dims = plan.view(x)
        if plan.batch_stats and torch.is_grad_enabled():
            # Differentiating this backward (create_graph=True): recompute mean and r from x, so
            # that their own dependence on x is part of the graph. Same values as the saved ones.
            mean, r = plan.statistics(view, dims)
        x_hat = view * r if mean is None else (view - mean) * r           # the statistics view's shape
        dy = dy.to(x.dtype)
        shape = plan.param_shape(input)
        g = dy if weight is None else dy * weight.to(x.dtype).reshape(shape)
        g = g.reshape(view.shape)                                          # dL/dx_hat
        if plan.batch_stats:
            dx = standardize_backward(g, x_hat, r, dims, plan.centre)
        else:
            dx = g * r                                # fixed statistics: an elementwise affine
        dx = dx.reshape(input.shape).to(input.dtype)

        dweight = dbias = None
        if ctx.needs_input_grad[1]:                 # summed over every dim the affine broadcasts along
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
    def forward(input, weight, bias):
        return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.dim() < 2:              # no statistics to take: the functional raises or returns it
        return forward(input, weight, bias)
    # Checked here too: autograd.Function.forward runs without grad mode, where it passes.
    check.not_differentiable("batch_norm", running_mean, running_var)
    fixed = None if training else (running_mean, running_var)
    plan = _Plan(forward, "batch", {}, None, eps, training, fixed)
    return _Normalize.apply(input, weight, bias, plan)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    """:func:`normcode.functional.instance_norm` with a hand-written backward."""
    def forward(input, weight, bias):
        return _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                               momentum, eps)
    check.not_differentiable("instance_norm", running_mean, running_var)     # as batch_norm's
    fixed = None if use_input_stats else (running_mean, running_var)
    plan = _Plan(forward, "instance", {}, None, eps, use_input_stats, fixed)
    return _Normalize.apply(input, weight, bias, plan)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """:func:`normcode.functional.layer_norm` with a hand-written backward."""
    normalized_shape = tuple(normalized_shape)
    def forward(input, weight, bias):
        return _layer_norm(input, normalized_shape, weight, bias, eps)
    plan = _Plan(forward, "layer", {"normalized_ndim": len(normalized_shape)}, normalized_shape, eps)
    return _Normalize.apply(input, weight, bias, plan)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """:func:`normcode.functional.group_norm` with a hand-written backward."""
    def forward(input, weight, bias):
        return _group_norm(input, num_groups, weight, bias, eps)
    plan = _Plan(forward, "group", {"num_groups": num_groups}, None, eps)
    return _Normalize.apply(input, weight, bias, plan)


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """:func:`normcode.functional.rms_norm` with a hand-written backward."""
    normalized_shape = tuple(normalized_shape)
    def forward(input, weight, bias):
        return _rms_norm(input, normalized_shape, weight, eps)
    plan = _Plan(forward, "rms", {"normalized_ndim": len(normalized_shape)}, normalized_shape,
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

r"""Switchable Normalization: a learned mix of the IN, LN and BN statistics.

Luo et al., "Differentiable Learning-to-Normalize via Switchable Normalization" (ICLR 2019).
torch.nn has no SN; it is verified through its reductions (one-hot importance weights give
InstanceNorm2d, GroupNorm(1, C) or BatchNorm2d exactly) and by gradcheck.

.. math::

    \mu = \sum_k w_k \mu_k, \quad \sigma^2 = \sum_k w'_k \sigma_k^2, \quad
    w = \mathrm{softmax}(\text{mean\_weight}), \; w' = \mathrm{softmax}(\text{var\_weight}),
    \quad y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

with k over (in, ln, bn) for SwitchNorm2d and (ln, bn) for SwitchNorm1d. Every statistic is
computed directly on its own statistics set through :func:`normcode.statistics_view` and
the shared ``normcode.functional._moments`` (three reductions, no cancellation): the paper derives the LN and BN
moments from the IN ones (``E[var + mu^2] - mean^2``), which is the same number in exact
arithmetic but cancels in floating point when the mean is large.

Choices where the paper, the authors' code and torch.nn leave room (each is tested):

- Running statistics are BatchNorm's: buffers ``running_mean = 0``, ``running_var = 1``,
  ``num_batches_tracked = 0``; ``running <- (1 - momentum) running + momentum stat``, the
  variance unbiased (``n / (n - 1)``, n = N * H * W); ``momentum=None`` is a cumulative average.
  Only the BN term uses them, in eval mode; IN and LN statistics always come from the sample.
- ``using_moving_average=False``: the running estimates are the plain average over every
  training batch since ``reset_running_stats()``, merged by the law of total variance:
  ``running_var`` = (average within-batch unbiased variance) + (biased variance of the batch
  means), which estimates the variance of all those batches pooled together.
- ``unbiased_instance_var=True`` reproduces the authors' public code: the IN variance divides
  by L - 1 (L = H * W), and the LN and BN variances derived from it are inflated accordingly.
  It changes the IN and LN terms in both modes (they always come from the sample) and the BN
  term in training; in eval the BN term is ``running_var``, which is BatchNorm's unbiased
  estimate whatever the option says.
- Degenerate sizes raise a clear error (torch.nn's where one applies), never NaN:
  a 1x1 map (L = 1) has no instance variance (use SwitchNorm1d on the pooled (N, C) input);
  the BN term in training needs more than one value per channel (N * L > 1). A batch of one
  sample with L > 1 is accepted, as BatchNorm2d accepts it: its BN statistics are then its IN
  statistics. For one sample per device the paper recommends ``using_bn=False``.
"""
import math

import torch
from torch import nn

from . import _checks as check
from .modules import _Layer, _register_running_stats, _reset_running_stats, momentum_factor
from ._axes import statistics_set
from .functional import (_affine, _channel_shape, _compute_dtype, _exponential_update_,
                         _inverse_std, _moments, _running_moments)

#: The statistics each module mixes, in the order of its ``mean_weight`` and ``var_weight``.
PARTS = {"SwitchNorm2d": ("instance", "layer", "batch"), "SwitchNorm1d": ("layer", "batch")}


def switchable_moments(x, parts, unbiased_instance_var=False):
    """``{part: (mean, var)}`` for each norm in ``parts``, each broadcastable against ``x``.

    ``x`` is ``(N, C, *)``. Variances are biased, except with ``unbiased_instance_var``, which
    reproduces the authors' code: var_in * L / (L - 1), and the LN and BN variances they derive
    from it, ``mean(var_in + mu_in^2) - mu^2``, which exceed the direct ones by the average
    biased IN variance over (L - 1). The excess is added here, without the cancelling form.
    """
    moments, counts = {}, {}
    for part in parts:
        options = {"normalized_ndim": x.dim() - 1} if part == "layer" else {}
        view, dims, counts[part] = statistics_set(x, part, **options)
        moments[part] = _moments(view, dims)     # (N, C, 1..), (N, 1, 1..) or (1, C, 1..)
    if unbiased_instance_var:
        L = counts["instance"]
        _, var_in = moments["instance"]          # biased, (N, C, 1, ...)
        excess = var_in / (L - 1)
        for part, over in (("instance", None), ("layer", 1), ("batch", 0)):
            if part in moments:
                mean, var = moments[part]
                extra = excess if over is None else excess.mean(over, keepdim=True)
                moments[part] = (mean, var + extra)
    return moments


def _plain_average_update_(running_mean, running_var, mean, var, n, k):
    """Make the running estimates the plain average over batches 1..k, this one being batch k
    (``using_moving_average=False``): the mean of the means, and for the variance the average
    within-batch unbiased variance (``var`` is biased, over ``n`` values) plus the variance of
    the means (law of total variance), updated in Welford's form. In place, outside autograd."""
    with torch.no_grad():
        mean = mean.reshape(-1).to(running_mean.dtype)
        unbiased = (var * (n / (n - 1))).reshape(-1).to(running_var.dtype)
        delta = mean - running_mean
        running_mean.add_(delta / k)
        running_var.add_((unbiased + delta * delta * ((k - 1) / k) - running_var) / k)


def switch_norm(input, mean_weight, var_weight, running_mean=None, running_var=None, weight=None,
                bias=None, training=False, momentum=0.1, eps=1e-5, *, parts=PARTS["SwitchNorm2d"],
                unbiased_instance_var=False, moving_average=True, num_batches_tracked=None):
    r"""Switchable normalization of an ``(N, C, *)`` input: the functional form of the modules.

    ``mean_weight`` and ``var_weight`` are the logits of the importance weights, one per entry of
    ``parts``. The ``"batch"`` term uses the batch's statistics in training (and updates the
    running estimates, if given) and ``running_mean``/``running_var`` otherwise.
    ``num_batches_tracked`` (already incremented for this batch) is needed for the plain average
    (``moving_average=False``) and for ``momentum=None``.
    """
    _check(input, mean_weight, var_weight, running_mean, running_var, weight, bias, training,
           momentum, eps, parts, unbiased_instance_var, moving_average, num_batches_tracked)
    if input.numel() == 0:                       # nothing to normalize or learn from
        return input.clone()
    x = input.to(_compute_dtype(input))
    use_batch_stats = "batch" in parts and training
    computed = [p for p in parts if p != "batch" or use_batch_stats]
    moments = switchable_moments(x, computed, unbiased_instance_var)
    if use_batch_stats and running_mean is not None and running_var is not None:
        # The running variance is BatchNorm's unbiased one, whatever unbiased_instance_var says.
        mean_bn, var_bn = (switchable_moments(x, ("batch",))["batch"] if unbiased_instance_var
                           else moments["batch"])
        n = statistics_set(x, "batch").count
        if moving_average:                                # BatchNorm's update, shared with it
            _exponential_update_(running_mean, running_var, mean_bn, var_bn, n,
                                 momentum_factor(momentum, num_batches_tracked))
        else:
            _plain_average_update_(running_mean, running_var, mean_bn, var_bn, n,
                                   int(num_batches_tracked))
    elif "batch" in parts and not training:
        moments["batch"] = _running_moments(running_mean, running_var, x)

    w = torch.softmax(mean_weight.to(x.dtype), 0)
    w_var = torch.softmax(var_weight.to(x.dtype), 0)
    mean = sum(w[k] * moments[p][0] for k, p in enumerate(parts))     # broadcasts to (N, C, 1, ...)
    var = sum(w_var[k] * moments[p][1] for k, p in enumerate(parts))
    x_hat = (x - mean) * _inverse_std(var, eps, "switch_norm")
    return _affine(x_hat, weight, bias, _channel_shape(input)).to(input.dtype)


def _check(input, mean_weight, var_weight, running_mean, running_var, weight, bias, training,
           momentum, eps, parts, unbiased_instance_var, moving_average, num_batches_tracked):
    """switch_norm's checks: BatchNorm's where the BN statistics are mixed in, and its own."""
    name = "switch_norm"
    check.floating_nc(input, name)
    check.per_channel_tensors(input, name, running_mean, running_var, weight, bias,
                              mean_weight=mean_weight, var_weight=var_weight)
    for what, logits in (("mean_weight", mean_weight), ("var_weight", var_weight)):
        if logits.shape != (len(parts),):
            raise RuntimeError(f"{name}: {what} should have shape ({len(parts)},), one logit per "
                               f"mixed statistic {parts}, not {tuple(logits.shape)}")
    if unbiased_instance_var and "instance" not in parts:
        raise ValueError(f"{name}: unbiased_instance_var needs the instance statistics in parts")
    if "instance" in parts and math.prod(input.shape[2:]) == 1:
        # IN statistics always come from the sample; over one element they are the value itself
        # with variance 0 (and the authors' L - 1 divisor gives 0 / 0).
        raise ValueError(
            f"{name} mixes instance statistics, which need more than 1 spatial element, but got "
            f"input size {list(input.shape)}; for 1x1 maps use SwitchNorm1d on the (N, C) input")
    if "batch" not in parts:
        return                         # any eps: _inverse_std refuses only var + eps <= 0
    if training:
        check.batch_size(input.size())
    check.batch_norm_eps(eps, training, name)
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError(f"{name}: running_mean and running_var must be given when "
                           "training=False and the BN statistics are mixed in")
    tracked = running_mean is not None and running_var is not None
    if training and tracked and (momentum is None or not moving_average) and num_batches_tracked is None:
        raise RuntimeError(f"{name}: a cumulative average (momentum=None or "
                           "moving_average=False) needs num_batches_tracked")


class _SwitchNorm(_Layer):
    _ndim = None                     # the one accepted input rank
    _REPR = ("{num_features}, eps={eps}, momentum={momentum}, "
             "using_moving_average={using_moving_average}, using_bn={using_bn}, "
             "last_gamma={last_gamma}, unbiased_instance_var={unbiased_instance_var}")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, using_moving_average=True,
                 using_bn=True, last_gamma=False, unbiased_instance_var=False, device=None,
                 dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._keep(num_features=num_features, eps=eps, momentum=momentum,
                   using_moving_average=using_moving_average, using_bn=using_bn,
                   last_gamma=last_gamma, unbiased_instance_var=unbiased_instance_var)
        all_parts = PARTS[type(self).__name__]
        self.parts = all_parts if using_bn else tuple(p for p in all_parts if p != "batch")
        if len(self.parts) < 2:
            raise ValueError(f"{type(self).__name__} with using_bn=False mixes only "
                             f"{self.parts}: that is plain LayerNorm, nothing to switch")
        self.weight = nn.Parameter(torch.empty(num_features, **factory))         # gamma, (C,)
        self.bias = nn.Parameter(torch.empty(num_features, **factory))           # beta, (C,)
        self.mean_weight = nn.Parameter(torch.empty(len(self.parts), **factory))  # logits
        self.var_weight = nn.Parameter(torch.empty(len(self.parts), **factory))
        _register_running_stats(self, num_features, using_bn, factory)   # BatchNorm's buffers
        self.reset_parameters()

    def reset_running_stats(self):
        _reset_running_stats(self)

    def reset_parameters(self):
        self.reset_running_stats()
        with torch.no_grad():
            # last_gamma: the last norm of a residual branch starts at 0, so the block starts as identity.
            self.weight.fill_(0.0 if self.last_gamma else 1.0)
            self.bias.zero_()
            self.mean_weight.fill_(1.0)          # softmax(ones): every statistic weighted equally
            self.var_weight.fill_(1.0)

    def importance(self):
        """The softmax importance weights ``{"mean": {part: w}, "var": {part: w}}`` as floats."""
        with torch.no_grad():
            return {which: dict(zip(self.parts, torch.softmax(logits.double(), 0).tolist()))
                    for which, logits in (("mean", self.mean_weight), ("var", self.var_weight))}

    def forward(self, input):
        if input.dim() != self._ndim:
            raise ValueError(f"expected {self._ndim}D input (got {input.dim()}D input)")
        if self.training and self.using_bn:
            self.num_batches_tracked.add_(1)      # counted before the forward, as BatchNorm does
        return switch_norm(
            input, self.mean_weight, self.var_weight, self.running_mean, self.running_var,
            self.weight, self.bias, self.training, self.momentum, self.eps, parts=self.parts,
            unbiased_instance_var=self.unbiased_instance_var,
            moving_average=self.using_moving_average, num_batches_tracked=self.num_batches_tracked)



class SwitchNorm2d(_SwitchNorm):
    r"""Switchable normalization over a 4D (N, C, H, W) input: IN, LN and BN statistics mixed.

    Luo et al. 2019. ``mean_weight`` and ``var_weight`` hold the logits of the importance
    weights, ordered (in, ln, bn), or (in, ln) with ``using_bn=False``: six (or four) extra
    parameters per layer, shared by all channels. ``weight`` and ``bias`` are per channel.
    """
    _ndim = 4


class SwitchNorm1d(_SwitchNorm):
    r"""Switchable normalization over a 2D (N, C) input: LN and BN statistics mixed.

    ``mean_weight`` and ``var_weight`` are ordered (ln, bn). ``using_bn=False`` would leave
    LayerNorm alone and is refused.
    """
    _ndim = 2
    _REPR = _SwitchNorm._REPR.replace(", unbiased_instance_var={unbiased_instance_var}", "")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, using_moving_average=True,
                 using_bn=True, last_gamma=False, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, using_moving_average, using_bn, last_gamma,
                         False, device, dtype)

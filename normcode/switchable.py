r"""Switchable Normalization: a learned mix of the IN, LN and BN statistics.

Luo et al., "Differentiable Learning-to-Normalize via Switchable Normalization" (ICLR 2019).
torch.nn has no SN; it is verified through its reductions (one-hot importance weights give
InstanceNorm2d, GroupNorm(1, C) or BatchNorm2d exactly) and by gradcheck.

.. math::

    \mu = \sum_k w_k \mu_k, \quad \sigma^2 = \sum_k w'_k \sigma_k^2, \quad
    w = \mathrm{softmax}(\text{mean\_weight}), \; w' = \mathrm{softmax}(\text{var\_weight}),
    \quad y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

with k over (in, ln, bn) for SwitchNorm2d and (ln, bn) for SwitchNorm1d. As in the paper, the
IN statistics are computed once, by ``normcode.functional._shifted_sums`` (one pass over the
input where it is computed wider, as every norm's), and the LN and BN statistics are derived
from them, an LN or BN set being a union of IN sets. Not by the paper's
``mean(var_in + mu_in^2) - mu^2``, which is the same number in exact arithmetic but cancels in
floating point when the mean is large: by the law of total variance, with every instance mean
taken relative to one element of the union (``_pooled``), so that no term is large. The
output is then one multiply-add of the shifted input with a scale and an offset per (sample,
channel).

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
from .functional import (_channel_shape, _compute_dtype, _computes_wider, _exponential_update_,
                         _inverse_std, _running_moments, _scale_and_offset, _shifted_sums)

#: The statistics each module mixes, in the order of its ``mean_weight`` and ``var_weight``.
PARTS = {"SwitchNorm2d": ("instance", "layer", "batch"), "SwitchNorm1d": ("layer", "batch")}


def _instance_moments(x, exact_terms):
    """``(shift, mean_d, var)`` per (sample, channel), each ``(N, C, 1, ...)``: the instance mean
    is ``shift + mean_d`` (``shift`` one element of the set, outside autograd; see
    ``normcode.functional._shifted_sums``, which computes them), the variance biased. For an
    ``(N, C)`` input each set is one value: its mean is the value, its variance 0."""
    if x.dim() == 2:
        shift = x.detach()
        return shift, x - shift, torch.zeros_like(x)
    view, dims, L = statistics_set(x, "instance")
    shift, mean_d, m2, _ = _shifted_sums(view, dims, L, None, exact_terms)
    return shift, mean_d, m2 / L


def _pooled(shift, mean_d, var, over):
    r"""The moments of the union of the instance sets along dim ``over`` (LN's: over the
    channels, dim 1; BN's: over the samples, dim 0), from theirs: ``(ref, m, var)``, the mean
    being ``ref + m``.

    .. math:: \mu = \operatorname{mean} \mu_{\text{in}}, \qquad
              \sigma^2 = \operatorname{mean} \sigma^2_{\text{in}}
                        + \operatorname{mean} (\mu_{\text{in}} - \mu)^2

    The law of total variance: the paper's :math:`\operatorname{mean}(\sigma^2_{\text{in}} +
    \mu_{\text{in}}^2) - \mu^2` rearranged so that nothing cancels. The instance means are taken
    relative to ``ref``, the shift of the union's first set (one element of the union), so
    every term is small however large the mean is.
    """
    ref = shift.narrow(over, 0, 1)
    a = (shift - ref) + mean_d                   # each instance mean less ref
    m = a.mean(over, keepdim=True)
    between = (a - m).square().mean(over, keepdim=True)
    return ref, m, var.mean(over, keepdim=True) + between


def _switchable_parts(x, parts, unbiased_instance_var=False, exact_terms=False):
    """``(shift, {part: (ref, m, var)}, var_bn)``: the instance statistics once, in one pass over
    ``x`` where ``exact_terms`` (see ``normcode.functional._shifted_sums``), the LN and BN
    statistics from them (``_pooled``); each mean is ``ref + m``. ``var_bn`` is the biased BN
    variance (None without the batch part), the running estimates' whatever
    ``unbiased_instance_var`` says."""
    shift, mean_d, var_in = _instance_moments(x, exact_terms)
    moments = {"instance": (shift, mean_d, var_in)}
    for part, over in (("layer", 1), ("batch", 0)):
        if part in parts:
            moments[part] = _pooled(shift, mean_d, var_in, over)
    var_bn = moments["batch"][2] if "batch" in parts else None
    if unbiased_instance_var:
        # The authors' var_in * L / (L - 1), and the LN and BN variances they derive from it,
        # which exceed the biased ones by the average biased IN variance over (L - 1).
        excess = var_in / (statistics_set(x, "instance").count - 1)
        for part, over in (("instance", None), ("layer", 1), ("batch", 0)):
            if part in moments:
                ref, m, var = moments[part]
                extra = excess if over is None else excess.mean(over, keepdim=True)
                moments[part] = (ref, m, var + extra)
    return shift, {part: moments[part] for part in parts}, var_bn


def switchable_moments(x, parts, unbiased_instance_var=False, exact_terms=False):
    """``{part: (mean, var)}`` for each norm in ``parts``, each broadcastable against ``x``.

    ``x`` is ``(N, C, *)``. The instance moments are computed once, and the LN and BN ones
    from them (``_pooled``), as the paper does, without its cancelling form. Variances are
    biased, except with ``unbiased_instance_var``, which reproduces the authors' code:
    var_in * L / (L - 1), and the LN and BN variances they derive from it, which exceed the
    biased ones by the average biased IN variance over (L - 1). ``exact_terms``: ``x`` is a
    wider copy of its input, and the instance sums take one pass.
    """
    _, moments, _ = _switchable_parts(x, parts, unbiased_instance_var, exact_terms)
    return {part: (ref + m, var) for part, (ref, m, var) in moments.items()}


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
    shift, moments, var_bn = _switchable_parts(x, computed, unbiased_instance_var,
                                               _computes_wider(x, input))
    if use_batch_stats and running_mean is not None and running_var is not None:
        ref, m, _ = moments["batch"]
        n = statistics_set(x, "batch").count
        if moving_average:                                # BatchNorm's update, shared with it
            _exponential_update_(running_mean, running_var, ref + m, var_bn, n,
                                 momentum_factor(momentum, num_batches_tracked))
        else:
            _plain_average_update_(running_mean, running_var, ref + m, var_bn, n,
                                   int(num_batches_tracked))
    elif "batch" in parts and not training:
        mean_bn, var_bn = _running_moments(running_mean, running_var, x)
        moments["batch"] = (mean_bn, None, var_bn)

    w = torch.softmax(mean_weight.to(x.dtype), 0)
    w_var = torch.softmax(var_weight.to(x.dtype), 0)
    # The mixed mean less the shift, (N, C, 1, ...): every term small (for the running mean,
    # as small as its distance from the data).
    delta = sum(w[k] * _less(moments[p][:2], shift, p == "instance") for k, p in enumerate(parts))
    var = sum(w_var[k] * moments[p][2] for k, p in enumerate(parts))
    # y = (x - shift - delta) r gamma + beta, as one multiply-add of the shifted input with a
    # scale and an offset per (sample, channel): under torch.compile its backward then sums
    # per (sample, channel) only, in the same pass as the statistics' own sums.
    scale, offset = _scale_and_offset(delta, _inverse_std(var, eps, "switch_norm"), weight, bias,
                                      _channel_shape(input))
    return torch.addcmul(offset, x - shift, scale).to(input.dtype)


def _less(mean, shift, instance):
    """A mean given as ``(ref, m)`` (``m`` may be None), less ``shift``."""
    ref, m = mean
    if instance:                     # ref is the shift itself
        return m
    return ref - shift if m is None else (ref - shift) + m


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

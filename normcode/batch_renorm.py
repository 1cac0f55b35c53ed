r"""Batch Renormalization (Ioffe 2017): BatchNorm whose training output is corrected toward
what evaluation will compute.

.. math:: \hat x = \frac{x - \mu_B}{\sigma_B}\, r + d, \qquad
          r = \mathrm{clip}_{[1/r_{\max},\, r_{\max}]}\!\left(\frac{\sigma_B}{\sigma}\right), \quad
          d = \mathrm{clip}_{[-d_{\max},\, d_{\max}]}\!\left(\frac{\mu_B - \mu}{\sigma}\right)

with :math:`\mu, \sigma` the running estimates *before* this step's update, and no gradient
through r or d (Algorithm 1 of the paper). Where the clipping is inactive,
:math:`\hat x = (x - \mu) / \sigma`: the training output is what evaluation computes. With
:math:`r_{\max} = 1, d_{\max} = 0`, r = 1 and d = 0 and it is BatchNorm.

Everything but the correction is BatchNorm's, taken from normcode's BatchNorm, not copied:
the buffers, their update (:func:`normcode.functional._exponential_update_`, unbiased
variance, torch's momentum convention), the counting and the momentum rule
(``_BatchNorm._batch_norm_arguments``), the input checks (:mod:`normcode._checks`) and
evaluation (:func:`normcode.functional.batch_norm`). So a ``torch.nn.BatchNorm2d`` state dict
loads into :class:`BatchRenorm2d` strictly, and back.

One deliberate difference from the paper: Algorithm 1 keeps a moving average of
:math:`\sigma_B`; here the running estimate is BatchNorm's ``running_var`` (of the unbiased
batch variance) and :math:`\sigma = \sqrt{\mathrm{running\_var} + \epsilon}`, as in
evaluation.
"""
import torch

from . import _checks as check
from . import functional as F
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm


def _check_limits(r_max, d_max):
    if not r_max >= 1:
        raise ValueError(f"BatchRenorm: r_max must be >= 1 (r is clipped to [1/r_max, r_max]), "
                         f"got r_max={r_max}")
    if not d_max >= 0:
        raise ValueError(f"BatchRenorm: d_max must be >= 0 (d is clipped to [-d_max, d_max]), "
                         f"got d_max={d_max}")


def batch_renorm(input, running_mean, running_var, weight=None, bias=None, training=False,
                 momentum=0.1, eps=1e-5, r_max=3.0, d_max=5.0):
    r"""Batch renormalization, in ``torch.nn.functional.batch_norm``'s signature plus the limits.

    .. math:: y = \left(\frac{x - \mu_B}{\sigma_B}\, r + d\right) \gamma + \beta

    In training with running estimates: the batch's mean :math:`\mu_B` and
    :math:`\sigma_B = \sqrt{\mathrm{Var}_B + \epsilon}` (biased, as BatchNorm), the correction
    r, d from the running estimates as they were before this call, then BatchNorm's update of
    the estimates. Otherwise (evaluation, or no running estimates) exactly
    :func:`normcode.functional.batch_norm`.
    """
    _check_limits(r_max, d_max)
    if not training or running_mean is None or running_var is None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                            eps)
    check.batch_norm(input, running_mean, running_var, weight, bias, training, eps)
    x = input.to(F._compute_dtype(input))
    # The estimates as they are now, before this batch moves them: (1, C, 1, ...), no gradient.
    mu, var = F._running_moments(running_mean, running_var, x)
    # BatchNorm's moments, as batch_norm computes them: mu_B = shift + mean_d, biased Var_B.
    shift, mean_d, var_B, n, d_x = F._batch_moments(x, input)     # d_x = x - shift
    mean = shift + mean_d
    inv_std_B = F._inverse_std(var_B, eps, "batch_renorm")                # 1 / sigma_B
    if n > 0:      # BatchNorm's update, Bessel's correction n / (n - 1) included
        F._exponential_update_(running_mean, running_var, mean, var_B, n, momentum)
    with torch.no_grad():                                  # r and d are constants of the step
        inv_std = F._inverse_std(var, eps, "batch_renorm")                # 1 / sigma
        r = (inv_std / inv_std_B).clamp(1 / r_max, r_max)                 # sigma_B / sigma
        d = ((mean - mu) * inv_std).clamp(-d_max, d_max)
    # BatchNorm's multiply-add, d_x scale + offset, with the corrected scale and offset:
    # ((x - mu_B) r / sigma_B + d) gamma + beta has scale r gamma / sigma_B and, in place of
    # beta, d gamma + beta.
    shape = F._channel_shape(input)
    beta = d if weight is None else d * weight.to(d.dtype).reshape(shape)
    beta = beta if bias is None else beta + bias.to(d.dtype).reshape(shape)
    scale, offset = F._scale_and_offset(mean_d, inv_std_B * r, weight, beta, shape)
    y = torch.addcmul(offset, d_x, scale)
    return F._in_layout_of(y.to(input.dtype), input)


class _BatchRenorm(_BatchNorm):
    r"""BatchNorm's module with :func:`batch_renorm` in place of ``batch_norm``.

    ``r_max`` and ``d_max`` are plain attributes: a training loop relaxes them from 1 and 0
    (BatchNorm) to their final values, as the paper does (Section 4). They are checked at every
    forward, so a schedule cannot set an invalid value silently.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, r_max=3.0, d_max=5.0, device=None, dtype=None, *,
                 bias=True):
        _check_limits(r_max, d_max)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        self.r_max = r_max
        self.d_max = d_max

    def forward(self, input):
        self._check_input_dim(input)
        _check_limits(self.r_max, self.d_max)
        running_mean, running_var, training, momentum = self._batch_norm_arguments()
        return batch_renorm(input, running_mean, running_var, self.weight, self.bias, training,
                            momentum, self.eps, self.r_max, self.d_max)

    _REPR = _BatchNorm._REPR + ", r_max={r_max}, d_max={d_max}"


class BatchRenorm1d(_BatchRenorm):
    r"""Batch renormalization over a 2D (N, C) or 3D (N, C, L) input.

    Ioffe 2017. Statistics per channel over N (and L), as :class:`normcode.BatchNorm1d`.
    """
    _check_input_dim = BatchNorm1d._check_input_dim


class BatchRenorm2d(_BatchRenorm):
    r"""Batch renormalization over a 4D (N, C, H, W) input.

    Ioffe 2017. Statistics per channel over (N, H, W), as :class:`normcode.BatchNorm2d`.
    """
    _check_input_dim = BatchNorm2d._check_input_dim


class BatchRenorm3d(_BatchRenorm):
    r"""Batch renormalization over a 5D (N, C, D, H, W) input.

    Ioffe 2017. Statistics per channel over (N, D, H, W), as :class:`normcode.BatchNorm3d`.
    """
    _check_input_dim = BatchNorm3d._check_input_dim


def relaxation_schedule(step, *, warmup, r_steps, d_steps, r_max=3.0, d_max=5.0):
    r"""``(r_max, d_max)`` at ``step``: BatchNorm (1, 0) for the first ``warmup`` steps, then
    raised linearly to their final values, reached ``r_steps`` and ``d_steps`` steps after the
    warmup. Ioffe (2017), Section 4: r_max = 1, d_max = 0 for the first 5k steps, then relaxed
    to r_max = 3 at 40k steps and d_max = 5 at 25k steps."""
    def ramp(final, start, length):
        t = min(max(step - warmup, 0) / length, 1.0) if length > 0 else float(step > warmup)
        return start + t * (final - start)

    return ramp(r_max, 1.0, r_steps), ramp(d_max, 0.0, d_steps)

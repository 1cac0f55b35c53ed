r"""Batch normalization over padded sequences: statistics from the real positions only.

A batch of sequences of different lengths is padded to one length. ``BatchNorm1d`` on such a
(N, C, L) batch averages the padding into its statistics, so a token's output changes with the
amount of padding. :func:`normcode.masked_batch_norm` takes a boolean ``mask`` (N, L), True at real
positions, and computes each channel's mean and variance over those positions alone:

.. math:: \mu_c = \frac{1}{n}\sum_{m_i} x_{i,c}, \qquad
          \sigma_c^2 = \frac{1}{n}\sum_{m_i} (x_{i,c} - \mu_c)^2, \qquad n = \sum_i m_i

It equals ``torch.nn.BatchNorm1d`` applied to the real positions gathered into one (n, C) batch:
same outputs, gradients and running statistics. Padded positions output 0 and get a zero
gradient: they neither enter nor see the statistics, so what the padding holds (zeros, another
embedding, even NaN) changes nothing.
"""
import torch

from . import _checks as check
from . import modules
from ._axes import statistics_view
from .functional import (
    _affine, _channel_shape, _compute_dtype, _exponential_update_, _inverse_std, _moments,
    _running_moments,
)


def pack_real(input, mask):
    """The real positions of ``input`` ``(N, C, *)`` gathered into one (n, C) batch, in order."""
    return input.movedim(1, -1)[mask]                         # (N, *, C)[mask] -> (n, C)


def unpack_real(packed, mask):
    """The inverse of :func:`pack_real`: (n, C) back to ``(N, C, *)``, zeros at the padded positions."""
    out = packed.new_zeros(tuple(mask.shape) + (packed.shape[-1],))    # (N, *, C)
    return out.index_put((mask,), packed).movedim(-1, 1)


def _check_mask(input, mask):
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        what = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"masked_batch_norm: mask must be a bool tensor (True = real position), got {what}")
    expected = (input.shape[0],) + tuple(input.shape[2:])          # (N, *): input without C
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"masked_batch_norm: mask of shape {tuple(mask.shape)} does not fit input of shape "
            f"{tuple(input.shape)}; expected (N, *) = {expected}, the input's shape without dim 1")


def _masked_moments(x, mask, dims, n):
    r"""Mean and biased variance of ``x`` over ``dims`` (kept), counting only where ``mask``.

    ``normcode.functional._moments`` with its ``where``: two passes (the mean, then the mean
    square of the deviations from it), each summing the real positions only, over ``n`` of
    them.
    """
    return _moments(x, dims, count=n, where=mask)


def masked_batch_norm(input, mask, running_mean, running_var, weight=None, bias=None,
                      training=False, momentum=0.1, eps=1e-5):
    r"""Batch normalization that ignores padded positions, in ``batch_norm``'s signature plus ``mask``.

    .. math:: y = \frac{x - \mathrm{E}_{m}[x]}{\sqrt{\mathrm{Var}_{m}[x] + \epsilon}} \gamma + \beta
              \text{ where } m, \qquad y = 0 \text{ elsewhere}

    Statistics per channel over the positions where ``mask`` is True, across the batch: the
    statistics set of BatchNorm with the padding taken out. ``input`` is ``(N, C, *)`` as for
    ``BatchNorm1d`` (usually (N, C, L)); ``mask`` is bool of shape ``(N, *)``, True at real positions.
    In training the running estimates move toward the masked statistics with the unbiased
    variance ``var * n / (n - 1)``, n the number of real positions; in eval they normalize, and
    the mask only zeroes the padded outputs. Padded positions output 0 and receive no gradient.
    """
    n = _check(input, mask, running_mean, running_var, weight, bias, training, eps)
    real = mask.unsqueeze(1)                   # (N, 1, *): broadcasts over the channels
    # Padding is replaced by 0 before any arithmetic: a padded NaN or inf would otherwise reach
    # the gradient of the statistics through 0 * NaN = NaN, even with its own output masked.
    x = torch.where(real, input.to(_compute_dtype(input)), 0)
    if not training:                 # the running estimates; the mask only zeroes the padding
        mean, var = _running_moments(running_mean, running_var, x)
    else:
        view, dims = statistics_view(x, "batch")              # the axes BatchNorm reduces
        mean, var = _masked_moments(view, real, dims, n)
        # n: the real positions, so Bessel's correction counts them only.
        _exponential_update_(running_mean, running_var, mean, var, n, momentum)
    y = _affine((x - mean) * _inverse_std(var, eps, "masked_batch_norm"), weight, bias,
                _channel_shape(input))
    return torch.where(real, y, 0).to(input.dtype)


def _check(input, mask, running_mean, running_var, weight, bias, training, eps):
    """masked_batch_norm's checks (batch_norm's, and the mask's); returns the real positions."""
    name = "masked_batch_norm"
    check.floating_nc(input, name)
    _check_mask(input, mask)
    check.running_pair(running_mean, running_var, training, name)
    check.per_channel_tensors(input, name, running_mean, running_var, weight, bias)
    n = int(mask.sum())                        # real positions: the same for every channel
    if training and n < 2:
        raise ValueError(
            f"{name}: expected at least 2 real (unmasked) positions when training, "
            f"got {n} in input of size {tuple(input.shape)}")
    check.batch_norm_eps(eps, training, name)
    return n


class MaskedBatchNorm1d(modules.BatchNorm1d):
    r"""``BatchNorm1d`` for padded sequences: ``forward(input, mask)`` with ``mask`` (N, L) bool.

    Same constructor, parameters, buffers and state_dict as ``torch.nn.BatchNorm1d`` (so a
    ``BatchNorm1d``'s state loads into it and back); only the statistics skip the positions
    where ``mask`` is False. See :func:`normcode.masked_batch_norm`.

    Shape: input (N, C, L) with mask (N, L), or (N, C) with mask (N,); output as input.
    """

    def forward(self, input, mask):
        self._check_input_dim(input)
        running_mean, running_var, training, momentum = self._batch_norm_arguments()
        return masked_batch_norm(input, mask, running_mean, running_var, self.weight, self.bias,
                                 training, momentum, self.eps)

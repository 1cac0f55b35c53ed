r"""Four ways to compute a variance, kept as teaching references for the numerics chapter.

Each returns the mean and the biased variance (divide by n, as the norms use) over ``dim``,
vectorised over every other dim, in the dtype of ``x`` (the chapter runs them in float32 to
expose their rounding). The norms themselves use ``normcode.functional._moments``.

- :func:`naive_var`: :math:`\mathrm{E}[x^2] - \mathrm{E}[x]^2`. **Do not use it.** It subtracts
  two large, nearly equal numbers and loses every digit once the mean is large next to the
  standard deviation.
- :func:`two_pass_var`: the mean first, then the mean square of the centred values.
- :func:`welford_var`: one pass, updating the mean and the sum of squared deviations per value
  (Welford 1962): the online algorithm, for data seen once.
- :func:`chan_var`: the parallel algorithm (Chan, Golub & LeVeque 1983): partial statistics of
  separate chunks merged by :func:`chan_merge`. SyncBatchNorm merges its per-device statistics
  this way.
"""
from typing import NamedTuple

import torch


class Moments(NamedTuple):
    """The statistics of a chunk that merge exactly: count, mean, and M2 = sum of (x - mean)^2."""
    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @property
    def var(self):
        return self.m2 / self.count                         # biased, as the norms use


def naive_var(x, dim=-1):
    r"""NOT TO BE USED: :math:`\mathrm{E}[x^2] - \mathrm{E}[x]^2`, the textbook formula that cancels.

    With mean :math:`\mu` and standard deviation :math:`\sigma`, both terms are about
    :math:`\mu^2`; their rounding errors, about :math:`\mu^2` times the dtype's epsilon, swamp
    :math:`\sigma^2` once :math:`\mu / \sigma` passes about :math:`1/\sqrt{\epsilon}` (4,000 in
    float32). The result can even be negative.
    """
    mean = x.mean(dim, keepdim=True)
    return mean, (x * x).mean(dim, keepdim=True) - mean * mean


def two_pass_var(x, dim=-1):
    r"""The mean, then the mean square of ``x - mean``: no large terms cancel.

    The centred values are small and exact to within the rounding of the mean, so the error
    of the variance no longer grows with :math:`\mu^2`.
    """
    mean = x.mean(dim, keepdim=True)
    centred = x - mean
    return mean, (centred * centred).mean(dim, keepdim=True)


def welford_var(x, dim=-1):
    r"""Welford's one-pass update, one value at a time along ``dim`` (a Python loop over it).

    .. math:: \delta = x_k - \mu_{k-1}, \quad \mu_k = \mu_{k-1} + \frac{\delta}{k}, \quad
              M_{2,k} = M_{2,k-1} + \delta\,(x_k - \mu_k)

    Every update adds a product of two deviations from the running mean, never a raw square.
    """
    x = x.movedim(dim, 0)
    mean = torch.zeros_like(x[0])
    m2 = torch.zeros_like(x[0])
    for k, x_k in enumerate(x, start=1):
        delta = x_k - mean
        mean = mean + delta / k
        m2 = m2 + delta * (x_k - mean)
    n = x.shape[0]
    return mean.unsqueeze(dim), (m2 / n).unsqueeze(dim)


def moments(x, dim=-1):
    """The :class:`Moments` of ``x`` over ``dim`` (kept), by two passes."""
    count = torch.full_like(x.sum(dim, keepdim=True), x.shape[dim])
    if x.shape[dim] == 0:                                     # an empty chunk: nothing to add
        return Moments(count, torch.zeros_like(count), torch.zeros_like(count))
    mean, var = two_pass_var(x, dim)
    return Moments(count, mean, var * count)


def chan_merge(a, b):
    r"""Merge the :class:`Moments` of two disjoint chunks into those of their union.

    .. math:: n = n_a + n_b, \quad \delta = \mu_b - \mu_a, \quad
              \mu = \mu_a + \delta \frac{n_b}{n}, \quad
              M_2 = M_{2,a} + M_{2,b} + \delta^2 \frac{n_a n_b}{n}

    Exact in exact arithmetic, and stable in floating point: it combines centred quantities
    only. An empty chunk (count 0) drops out.
    """
    count = a.count + b.count
    safe = torch.where(count > 0, count, 1)                   # two empty chunks stay empty
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / safe)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / safe)
    return Moments(count, mean, m2)


def chan_var(x, dim=-1, chunks=8):
    """Mean and variance from ``chunks`` separate pieces of ``x`` along ``dim``, merged one by one:
    what SyncBatchNorm does with one piece per device."""
    parts = [moments(piece, dim) for piece in torch.tensor_split(x, chunks, dim)]
    total = parts[0]
    for part in parts[1:]:
        total = chan_merge(total, part)
    return total.mean, total.var

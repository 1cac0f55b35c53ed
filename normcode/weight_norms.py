r"""Normalizing the weights instead of the activations: weight normalization, spectral
normalization and weight standardization.

None of these has statistics over a batch: each is a function of the weight tensor alone, so
training and evaluation compute the same layer (spectral normalization's power iteration
aside, which only refines an estimate) and the batch size does not enter.

- :func:`weight_norm` (Salimans & Kingma 2016): :math:`w = g\, v / \lVert v \rVert`, as
  ``torch.nn.utils.parametrizations.weight_norm``: the same parametrization, state-dict keys
  and ``dim`` rule, in plain tensor operations (not torch's fused ``_weight_norm`` kernel).
- :func:`spectral_norm` (Miyato et al. 2018): :math:`W / \sigma(W)`, the largest singular
  value estimated by power iteration, as ``torch.nn.utils.parametrizations.spectral_norm``:
  the same ``_u``, ``_v`` buffers, the same random start and the same iterations.
- :func:`normcode.weight_norms.standardize_weight` and :class:`StdConv2d` (Qiao et al. 2019; Kolesnikov et al. 2020):
  each output channel's filter standardized to mean 0 and variance 1, as BiT's ``StdConv2d``.
"""
import torch
from torch import nn
from torch.nn.utils import parametrize

from . import functional as F


# --------------------------------------------------------------------------------------------
# Weight normalization
# --------------------------------------------------------------------------------------------
def _check_dim(dim, ndim):
    if not -ndim <= dim < ndim:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-ndim}, "
                         f"{ndim - 1}], but got {dim})")


def norm_except_dim(v, dim):
    r"""The Euclidean norm of ``v`` over every dim but ``dim``, kept: one norm per slice
    ``v.select(dim, i)``, shaped to broadcast against ``v``. ``dim=-1`` is torch's code for
    "the whole tensor" (a 0-d norm), not the last dim: ``torch.norm_except_dim``'s rule, which
    ``weight_norm(dim=None)`` relies on."""
    if dim == -1:
        return (v * v).sum().sqrt()
    _check_dim(dim, v.dim())
    dim %= v.dim()
    others = tuple(d for d in range(v.dim()) if d != dim)
    return (v * v).sum(others, keepdim=True).sqrt()


class _WeightNorm(nn.Module):
    r"""The parametrization :math:`w = g\, v / \lVert v \rVert`, norms taken over every dim of v
    but ``dim`` (over all of v for ``dim=None``). ``original0`` is g, ``original1`` is v."""

    def __init__(self, dim=0):
        super().__init__()
        self.dim = -1 if dim is None else dim       # torch's code for the whole tensor

    def forward(self, weight_g, weight_v):
        return weight_v * (weight_g / norm_except_dim(weight_v, self.dim))

    def right_inverse(self, weight):
        # g = ||w||, v = w: the same weight, now as a magnitude and a direction.
        return norm_except_dim(weight, self.dim), weight


def weight_norm(module, name="weight", dim=0):
    r"""Weight normalization of ``module.<name>``, as
    ``torch.nn.utils.parametrizations.weight_norm``.

    Salimans & Kingma 2016.

    .. math:: w = g \frac{v}{\lVert v \rVert}

    ``dim=0`` (the default) keeps one magnitude g per output unit (per slice along dim 0);
    ``dim=None`` one magnitude for the whole tensor. The parameter is replaced by
    ``parametrizations.<name>.original0`` (g) and ``original1`` (v), torch's keys, so state
    dicts load both ways.
    """
    parametrize.register_parametrization(module, name, _WeightNorm(dim), unsafe=True)

    def old_keys(state_dict, prefix, *args):
        # Checkpoints of the older torch.nn.utils.weight_norm name g and v "<name>_g", "<name>_v".
        g, v = f"{prefix}{name}_g", f"{prefix}{name}_v"
        if g in state_dict and v in state_dict:
            state_dict[f"{prefix}parametrizations.{name}.original0"] = state_dict.pop(g)
            state_dict[f"{prefix}parametrizations.{name}.original1"] = state_dict.pop(v)

    module._register_load_state_dict_pre_hook(old_keys)
    return module


# --------------------------------------------------------------------------------------------
# Spectral normalization
# --------------------------------------------------------------------------------------------
def _normalize(x, eps):
    """``x / max(||x||, eps)``, as ``torch.nn.functional.normalize`` of a vector."""
    return x / (x * x).sum().sqrt().clamp_min(eps)


class _SpectralNorm(nn.Module):
    r""":math:`W / \sigma(W)`, with :math:`\sigma(W) \approx u^\top W v` from power iteration.

    W is viewed as a matrix with ``dim`` first and the other dims flattened. The singular
    vectors ``_u`` and ``_v`` are buffers: drawn at random, refined by 15 iterations at
    construction, then by ``n_power_iterations`` at every forward in training; in evaluation
    they stay. A 1-D weight is divided by its Euclidean norm.
    """

    def __init__(self, weight, n_power_iterations=1, dim=0, eps=1e-12):
        super().__init__()
        ndim = weight.ndim
        _check_dim(dim, ndim)
        if n_power_iterations <= 0:
            raise ValueError("Expected n_power_iterations to be positive, but got "
                             f"n_power_iterations={n_power_iterations}")
        self.dim = dim % ndim
        self.eps = eps
        if ndim > 1:
            self.n_power_iterations = n_power_iterations
            weight_mat = self._reshape_weight_to_matrix(weight)
            h, w = weight_mat.shape
            # The same draws in the same order as torch, so that one seed gives one start.
            u = weight_mat.new_empty(h).normal_(0, 1)
            v = weight_mat.new_empty(w).normal_(0, 1)
            self.register_buffer("_u", _normalize(u, eps))
            self.register_buffer("_v", _normalize(v, eps))
            self._power_method(weight_mat, 15)       # start from estimates, not random vectors

    def _reshape_weight_to_matrix(self, weight):
        if self.dim != 0:
            weight = weight.permute(self.dim, *(d for d in range(weight.dim()) if d != self.dim))
        return weight.flatten(1)                      # (size of dim, everything else)

    @torch.no_grad()
    def _power_method(self, weight_mat, n_power_iterations):
        r""":math:`u \leftarrow Wv / \lVert Wv \rVert`, :math:`v \leftarrow W^\top u / \lVert
        W^\top u \rVert`, in place (the buffers stay the same tensors)."""
        for _ in range(n_power_iterations):
            self._u.copy_(_normalize(weight_mat @ self._v, self.eps))
            self._v.copy_(_normalize(weight_mat.mH @ self._u, self.eps))

    def forward(self, weight):
        if weight.ndim == 1:
            return _normalize(weight, self.eps)
        weight_mat = self._reshape_weight_to_matrix(weight)
        if self.training:
            self._power_method(weight_mat, self.n_power_iterations)
        # Copies: the buffers move at the next forward, before a backward may read them.
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        sigma = (u.conj() * (weight_mat @ v)).sum()   # u^T W v; no gradient flows into u, v
        return weight / sigma

    def right_inverse(self, value):
        return value


def spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, dim=None):
    r"""Spectral normalization of ``module.<name>``, as
    ``torch.nn.utils.parametrizations.spectral_norm``.

    Miyato et al. 2018.

    .. math:: W_{SN} = \frac{W}{\sigma(W)}, \qquad
              \sigma(W) = \max_{h \ne 0} \frac{\lVert W h \rVert_2}{\lVert h \rVert_2}

    ``dim`` is the output dim: 0, except 1 for a transposed convolution (the default ``None``
    chooses). State-dict keys: ``parametrizations.<name>.original`` and
    ``parametrizations.<name>.0._u`` / ``._v``, as torch's.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        # torch's class, ValueError, though TypeError would be the usual choice.
        raise ValueError(  # noqa: TRY004
            f"Module '{module}' has no parameter or buffer with name '{name}'")
    if dim is None:
        transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        dim = 1 if isinstance(module, transposed) else 0
    parametrize.register_parametrization(
        module, name, _SpectralNorm(weight, n_power_iterations, dim, eps))
    return module


# --------------------------------------------------------------------------------------------
# Weight standardization
# --------------------------------------------------------------------------------------------
#: BiT's constant: ``torch.sqrt(v + 1e-10)`` in google-research/big_transfer's StdConv2d.
WS_EPS = 1e-10


def standardize_weight(weight, eps=WS_EPS):
    r"""Each output channel's filter standardized: mean 0 and variance 1 over (C_in, kernel dims).

    .. math:: \hat W_{o} = \frac{W_{o} - \mathrm{E}[W_{o}]}{\sqrt{\mathrm{Var}[W_{o}] + \epsilon}}

    Biased variance (divide by the fan-in), eps inside the square root, eps = 1e-10: the
    convention of BiT's ``StdConv2d`` (Kolesnikov et al. 2020; ``torch.var_mean(w, dim=[1, 2,
    3], unbiased=False)``). Qiao et al.'s original code divides by the unbiased standard
    deviation plus 1e-5 instead; the two differ by a factor sqrt(n / (n - 1)) in the scale.
    The statistics are BatchNorm's (``normcode.functional._moments``), over dims 1 and up.
    """
    dims = tuple(range(1, weight.dim()))
    mean, var = F._moments(weight, dims)
    return (weight - mean) * F._inverse_std(var, eps, "standardize_weight")


class StdConv2d(nn.Conv2d):
    r"""A ``Conv2d`` whose weight is standardized per output channel at every forward.

    Qiao et al. 2019 (Weight Standardization); the ``StdConv2d`` of BiT (Kolesnikov et al.
    2020), which pairs it with GroupNorm. Same arguments as ``torch.nn.Conv2d``, plus ``eps``
    (BiT's 1e-10 by default). The stored ``weight`` is the raw parameter; the convolution uses
    :func:`normcode.weight_norms.standardize_weight` of it.
    """

    def __init__(self, *args, eps=WS_EPS, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, input):
        return self._conv_forward(input, standardize_weight(self.weight, self.eps), self.bias)

    def extra_repr(self):
        return f"{super().extra_repr()}, eps={self.eps}"

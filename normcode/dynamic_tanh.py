"""DynamicTanh: the element-wise stand-in for a normalization layer (Zhu et al. 2025)."""
import numbers

import torch
from torch import nn


class DynamicTanh(nn.Module):
    r"""Dynamic Tanh, as in the public code of Zhu, Chen, He, LeCun & Liu (2025).

    .. math:: y = \tanh(\alpha x) \cdot \gamma + \beta

    No statistics: one learnable scalar ``alpha`` of shape (1,), and ``weight`` (:math:`\gamma`,
    ones) and ``bias`` (:math:`\beta`, zeros) of shape ``normalized_shape``. With
    ``channels_last`` they act on the trailing dims, as LayerNorm's do; otherwise on dim 1 of an
    (N, C, H, W) input, ``normalized_shape`` being C. Each output element depends on its own
    input element only, the same in training and evaluation.

    Args:
        normalized_shape: the shape of ``weight`` and ``bias`` (an int, or a tuple).
        channels_last: whether the channels are the input's last dims (True) or dim 1.
        alpha_init_value: the initial value of ``alpha``.

    The state-dict keys are the authors': ``alpha``, ``weight`` and ``bias``.
    """

    def __init__(self, normalized_shape, channels_last=True, alpha_init_value=0.5):
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (int(normalized_shape),)
        self.normalized_shape = tuple(normalized_shape)
        self.alpha_init_value = alpha_init_value
        self.channels_last = channels_last
        self.alpha = nn.Parameter(torch.empty(1))
        self.weight = nn.Parameter(torch.empty(self.normalized_shape))
        self.bias = nn.Parameter(torch.empty(self.normalized_shape))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init_value)
            self.weight.fill_(1.0)
            self.bias.fill_(0.0)

    def forward(self, x):
        x = torch.tanh(self.alpha * x)
        if self.channels_last:
            return x * self.weight + self.bias
        trailing = (1,) * (x.dim() - 2)  # (C,) -> (C, 1, 1) for an (N, C, H, W) input
        return x * self.weight.view(-1, *trailing) + self.bias.view(-1, *trailing)

    def extra_repr(self):
        return (f"normalized_shape={self.normalized_shape}, "
                f"alpha_init_value={self.alpha_init_value}, channels_last={self.channels_last}")

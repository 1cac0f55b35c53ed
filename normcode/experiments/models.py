"""The networks the chapters train: a fully connected and a convolutional digits classifier,
and the deliberately shifted "noisy BatchNorm" of Santurkar et al. (2018)."""
import torch
from torch import nn

from ..modules import BatchNorm1d


def digits_mlp(hidden=(100, 100, 100), norm=None, activation=nn.Sigmoid, init_std=None, seed=0):
    """A fully connected classifier for flattened digits (64 inputs, 10 classes).

    ``norm(width)`` (for example ``normcode.BatchNorm1d``), if given, sits between each hidden
    linear layer and its activation, where Ioffe & Szegedy put it. ``init_std``, if given, draws
    every weight from N(0, init_std^2) and zeroes the biases, to study the initialisation scale.
    """
    torch.manual_seed(seed)
    layers, width = [], 64
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if norm is not None:
            layers.append(norm(h))
        layers.append(activation())
        width = h
    layers.append(nn.Linear(width, 10))
    model = nn.Sequential(*layers)
    if init_std is not None:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=init_std)
                nn.init.zeros_(m.bias)
    return model


def digits_cnn(norm, channels=(16, 32, 32), seed=0):
    """A small convolutional classifier for (N, 1, 8, 8) digits: three 3x3 conv layers, each
    followed by ``norm(num_channels)`` and a ReLU (8x8 -> 8x8 -> 4x4 -> 2x2), then global
    average pooling and a linear layer. ``norm`` is for example ``normcode.BatchNorm2d`` or
    ``lambda c: normcode.GroupNorm(4, c)``."""
    torch.manual_seed(seed)
    layers, width = [], 1
    for i, c in enumerate(channels):
        layers += [nn.Conv2d(width, c, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                   norm(c), nn.ReLU()]
        width = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


class NoisyBatchNorm1d(BatchNorm1d):
    r"""BatchNorm1d followed, in training, by a distribution shift redrawn at every step.

    Santurkar et al. (2018)'s "noisy BatchNorm", in its simplest form: at each training forward,
    every unit j gets a random scale :math:`s_j` (log-uniform in [1/scale, scale]) and shift
    :math:`m_j` (uniform in [-shift, shift]), and the layer returns :math:`s_j y_j + m_j`. The
    next layer thus sees a mean and a variance that jump at every step: far more internal
    covariate shift than a network without BatchNorm has. Eval mode adds nothing. The draws use
    the global random generator (seed it for a reproducible run).
    """

    def __init__(self, num_features, *args, shift=1.0, scale=2.0, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.shift, self.scale = shift, scale

    def forward(self, input):
        y = super().forward(input)
        if not self.training:
            return y
        shape = (1, -1) + (1,) * (y.dim() - 2)                 # per channel
        s = self.scale ** (2 * torch.rand(y.shape[1]) - 1)
        m = self.shift * (2 * torch.rand(y.shape[1]) - 1)
        return y * s.to(y).reshape(shape) + m.to(y).reshape(shape)

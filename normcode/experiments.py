"""Small, seeded experiments at CPU scale, on real data that ships inside scikit-learn.

``load_digits`` holds 1,797 real 8x8 handwritten digits: the stand-in for MNIST in every
chapter that trains a network. Nothing here downloads anything.
"""
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Digits:
    """The digits, split once into train and test, as float tensors."""
    x_train: torch.Tensor        # (N_train, 1, 8, 8), pixel values scaled to [0, 1]
    y_train: torch.Tensor        # (N_train,) labels 0..9
    x_test: torch.Tensor
    y_test: torch.Tensor

    def flat(self):
        """The same split with images flattened to (N, 64), for fully connected networks."""
        return Digits(self.x_train.flatten(1), self.y_train, self.x_test.flatten(1), self.y_test)


def load_digits(test_fraction=0.25, seed=0, dtype=torch.float32):
    """scikit-learn's digits, shuffled with ``seed`` and split into train and test."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = torch.tensor(bunch.images, dtype=dtype).unsqueeze(1) / 16.0      # (1797, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


@torch.no_grad()
def accuracy(model, x, y, batch_size=512):
    """Share of correct predictions, with the model in eval mode (restored afterwards)."""
    was_training = model.training
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(y), batch_size))
    model.train(was_training)
    return correct / len(y)


@dataclass
class History:
    """What :func:`train` records: the steps at which it evaluated, and the values there."""
    steps: list = field(default_factory=list)
    test_accuracy: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)


def train(model, data, *, steps, batch_size, lr, seed=0, momentum=0.0, eval_every=None,
          callback=None):
    """Train ``model`` on ``data`` with plain SGD and cross-entropy for ``steps`` mini-batches.

    Batches are drawn without replacement, reshuffled each epoch, from a generator seeded by
    ``seed``, so a run is deterministic. Every ``eval_every`` steps (and at the end) it records
    the test accuracy and the latest training loss; ``callback(step, model)``, if given, runs
    after every step. Returns a :class:`History`. A loss that becomes NaN or inf stops training
    early (recorded as such), so a diverging configuration is visible, not hidden.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    history = History()
    n = len(data.y_train)
    order, cursor = torch.randperm(n, generator=g), 0
    model.train()
    for step in range(1, steps + 1):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=g), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if callback is not None:
            callback(step, model)
        diverged = not torch.isfinite(loss).item()
        if diverged or step == steps or (eval_every and step % eval_every == 0):
            history.steps.append(step)
            history.train_loss.append(loss.item())
            history.test_accuracy.append(accuracy(model, data.x_test, data.y_test))
        if diverged:
            break
    return history


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

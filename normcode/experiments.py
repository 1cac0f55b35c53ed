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


# ============================================================================================
# Chapter "Internal covariate shift": looking inside a network while it trains, and the
# deliberately shifted "noisy BatchNorm" of Santurkar et al. (2018).
# ============================================================================================
from contextlib import contextmanager                    # noqa: E402  (this chapter's imports)

from .modules import BatchNorm1d                          # noqa: E402


@contextmanager
def frozen_buffers(model):
    """Run ``model`` without leaving a trace: its buffers (running statistics, batch counters)
    are put back on exit, so a training-mode forward used as a probe changes nothing."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        yield model
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


@torch.no_grad()
def activation_inputs(model, x, activation=nn.Sigmoid):
    """The input of every ``activation`` module of ``model`` on ``x``, as (layers, N, units).

    The model runs in training mode, so a BatchNorm normalizes with the statistics of ``x``, as it
    does during training; buffers and the train/eval mode are restored afterwards.
    """
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for m in model.modules() if isinstance(m, activation)]
    was_training = model.training
    try:
        with frozen_buffers(model):
            model.train()
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return torch.stack(inputs)


class TrainingProbe:
    """A :func:`train` callback that looks inside the network every ``every`` steps.

    Records ``activation_inputs(model, probe)`` (layers, N, units) and the norm of the gradient
    that reached the first layer's weight, averaged over the steps since the last record.
    """

    def __init__(self, probe, every, activation=nn.Sigmoid):
        self.probe, self.every, self.activation = probe, every, activation
        self.steps, self.inputs, self.first_layer_grad = [], [], []
        self._grad_sum = 0.0

    def __call__(self, step, model):
        first = next(m for m in model.modules() if isinstance(m, nn.Linear))
        self._grad_sum += first.weight.grad.norm().item()
        if step % self.every == 0:
            self.steps.append(step)
            self.inputs.append(activation_inputs(model, self.probe, self.activation))
            self.first_layer_grad.append(self._grad_sum / self.every)
            self._grad_sum = 0.0

    def stacked_inputs(self):
        """All recorded activation inputs, (records, layers, N, units)."""
        return torch.stack(self.inputs)


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


@torch.no_grad()
def companion_outputs(model, x, pool, batch_size, draws, generator=None):
    """How a sample's training-mode output depends on the rest of its mini-batch.

    For every row of ``x`` and each of ``draws`` draws, runs ``model`` in training mode on that
    row together with ``batch_size - 1`` companions drawn from ``pool`` and keeps the row's
    output. Returns (draws, len(x), outputs). Buffers and mode are restored.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    outputs = []
    was_training = model.training
    with frozen_buffers(model):
        model.train()
        for _ in range(draws):
            companions = pool[torch.randperm(len(pool), generator=g)[:batch_size - 1]]
            outputs.append(torch.stack([model(torch.cat([row[None], companions]))[0] for row in x]))
    model.train(was_training)
    return torch.stack(outputs)


def loss_along_gradient(model, x, y, step_sizes):
    r"""The loss landscape along the gradient direction, as Santurkar et al. (2018) probe it.

    Takes the gradient :math:`g` of the cross-entropy on the batch ``(x, y)`` at the current
    parameters :math:`\theta` and steps to :math:`\theta - \eta g` for every ``eta`` in
    ``step_sizes``. Returns ``(losses, beta)``: the loss at each of those points, and the
    effective beta-smoothness :math:`\max_\eta \|\nabla L(\theta - \eta g) - g\| / \|\eta g\|`, how
    fast the gradient changes per unit of distance along the step. Runs in training mode with
    buffers frozen; parameters, mode and every ``.grad`` are left as they were.
    """
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    was_training = model.training
    losses, beta = [], 0.0
    with frozen_buffers(model):
        model.train()
        g = torch.autograd.grad(loss_fn(model(x), y), params)
        g_norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
        for eta in step_sizes:
            with torch.no_grad():
                for p, p0, gi in zip(params, start, g):
                    p.copy_(p0 - eta * gi)
            loss = loss_fn(model(x), y)
            g_eta = torch.autograd.grad(loss, params)
            change = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g_eta, g)))
            losses.append(loss.item())
            beta = max(beta, (change / (eta * g_norm)).item())
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
    model.train(was_training)
    return losses, beta


# ============================================================================================
# Chapters "GroupNorm" and "SwitchableNorm": one network trained at several batch sizes.
# ============================================================================================
def batch_size_sweep(make_model, data, batch_sizes, *, samples, base_lr, base_batch=32, seed=0,
                     momentum=0.0):
    """Train a fresh ``make_model()`` at each batch size, with the linear scaling rule.

    Every run sees the same number of training samples (``samples // batch_size`` steps, so a
    fixed number of epochs) at learning rate ``base_lr * batch_size / base_batch``, as Wu & He
    (2018) train their batch-size comparison. Returns ``{batch_size: (model, History)}``.
    """
    runs = {}
    for batch_size in batch_sizes:
        model = make_model()
        history = train(model, data, steps=samples // batch_size, batch_size=batch_size,
                        lr=base_lr * batch_size / base_batch, seed=seed, momentum=momentum)
        runs[batch_size] = (model, history)
    return runs

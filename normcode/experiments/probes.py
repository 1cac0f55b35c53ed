"""Looking inside a network while it trains: activation inputs, gradients, how a sample's
output depends on its batch, and the loss along the gradient (Santurkar et al., 2018)."""
from contextlib import contextmanager

import torch
from torch import nn


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

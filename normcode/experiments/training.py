"""Training and evaluation loops: plain SGD, seeded batches, test accuracy in eval mode."""
from dataclasses import dataclass, field

import torch
from torch import nn


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


def shuffled_batches(n, batch_size, steps, generator):
    """``steps`` batches of indices into ``n`` samples, drawn without replacement and
    reshuffled at each epoch (a last batch that would run short starts the next epoch)."""
    order, cursor = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        yield order[cursor:cursor + batch_size]
        cursor += batch_size


def sgd_step(model, opt, x, y):
    """One optimizer step on the cross-entropy of ``model(x)`` against ``y``; returns the loss."""
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def train(model, data, *, steps, batch_size, lr, seed=0, momentum=0.0, eval_every=None,
          callback=None):
    """Train ``model`` on ``data`` with plain SGD and cross-entropy for ``steps`` mini-batches.

    Batches are :func:`shuffled_batches` from a generator seeded by ``seed``, so a run is
    deterministic. Every ``eval_every`` steps (and at the end) it records
    the test accuracy and the latest training loss; ``callback(step, model)``, if given, runs
    after every step. Returns a :class:`History`. A loss that becomes NaN or inf stops training
    early (recorded as such), so a diverging configuration is visible, not hidden.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    history = History()
    model.train()
    batches = shuffled_batches(len(data.y_train), batch_size, steps, g)
    for step, idx in enumerate(batches, start=1):
        loss = sgd_step(model, opt, data.x_train[idx], data.y_train[idx])
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

"""BatchNorm's two modes in a trained network: the study of ``question_train_eval``.

The digits CNN (:func:`normcode.experiments.digits_cnn` with BatchNorm2d) is trained at two
batch sizes with the same number of samples seen, over a grid of learning rates and several
seeds, and scored with batch statistics (training mode) and with running statistics (eval
mode, from several momenta, or recalibrated after training).

Training many small models one after the other is dominated by Python overhead at batch 2, so
:func:`train_ensemble` trains K copies side by side as ONE network whose convolutions are
grouped (``groups=K``): copy k owns channel block k of every layer. BatchNorm's statistics
are per channel, so each copy is normalized with the statistics of its own batch only, exactly
as if it were trained alone; each copy draws its own batches (its own seed) and takes its own
learning rate. :func:`split_ensemble` turns the trained block k back into an ordinary
``digits_cnn``. ``tests/test_claims_question_train_eval.py`` asserts that a copy trained in
the ensemble equals the same model trained alone by :func:`normcode.experiments.train`, up to
float32 rounding (grouped and separate convolutions round differently; at batch 2 such
differences grow over a long run, as they would between any two machines).
"""
import copy
from dataclasses import dataclass

import torch
from torch import nn

from .models import digits_cnn
from .training import shuffled_batches


def bn_layers(model):
    """The BatchNorm layers of ``model`` (torch.nn's or normcode's), in order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
            or type(m).__name__.startswith("BatchNorm")]


def _conv_bn_layers(model):
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return convs, bn_layers(model), linear


def stack_models(models, norm):
    """One grouped network computing ``len(models)`` digits CNNs side by side.

    Input (N, K, 8, 8): channel k is copy k's image. Output (N, K, 10)."""
    K = len(models)
    convs, bns, linear = zip(*[_conv_bn_layers(m) for m in models])
    layers = []
    for i, conv in enumerate(convs[0]):
        big = nn.Conv2d(K * conv.in_channels, K * conv.out_channels, 3, stride=conv.stride,
                        padding=1, bias=False, groups=K)
        bn = norm(K * conv.out_channels)
        with torch.no_grad():
            big.weight.copy_(torch.cat([c[i].weight for c in convs]))   # block k = copy k
            bn.weight.copy_(torch.cat([b[i].weight for b in bns]))
            bn.bias.copy_(torch.cat([b[i].bias for b in bns]))
        layers += [big, bn, nn.ReLU()]
    head = nn.Conv2d(K * linear[0].in_features, K * 10, 1, groups=K)   # K linear heads
    with torch.no_grad():
        head.weight.copy_(torch.cat([lin.weight for lin in linear])[:, :, None, None])
        head.bias.copy_(torch.cat([lin.bias for lin in linear]))
    layers += [nn.AdaptiveAvgPool2d(1), head, nn.Flatten(), nn.Unflatten(1, (K, 10))]
    return nn.Sequential(*layers)


def split_ensemble(ensemble, k, K, norm, bn_states=None):
    """Copy k of a :func:`stack_models` network, as an ordinary ``digits_cnn(norm)``.

    ``bn_states``, if given, replaces the running statistics by those of other BatchNorm
    layers (one per layer, of the ensemble's width), such as the shadows of
    :func:`shadow_running_stats`."""
    model = digits_cnn(norm)
    convs, bns, linear = _conv_bn_layers(model)
    *big_convs, head = [m for m in ensemble.modules() if isinstance(m, nn.Conv2d)]
    big_bns = bn_layers(ensemble)
    sources = bn_states if bn_states is not None else big_bns
    with torch.no_grad():
        for conv, bn, big_conv, big_bn, source in zip(convs, bns, big_convs, big_bns, sources):
            C = conv.out_channels
            block = slice(k * C, (k + 1) * C)
            conv.weight.copy_(big_conv.weight[block])
            bn.weight.copy_(big_bn.weight[block])
            bn.bias.copy_(big_bn.bias[block])
            bn.running_mean.copy_(source.running_mean[block])
            bn.running_var.copy_(source.running_var[block])
            bn.num_batches_tracked.copy_(source.num_batches_tracked)
        linear.weight.copy_(head.weight[k * 10:(k + 1) * 10, :, 0, 0])
        linear.bias.copy_(head.bias[k * 10:(k + 1) * 10])
    return model


def _batch_orders(n, batch_size, steps, seed):
    """The indices :func:`normcode.experiments.train` draws, step by step, for ``seed``."""
    return shuffled_batches(n, batch_size, steps, torch.Generator().manual_seed(seed))


def train_ensemble(data, *, seeds, lrs, batch_size, steps, norm=nn.BatchNorm2d,
                   shadow_momenta=()):
    """Train ``digits_cnn(norm, seed=s)`` for every (seed s, learning rate lr) pair.

    Copy k is initialised with seed ``seeds[k]``, draws the batches ``train(..., seed=seeds[k])``
    would draw, and takes plain SGD steps of size ``lrs[k]`` on its own cross-entropy.
    Returns ``(models, shadows)``: the K trained ``digits_cnn`` and, for each momentum in
    ``shadow_momenta``, the K models carrying the running statistics kept at that momentum.
    """
    K = len(seeds)
    ensemble = stack_models([digits_cnn(norm, seed=s) for s in seeds], norm)
    shadows, hooks = shadow_running_stats(ensemble, shadow_momenta)
    lr = torch.tensor(lrs, dtype=torch.float32)[:, None]                # (K, 1)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    orders = [_batch_orders(len(data.y_train), batch_size, steps, s) for s in seeds]
    ensemble.train()
    for _ in range(steps):
        idx = torch.stack([next(o) for o in orders], 1)                  # (B, K)
        x = data.x_train[idx].squeeze(2)                                 # (B, K, 8, 8)
        logits = ensemble(x)                                             # (B, K, 10)
        # the sum over copies of each copy's mean loss: copy k's gradient is its own
        loss = loss_fn(logits.reshape(-1, 10), data.y_train[idx].reshape(-1)) / batch_size
        ensemble.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in ensemble.parameters():
                p.view(K, -1).sub_(lr * p.grad.view(K, -1))              # block k: lrs[k]
    for h in hooks:
        h.remove()
    models = [split_ensemble(ensemble, k, K, norm) for k in range(K)]
    shadow_models = {m: [split_ensemble(ensemble, k, K, norm, shadows[m]) for k in range(K)]
                     for m in shadow_momenta}
    return models, shadow_models


def shadow_running_stats(model, momenta):
    """For each momentum, copies of ``model``'s BatchNorm layers fed the same inputs in training.

    The running statistics never feed back into a training step, so the copies keep the
    running statistics the model would have kept at that momentum, without a second run.
    Returns ``({momentum: [layer copies]}, hook handles)``."""
    shadows, handles = {m: [] for m in momenta}, []
    for bn in bn_layers(model):
        copies = []
        for m in momenta:
            shadow = copy.deepcopy(bn)
            shadow.momentum = m
            shadows[m].append(shadow)
            copies.append(shadow)

        def feed(module, args, copies=copies):
            if module.training:
                with torch.no_grad():
                    for shadow in copies:
                        shadow.train()(args[0])

        handles.append(bn.register_forward_pre_hook(feed))
    return shadows, handles


@torch.no_grad()
def train_mode_accuracy(model, x, y, batch_size):
    """Accuracy with batch statistics: consecutive test batches of ``batch_size``, on a copy
    (so that the model's running statistics stay as they are)."""
    model = copy.deepcopy(model).train()
    n = len(y) // batch_size * batch_size
    correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, n, batch_size))
    return correct / n


@torch.no_grad()
def train_mode_accuracies(models, x, y, batch_size, norm=nn.BatchNorm2d):
    """:func:`train_mode_accuracy` of several ``digits_cnn`` models at once, stacked as in
    :func:`train_ensemble`: each model is still normalized with its own test batch only."""
    K = len(models)
    stacked = stack_models(models, norm).train()
    n = len(y) // batch_size * batch_size
    correct = torch.zeros(K)
    for i in range(0, n, batch_size):
        logits = stacked(x[i:i + batch_size].expand(-1, K, -1, -1))      # (B, K, 10)
        correct += (logits.argmax(-1) == y[i:i + batch_size, None]).sum(0)
    return (correct / n).tolist()


@torch.no_grad()
def recalibrate(model, x, batch_size=64):
    """A copy of ``model`` whose running statistics are re-estimated with its final weights:
    reset, ``momentum=None`` (the plain average), forward passes in training mode over ``x``."""
    model = copy.deepcopy(model)
    for bn in bn_layers(model):
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    return model.eval()


@dataclass
class GapStudy:
    """Test accuracies of :func:`gap_study`, each a tensor (len(lr_scales), len(seeds))."""
    batch_size: int
    lrs: list
    train_mode: torch.Tensor
    eval_mode: torch.Tensor
    recalibrated: torch.Tensor
    shadow_eval: dict            # momentum -> tensor, eval mode with those running statistics


def gap_study(data, batch_size, *, samples, lr_scales, seeds, base_batch=32,
              norm=nn.BatchNorm2d, shadow_momenta=()):
    """Train at ``batch_size`` for ``samples // batch_size`` steps, at learning rates
    ``scale * batch_size / base_batch`` for each scale (the same grid per sample seen at every
    batch size), for every seed, and score each model on the test set four ways."""
    from .training import accuracy

    steps = samples // batch_size
    lrs = [s * batch_size / base_batch for s in lr_scales]
    pairs = [(lr, seed) for lr in lrs for seed in seeds]
    models, shadows = train_ensemble(data, seeds=[s for _, s in pairs],
                                     lrs=[lr for lr, _ in pairs], batch_size=batch_size,
                                     steps=steps, norm=norm, shadow_momenta=shadow_momenta)
    shape = (len(lrs), len(seeds))

    def score(f, ms):
        return torch.tensor([f(m) for m in ms], dtype=torch.float64).reshape(shape)

    x, y = data.x_test, data.y_test
    return GapStudy(
        batch_size, lrs,
        train_mode=torch.tensor(train_mode_accuracies(models, x, y, batch_size, norm),
                                dtype=torch.float64).reshape(shape),
        eval_mode=score(lambda m: accuracy(m, x, y), models),
        recalibrated=score(lambda m: accuracy(recalibrate(m, data.x_train), x, y), models),
        shadow_eval={m: score(lambda s: accuracy(s, x, y), shadows[m])
                     for m in shadow_momenta})

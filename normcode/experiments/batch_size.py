"""Batch-size studies of GroupNorm, BatchNorm and SwitchableNorm at CPU scale, over many seeds.

Wu & He (2018, Figure 1) and Luo et al. (2019) compare normalizers at several batch sizes. One
digits run is noisy (a few hundred test images, one initialization, one batch order), so every
comparison here runs several *members* side by side, each an independent ``digits_cnn`` with its
own seed (its own data split, initialization and batch order) and its own learning rate.

The members are packed into one network: grouped convolutions put member ``k``'s channels in
the ``k``-th block, its norm layer sees only its own block, and the input carries member ``k``'s
images in channel ``k``. The members share no parameter, statistic or gradient, so the pack is
the members trained one after another (``tests/test_claims_groupnorm.py`` checks it), at the cost of
about one run: a tiny network's step is dominated by per-call overhead, not arithmetic.
"""
from dataclasses import dataclass, field
from itertools import product

import torch
import torch.nn.functional as F
from torch import nn

from .data import load_digits
from .models import digits_cnn


class Split(nn.Module):
    """Apply ``modules[k]`` to the ``k``-th of ``len(modules)`` equal blocks of channels."""

    def __init__(self, modules):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x):
        blocks = x.chunk(len(self.parts), dim=1)
        return torch.cat([m(b) for m, b in zip(self.parts, blocks)], dim=1)


def _pack_norm(norms):
    """One layer doing ``norms[k]`` on block ``k``: a single wide BatchNorm2d or GroupNorm (one
    call, same numbers: their statistics never cross a block), otherwise a :class:`Split`."""
    first, S = norms[0], len(norms)
    dtype = next(first.parameters()).dtype
    if type(first) is nn.BatchNorm2d:
        wide = nn.BatchNorm2d(S * first.num_features, first.eps, first.momentum, dtype=dtype)
    elif type(first) is nn.GroupNorm:
        wide = nn.GroupNorm(S * first.num_groups, S * first.num_channels, first.eps,
                            dtype=dtype)
    else:
        return Split(norms)
    with torch.no_grad():
        for name, tensor in list(wide.named_parameters()) + list(wide.named_buffers()):
            if name != "num_batches_tracked":
                tensor.copy_(torch.cat([getattr(m, name) for m in norms]))
    return wide


class PackedCNN(nn.Module):
    """``len(members)`` independent ``digits_cnn`` networks run as one (see the module doc).

    Input (N, S, 8, 8): member ``k``'s images in channel ``k``. Output (N, S, 10).
    """

    def __init__(self, members):
        super().__init__()
        S = self.size = len(members)
        layers = []
        for parts in zip(*members):
            first = parts[0]
            if isinstance(first, nn.Conv2d):
                conv = nn.Conv2d(S * first.in_channels, S * first.out_channels,
                                 first.kernel_size, first.stride, first.padding, groups=S,
                                 bias=False, dtype=first.weight.dtype)
                with torch.no_grad():
                    conv.weight.copy_(torch.cat([p.weight for p in parts]))
                layers.append(conv)
            elif isinstance(first, nn.Linear):
                self.head_weight = nn.Parameter(torch.stack([p.weight for p in parts]))
                self.head_bias = nn.Parameter(torch.stack([p.bias for p in parts]))
            elif isinstance(first, (nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten)):
                layers.append(first)
            else:
                layers.append(_pack_norm(list(parts)))
        self.body = nn.Sequential(*layers)            # ends with the pooling and Flatten

    def forward(self, x):
        features = self.body(x).unflatten(1, (self.size, -1))            # (N, S, C)
        return torch.einsum("nsc,sjc->nsj", features, self.head_weight) + self.head_bias

    def norm_layers(self, k):
        """Member ``k``'s own norm modules, where they are kept whole (a :class:`Split`)."""
        return [m.parts[k] for m in self.body if isinstance(m, Split)]


@dataclass
class Member:
    """One independent run: its seed (data split, initialization, batch order) and its lr."""
    seed: int
    base_lr: float


def members_data(members, test_fraction, dtype=torch.float32):
    """Each member's digits split, stacked: (x_train, y_train, x_test, y_test), the images as
    (n, S, 8, 8) and the labels as (n, S)."""
    datas = [load_digits(test_fraction=test_fraction, seed=m.seed, dtype=dtype)
             for m in members]
    stack = lambda name: torch.stack([getattr(d, name) for d in datas], 1)
    x_train, y_train = stack("x_train")[:, :, 0], stack("y_train")            # (n, S, 8, 8)
    x_test, y_test = stack("x_test")[:, :, 0], stack("y_test")
    return x_train, y_train, x_test, y_test


def train_packed(model, members, x_train, y_train, *, steps, batch_size, lr_scale,
                 momentum=0.0):
    """SGD on every member at once, each exactly as ``training.train`` would run it alone.

    Member ``k`` draws its batches from a generator seeded with its seed, reshuffling each
    epoch as ``train`` does, and steps with learning rate ``base_lr * lr_scale``. Its loss is
    its own batch mean; the pack minimizes the sum, so each member gets its own gradient, and
    scaling that gradient by the member's learning rate is SGD (with momentum) at that rate.
    """
    n, S = y_train.shape
    gens = [torch.Generator().manual_seed(m.seed) for m in members]
    orders = [torch.randperm(n, generator=g) for g in gens]
    cursor = 0
    lrs = [m.base_lr * lr_scale for m in members]
    top = max(lrs)
    opt = torch.optim.SGD(model.parameters(), lr=top, momentum=momentum)
    member = torch.arange(S)
    model.train()
    for _ in range(steps):
        if cursor + batch_size > n:
            orders, cursor = [torch.randperm(n, generator=g) for g in gens], 0
        idx = torch.stack([o[cursor:cursor + batch_size] for o in orders], 1)    # (B, S)
        cursor += batch_size
        logits = model(x_train[idx, member])                                 # (B, S, 10)
        loss = F.cross_entropy(logits.flatten(0, 1), y_train[idx, member].flatten(),
                               reduction="sum") / batch_size
        opt.zero_grad()
        loss.backward()
        if min(lrs) < top:                  # member k's gradient times lr_k / top
            _scale_gradients(model, torch.tensor([lr / top for lr in lrs],
                                                 dtype=torch.float64))
        opt.step()
    return model


def _scale_gradients(model, scale):
    own = {id(p): k for m in model.body if isinstance(m, Split)
           for k, part in enumerate(m.parts) for p in part.parameters()}
    for p in model.parameters():
        if p.grad is None:
            continue
        if id(p) in own:                            # a Split member's own parameter
            p.grad.mul_(scale[own[id(p)]].item())
        else:                                       # packed: member k's block is row k
            p.grad.view(len(scale), -1).mul_(scale.to(p.grad).view(-1, 1))


@torch.no_grad()
def wrong_counts(model, x_test, y_test, batch_size=512):
    """Per member, how many of its test images it gets wrong, in eval mode."""
    model.eval()
    wrong = sum((model(x_test[i:i + batch_size]).argmax(-1) != y_test[i:i + batch_size])
                .sum(0) for i in range(0, len(y_test), batch_size))
    model.train()
    return [int(w) for w in wrong]


@dataclass
class Study:
    """Test errors of a batch-size study: ``wrong[(base_lr, batch_size)]`` lists the wrong
    test images of each seed (in ``seeds`` order) out of ``n_test``."""
    seeds: tuple
    base_lrs: tuple
    batch_sizes: tuple
    n_test: int
    wrong: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)

    def error(self, base_lr, batch_size):
        """Test error of each seed, as a fraction."""
        return [w / self.n_test for w in self.wrong[(base_lr, batch_size)]]


def batch_size_study(norm, *, batch_sizes, seeds, base_lrs=(0.1,), epochs=2,
                     momentum=0.0, test_fraction=0.5, base_batch=32, keep_models=False):
    """Train ``digits_cnn(norm, seed=s)`` for every seed and base learning rate at each batch
    size, for ``epochs`` epochs (the same samples seen at every batch size), with the linear
    scaling rule lr = base_lr * batch_size / base_batch. Each seed has its own data split
    (``load_digits(test_fraction, seed)``), initialization and batch order."""
    members = [Member(s, lr) for lr, s in product(base_lrs, seeds)]
    x_train, y_train, x_test, y_test = members_data(members, test_fraction)
    study = Study(tuple(seeds), tuple(base_lrs), tuple(batch_sizes), len(y_test))
    for b in batch_sizes:
        model = PackedCNN([digits_cnn(norm, seed=m.seed) for m in members])
        train_packed(model, members, x_train, y_train, steps=epochs * len(y_train) // b,
                     batch_size=b, lr_scale=b / base_batch, momentum=momentum)
        wrong = wrong_counts(model, x_test, y_test)
        for i, lr in enumerate(base_lrs):
            study.wrong[(lr, b)] = wrong[i * len(seeds):(i + 1) * len(seeds)]
        if keep_models:
            study.models[b] = model
    return study


@torch.no_grad()
def batch_statistics_wrong(model, x_test, y_test, batch_size):
    """Per member, wrong test images when evaluated as trained: in training mode, each group of
    ``batch_size`` test images normalized by its own batch statistics (buffers restored)."""
    from .probes import frozen_buffers
    usable = len(y_test) // batch_size * batch_size
    with frozen_buffers(model):
        model.train()
        wrong = sum((model(x_test[i:i + batch_size]).argmax(-1) != y_test[i:i + batch_size])
                    .sum(0) for i in range(0, usable, batch_size))
    return [int(w) for w in wrong], usable


def importance_study(norm, *, batch_sizes, seeds, base_lr=0.1, epochs=1, momentum=0.9,
                     test_fraction=0.5, base_batch=32):
    """SN's learned importance weights after training at each batch size, for every seed.

    Trains ``digits_cnn(norm, seed=s)`` (``norm`` a SwitchNorm2d class) as in
    :func:`batch_size_study` and returns ``{batch_size: [per seed: [per layer:
    module.importance()]]}`` and the test errors ``{batch_size: [per seed]}``.
    """
    members = [Member(s, base_lr) for s in seeds]
    x_train, y_train, x_test, y_test = members_data(members, test_fraction)
    importance, errors = {}, {}
    for b in batch_sizes:
        model = PackedCNN([digits_cnn(norm, seed=s) for s in seeds])
        train_packed(model, members, x_train, y_train, steps=epochs * len(y_train) // b,
                     batch_size=b, lr_scale=b / base_batch, momentum=momentum)
        importance[b] = [[m.importance() for m in model.norm_layers(k)]
                         for k in range(len(seeds))]
        errors[b] = [w / len(y_test) for w in wrong_counts(model, x_test, y_test)]
    return importance, errors

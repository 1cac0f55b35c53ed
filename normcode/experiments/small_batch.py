"""BatchNorm's small and non-i.i.d. batches, and two families of fixes: Batch Renormalization
(chapter ``batch_renorm``) and normalizing the weights (chapter ``weight_normalization``).

Every run is seeded: the model's initial weights by ``seed`` and the order of the batches by
``seed`` too, so two calls with the same arguments train the same model.
"""
import copy
import math

import torch
from torch import nn

from ..batch_renorm import _BatchRenorm, relaxation_schedule
from .training import accuracy


# --------------------------------------------------------------------------------------------
# Batches: i.i.d. (shuffled), or each batch drawn from a few classes
# --------------------------------------------------------------------------------------------
def iid_batches(y, batch_size, steps, generator):
    """``steps`` index batches drawn without replacement, reshuffled at each epoch."""
    n = len(y)
    order, cursor = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        yield order[cursor:cursor + batch_size]
        cursor += batch_size


def few_class_batches(y, batch_size, steps, generator, classes_per_batch=2):
    """Ioffe (2017)'s non-i.i.d. minibatches: each batch holds ``classes_per_batch`` classes,
    drawn at random, with ``batch_size // classes_per_batch`` random examples of each."""
    per_class = batch_size // classes_per_batch
    by_class = [torch.nonzero(y == c).flatten() for c in range(int(y.max()) + 1)]
    for _ in range(steps):
        chosen = torch.randperm(len(by_class), generator=generator)[:classes_per_batch]
        parts = [by_class[c][torch.randperm(len(by_class[c]), generator=generator)[:per_class]]
                 for c in chosen.tolist()]
        yield torch.cat(parts)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def renorm_layers(model):
    return [m for m in model.modules() if isinstance(m, _BatchRenorm)]


def paper_schedule(steps, r_max=3.0, d_max=5.0):
    """Ioffe (2017)'s schedule, in proportion: the paper holds BatchNorm (r_max = 1,
    d_max = 0) for its first 5k steps, then relaxes the limits linearly to reach d_max at 25k
    steps and r_max at 40k. Scaled so that 40k is ``steps``: BatchNorm for the first eighth,
    d_max reached at five eighths, r_max at the end. Returns ``f(step) -> (r_max, d_max)``."""
    unit = steps / 8                     # the paper's 5k steps
    return lambda step: relaxation_schedule(step, warmup=unit, r_steps=7 * unit,
                                            d_steps=4 * unit, r_max=r_max, d_max=d_max)


def fit(model, data, *, samples, batch_size, lr, seed=0, batches=iid_batches, schedule=None,
        record=None):
    """Train ``model`` with plain SGD and cross-entropy on ``samples // batch_size`` batches.

    ``batches`` draws the index batches (:func:`iid_batches` or :func:`few_class_batches`);
    ``schedule(step) -> (r_max, d_max)``, if given, sets the limits of every BatchRenorm layer
    before each step; ``record(step, model)``, if given, runs after each step. Returns the
    model, trained in place."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    steps = samples // batch_size
    model.train()
    for step, idx in enumerate(batches(data.y_train, batch_size, steps, g)):
        if schedule is not None:
            r_max, d_max = schedule(step)
            for layer in renorm_layers(model):
                layer.r_max, layer.d_max = r_max, d_max
        loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if record is not None:
            record(step, model)
    return model


@torch.no_grad()
def train_mode_accuracy(model, x, y, batch_size, batches=None):
    """Accuracy in training mode, on a copy (the model's buffers stay as they are): the test
    set cut into consecutive batches of ``batch_size``, or into the index batches given."""
    model = copy.deepcopy(model).train()
    if batches is None:
        n = len(y) // batch_size * batch_size
        batches = [torch.arange(i, i + batch_size) for i in range(0, n, batch_size)]
    correct = sum((model(x[idx]).argmax(1) == y[idx]).sum().item() for idx in batches)
    return correct / sum(len(idx) for idx in batches)


def both_modes(model, data, batch_size, batches=None):
    """``(training-mode accuracy, eval-mode accuracy)`` on the test set."""
    return (train_mode_accuracy(model, data.x_test, data.y_test, batch_size, batches),
            accuracy(model, data.x_test, data.y_test))


def small_batch_study(make_model, norms, data, *, batch_sizes, samples, lr, seeds,
                      schedule=paper_schedule):
    """For each norm, batch size and seed: train ``make_model(norm, seed)`` on ``samples``
    samples at learning rate ``lr`` and score it in both modes. A norm whose name starts with
    "BRN" gets ``schedule(steps)``. Returns ``{(name, batch_size, seed): (train_acc,
    eval_acc)}``."""
    results = {}
    for name, norm in norms.items():
        for batch_size in batch_sizes:
            for seed in seeds:
                model = make_model(norm, seed)
                steps = samples // batch_size
                sched = schedule(steps) if name.startswith("BRN") else None
                fit(model, data, samples=samples, batch_size=batch_size, lr=lr, seed=seed,
                    schedule=sched)
                results[name, batch_size, seed] = both_modes(model, data, batch_size)
    return results


def non_iid_study(make_model, norms, data, *, batch_size, samples, lr, seeds,
                  classes_per_batch=2, schedule=paper_schedule):
    """Ioffe (2017)'s non-i.i.d. experiment at digits scale: each training batch drawn from
    ``classes_per_batch`` classes. Returns ``{(name, seed): (eval accuracy, training-mode
    accuracy on few-class test batches, training-mode accuracy on shuffled test batches)}``."""
    results = {}
    for name, norm in norms.items():
        for seed in seeds:
            model = make_model(norm, seed)
            sched = schedule(samples // batch_size) if name.startswith("BRN") else None
            fit(model, data, samples=samples, batch_size=batch_size, lr=lr, seed=seed,
                batches=lambda y, b, s, g: few_class_batches(y, b, s, g, classes_per_batch),
                schedule=sched)
            g = torch.Generator().manual_seed(1000 + seed)
            steps = len(data.y_test) // batch_size
            few = list(few_class_batches(data.y_test, batch_size, steps, g, classes_per_batch))
            results[name, seed] = (accuracy(model, data.x_test, data.y_test),
                                   train_mode_accuracy(model, data.x_test, data.y_test,
                                                       batch_size, few),
                                   train_mode_accuracy(model, data.x_test, data.y_test,
                                                       batch_size))
    return results


def mean_and_spread(values):
    """``(mean, max - min)`` of a list of numbers, as Python floats."""
    values = [float(v) for v in values]
    return sum(values) / len(values), max(values) - min(values)


def std_conv_cnn(norm, channels=(16, 32, 32), seed=0):
    """``normcode.experiments.digits_cnn`` with every convolution a weight-standardized
    :class:`normcode.weight_norms.StdConv2d` (BiT's pairing is GroupNorm after it)."""
    from ..weight_norms import StdConv2d
    from .models import digits_cnn

    model = digits_cnn(norm, channels, seed)
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Conv2d):
            std = StdConv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                            stride=layer.stride, padding=layer.padding, bias=False)
            with torch.no_grad():
                std.weight.copy_(layer.weight)   # the same initial weights as digits_cnn's
            model[i] = std
    return model


def lipschitz_ratio(model, x, generator, eps=1e-3, pairs=256):
    r"""The largest :math:`\lVert f(a) - f(b) \rVert / \lVert a - b \rVert` over ``pairs``
    random nearby pairs (b = a plus noise of size ``eps``) from the rows of ``x``: a lower
    bound on the Lipschitz constant of ``model`` in eval mode."""
    model.eval()
    with torch.no_grad():
        a = x[torch.randint(len(x), (pairs,), generator=generator)]
        b = a + eps * torch.randn(a.shape, generator=generator, dtype=a.dtype)
        ratio = (model(a) - model(b)).flatten(1).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
    return float(ratio.max())


def largest_singular_value(weight):
    """The exact spectral norm of a weight viewed as (out, everything else)."""
    return float(torch.linalg.matrix_norm(weight.detach().flatten(1).double(), 2))


def conditioning(model, data, *, batch_size, lr, steps, seed=0):
    """What Salimans & Kingma (2016) argue weight normalization does: for ``steps`` steps of
    SGD, record per step the loss and, per linear layer, the norm of the weight, of the free
    weight the optimizer updates (v for weight norm, the weight otherwise) and of the free
    weight's gradient. Returns ``{"loss": [...], "weight_norm": [[...]], "free_norm":
    [[...]], "grad_norm": [[...]]}`` (lists per step, one entry per layer)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    out = {"loss": [], "weight_norm": [], "free_norm": [], "grad_norm": []}
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for idx in iid_batches(data.y_train, batch_size, steps, g):
        loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        out["loss"].append(loss.item())
        out["weight_norm"].append([float(m.weight.detach().norm()) for m in linears])
        out["free_norm"].append([float(_free(m).detach().norm()) for m in linears])
        out["grad_norm"].append([math.nan if _grad(m) is None else float(_grad(m).norm())
                                 for m in linears])
        opt.step()
    return out


def _free(linear):
    """The layer's free weight, the parameter SGD updates: v for weight norm, the weight
    otherwise."""
    p = getattr(linear, "parametrizations", None)
    if p is not None and "weight" in p:
        originals = [t for n, t in p.weight.named_parameters() if n.startswith("original")]
        return originals[-1]                         # original1 is v, original the raw weight
    return linear.weight


def _grad(linear):
    """The gradient of the layer's free weight: v for weight norm, the weight otherwise."""
    return _free(linear).grad


def correction_trace(model):
    """Record, at every training forward of each BatchRenorm layer, the corrections r and d
    the layer would use before clipping: per call ``(layer index, max |log r|, max |d|, share
    of channels clipped)``, over channels. Returns ``(trace, handles)``; remove the handles to
    stop recording."""
    trace, handles = [], []

    def hook(layer, args, index):
        if not layer.training:
            return
        x = args[0].detach().double()
        dims = [0, *range(2, x.dim())]
        sigma_B = (x.var(dims, unbiased=False) + layer.eps).sqrt()
        sigma = (layer.running_var.double() + layer.eps).sqrt()
        log_r = (sigma_B / sigma).log()
        d = (x.mean(dims) - layer.running_mean.double()) / sigma
        clipped = (log_r.abs() > math.log(layer.r_max)) | (d.abs() > layer.d_max)
        trace.append((index, float(log_r.abs().max()), float(d.abs().max()),
                      float(clipped.double().mean())))

    for i, layer in enumerate(renorm_layers(model)):
        handles.append(layer.register_forward_pre_hook(
            lambda module, args, i=i: hook(module, args, i)))
    return trace, handles

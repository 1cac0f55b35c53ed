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
from .training import sgd_step, shuffled_batches


# --------------------------------------------------------------------------------------------
# Batches: i.i.d. (shuffled), or each batch drawn from a few classes
# --------------------------------------------------------------------------------------------
def iid_batches(y, batch_size, steps, generator):
    """``steps`` index batches drawn without replacement, reshuffled at each epoch."""
    return shuffled_batches(len(y), batch_size, steps, generator)


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


def _set_limits(model, schedule, step):
    """Every BatchRenorm layer's ``r_max, d_max`` for ``step``, from ``schedule`` if given."""
    if schedule is not None:
        r_max, d_max = schedule(step)
        for layer in renorm_layers(model):
            layer.r_max, layer.d_max = r_max, d_max


def fit(model, data, *, samples, batch_size, lr, seed=0, batches=iid_batches, schedule=None,
        record=None):
    """Train ``model`` with plain SGD and cross-entropy on ``samples // batch_size`` batches.

    ``batches`` draws the index batches (:func:`iid_batches` or :func:`few_class_batches`);
    ``schedule(step) -> (r_max, d_max)``, if given, sets the limits of every BatchRenorm layer
    before each step; ``record(step, model)``, if given, runs after each step. Returns the
    model, trained in place."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    steps = samples // batch_size
    model.train()
    for step, idx in enumerate(batches(data.y_train, batch_size, steps, g)):
        _set_limits(model, schedule, step)
        sgd_step(model, opt, data.x_train[idx], data.y_train[idx])
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


def small_batch_study(make_model, norms, data, *, batch_sizes, samples, lr, seeds,
                      schedule=paper_schedule, on_pack=None):
    """For each norm, batch size and seed: train ``make_model(norm, seed)`` on ``samples``
    samples at learning rate ``lr`` and score it in both modes. A norm whose name starts with
    "BRN" gets ``schedule(steps)``. At each batch size, all norms and seeds train as one
    :class:`PackedDigitsCNN` (members ordered by norm, then seed); ``on_pack(batch_size,
    model)``, if given, runs before training it (to attach a probe) and returns the hook
    handles to remove after training. Returns ``{(name,
    batch_size, seed): (train_acc, eval_acc)}``."""
    results = {}
    keys = [(name, seed) for name in norms for seed in seeds]
    for batch_size in batch_sizes:
        model = PackedDigitsCNN([make_model(norms[name], seed) for name, seed in keys])
        handles = [] if on_pack is None else on_pack(batch_size, model)
        steps = samples // batch_size
        brn = any(name.startswith("BRN") for name in norms)
        fit_packed(model, data, samples=samples, batch_size=batch_size, lr=lr,
                   seeds=[seed for _, seed in keys], schedule=schedule(steps) if brn else None)
        for handle in handles:
            handle.remove()
        train_acc = packed_accuracies(model, data.x_test, data.y_test, batch_size)
        eval_acc = packed_accuracies(model, data.x_test, data.y_test)
        for (name, seed), t, e in zip(keys, train_acc, eval_acc):
            results[name, batch_size, seed] = (t, e)
    return results


def non_iid_study(make_model, norms, data, *, batch_size, samples, lr, seeds,
                  classes_per_batch=2, schedule=paper_schedule):
    """Ioffe (2017)'s non-i.i.d. experiment at digits scale: each training batch drawn from
    ``classes_per_batch`` classes; all norms and seeds train as one :class:`PackedDigitsCNN`. Returns
    ``{(name, seed): (eval accuracy, training-mode accuracy on few-class test batches,
    training-mode accuracy on shuffled test batches)}``."""
    results = {}
    steps = len(data.y_test) // batch_size
    few = [list(few_class_batches(data.y_test, batch_size, steps,
                                  torch.Generator().manual_seed(1000 + seed),
                                  classes_per_batch)) for seed in seeds]
    keys = [(name, seed) for name in norms for seed in seeds]
    model = PackedDigitsCNN([make_model(norms[name], seed) for name, seed in keys])
    brn = any(name.startswith("BRN") for name in norms)
    fit_packed(model, data, samples=samples, batch_size=batch_size, lr=lr,
               seeds=[seed for _, seed in keys],
               batches=lambda y, b, s, g: few_class_batches(y, b, s, g, classes_per_batch),
               schedule=schedule(samples // batch_size) if brn else None)
    scores = zip(packed_accuracies(model, data.x_test, data.y_test),
                 packed_accuracies(model, data.x_test, data.y_test, batch_size, few * len(norms)),
                 packed_accuracies(model, data.x_test, data.y_test, batch_size))
    for key, score in zip(keys, scores):
        results[key] = score
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


def correction_trace(model, block=0, blocks=1):
    """Record, at every training forward of each BatchRenorm layer, the corrections r and d
    the layer would use before clipping: per call ``(layer index, max |log r|, max |d|, share
    of channels clipped)``, over channels. Returns ``(trace, handles)``; remove the handles to
    stop recording. In a :class:`PackedDigitsCNN`, ``blocks`` is the number of members each
    BatchRenorm layer holds and ``block`` the member to record."""
    trace, handles = [], []

    def hook(layer, args, index):
        if not layer.training:
            return
        x = args[0].detach().double().chunk(blocks, 1)[block]
        channels = slice(block * x.shape[1], (block + 1) * x.shape[1])
        dims = [0, *range(2, x.dim())]
        sigma_B = (x.var(dims, unbiased=False) + layer.eps).sqrt()
        sigma = (layer.running_var[channels].double() + layer.eps).sqrt()
        log_r = (sigma_B / sigma).log()
        d = (x.mean(dims) - layer.running_mean[channels].double()) / sigma
        clipped = (log_r.abs() > math.log(layer.r_max)) | (d.abs() > layer.d_max)
        trace.append((index, float(log_r.abs().max()), float(d.abs().max()),
                      float(clipped.double().mean())))

    for i, layer in enumerate(renorm_layers(model)):
        handles.append(layer.register_forward_pre_hook(
            lambda module, args, i=i: hook(module, args, i)))
    return trace, handles


# --------------------------------------------------------------------------------------------
# Several seeds as one network
# --------------------------------------------------------------------------------------------
# A digits run is one seed; a comparison needs several. As in ``batch_size.PackedCNN`` (the
# groupnorm chapter), the seeds' ``digits_cnn`` models are packed into one network: grouped
# convolutions put member k's channels in the k-th block, each norm layer is one wide layer of
# the same class whose statistics never cross a block (BatchNorm, BatchRenorm: per channel;
# GroupNorm: per group, with k's groups inside k's block), and the input carries member k's
# images in channel k. Members share no parameter, statistic or gradient (the loss is the sum
# of the members' batch means), so the pack trains what the members would train one after
# another (``tests/test_claims_small_batch.py`` checks it), at about the cost of one run.
class PackedDigitsCNN(nn.Module):
    """``len(members)`` ``digits_cnn``-shaped models (plain or weight-standardized
    convolutions, any per-channel or per-group norm, mixed freely) as one. Input (N, S, 8, 8),
    member k's images in channel k; output (N, S, 10). Consecutive members whose layer has
    the same class and settings share one wide layer; a layer mixing several is a
    :class:`Blocks` of wide layers."""

    def __init__(self, members):
        super().__init__()
        self.size = len(members)
        layers = []
        for parts in zip(*members):
            first = parts[0]
            if isinstance(first, nn.Linear):
                self.head_weight = nn.Parameter(torch.stack([p.weight.detach() for p in parts]))
                self.head_bias = nn.Parameter(torch.stack([p.bias.detach() for p in parts]))
            elif isinstance(first, (nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten)):
                layers.append(first)
            else:
                runs = _runs(parts)
                wide = [_wide_conv(r) if isinstance(r[0], nn.Conv2d) else _wide_norm(r)
                        for r in runs]
                layers.append(wide[0] if len(wide) == 1 else Blocks(wide, [len(r) for r in runs]))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        features = self.body(x).unflatten(1, (self.size, -1))            # (N, S, C)
        return torch.einsum("nsc,sjc->nsj", features, self.head_weight) + self.head_bias


class Blocks(nn.Module):
    """``modules[i]`` applied to the i-th run of ``counts[i]`` members' channel blocks."""

    def __init__(self, modules, counts):
        super().__init__()
        self.parts, self.counts = nn.ModuleList(modules), counts

    def forward(self, x):
        width = x.shape[1] // sum(self.counts)
        blocks = x.split([c * width for c in self.counts], dim=1)
        return torch.cat([m(b) for m, b in zip(self.parts, blocks)], dim=1)


def _signature(layer):
    return (type(layer), getattr(layer, "num_groups", None), getattr(layer, "eps", None))


def _runs(parts):
    """The members' layers cut into runs of consecutive layers of one signature."""
    runs = [[parts[0]]]
    for layer in parts[1:]:
        if _signature(layer) == _signature(runs[-1][0]):
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs


def _wide_conv(convs):
    """One grouped convolution of the convs' class doing ``convs[k]`` on block k."""
    S, conv = len(convs), copy.deepcopy(convs[0])      # same class: Conv2d or StdConv2d
    conv.in_channels, conv.out_channels = S * conv.in_channels, S * conv.out_channels
    conv.groups = S * conv.groups
    conv.weight = nn.Parameter(torch.cat([c.weight.detach() for c in convs]))
    return conv


def _wide_norm(norms):
    """One layer of the norms' class doing ``norms[k]`` on the k-th block of channels."""
    S, wide = len(norms), copy.deepcopy(norms[0])
    if hasattr(wide, "num_groups"):
        wide.num_groups, wide.num_channels = S * wide.num_groups, S * wide.num_channels
    else:
        wide.num_features = S * wide.num_features
    for name, _ in list(wide.named_parameters()):
        setattr(wide, name, nn.Parameter(torch.cat([getattr(m, name).detach() for m in norms])))
    for name, _ in list(wide.named_buffers()):
        if name != "num_batches_tracked":
            setattr(wide, name, torch.cat([getattr(m, name) for m in norms]))
    return wide


def fit_packed(model, data, *, samples, batch_size, lr, seeds, batches=iid_batches,
               schedule=None):
    """:func:`fit` for every member of a :class:`PackedDigitsCNN` at once: member k draws its
    batches with a generator seeded ``seeds[k]``, exactly as :func:`fit` alone would."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    steps = samples // batch_size
    x = data.x_train[:, 0]                                            # (n, 8, 8)
    model.train()
    for step, idx in enumerate(zip(*(batches(data.y_train, batch_size, steps, g)
                                     for g in gens))):
        idx = torch.stack(idx, 1)                                     # (B, S)
        _set_limits(model, schedule, step)
        logits = model(x[idx])                                        # (B, S, 10)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1),
                                           data.y_train[idx].flatten(), reduction="sum")
        opt.zero_grad()
        (loss / batch_size).backward()
        opt.step()
    return model


@torch.no_grad()
def packed_accuracies(model, x, y, batch_size=None, batches=None):
    """Each member's test accuracy: in eval mode (``batch_size`` None), or in training mode on
    a copy, the test set cut into consecutive batches of ``batch_size`` or into the index
    batches given (one list per member, equally long)."""
    x = x[:, 0]
    S = model.size
    if batch_size is None:
        model.eval()
        correct = (model(x.unsqueeze(1).expand(-1, S, -1, -1)).argmax(-1) == y[:, None]).sum(0)
        model.train()
        return [c / len(y) for c in correct.tolist()]
    model = copy.deepcopy(model).train()
    if batches is None:
        n = len(y) // batch_size * batch_size
        idx = [torch.arange(i, i + batch_size)[:, None].expand(-1, S)
               for i in range(0, n, batch_size)]
    else:
        idx = [torch.stack(b, 1) for b in zip(*batches)]
    correct = sum((model(x[i]).argmax(-1) == y[i]).sum(0) for i in idx)
    total = sum(len(i) for i in idx)
    return [c / total for c in correct.tolist()]

"""The comparison sheet: every table of the comparison chapter, computed from normcode's layers.

Nothing here is typed in. Statistics sets come from ``normcode.statistic_ids`` (the table the
layers compute with), parameters and buffers from instantiating the layers, "train and eval
differ" and "depends on the batch" from running them. The chapter shows each table and asserts
what its prose reads off it.
"""
import copy
import re
from dataclasses import dataclass, field

import torch
from torch import nn

import normcode
from normcode.switchable import PARTS
from normcode.testing import randomize_

#: The axes of the sheet's activations.
AXES = "NCHW"


@dataclass
class Layer:
    """One row of the sheet: how to build the layer for (C, H, W), and its statistics sets as
    ``(norm, options)`` pairs for ``normcode.statistic_ids`` (none: LocalResponseNorm's window)."""
    make: object
    sets: list = field(default_factory=list)


def sheet_layers(groups=2):
    """Every layer of the book, with torch.nn's defaults; LayerNorm and RMSNorm over (C, H, W),
    GroupNorm with ``groups`` groups. InstanceNorm twice: its defaults hide the other setting."""
    over_chw = {"normalized_ndim": 3}
    return {
        "BatchNorm2d": Layer(lambda C, H, W: normcode.BatchNorm2d(C), [("batch", {})]),
        "SyncBatchNorm": Layer(lambda C, H, W: normcode.SyncBatchNorm(C), [("batch", {})]),
        "LayerNorm": Layer(lambda C, H, W: normcode.LayerNorm([C, H, W]),
                           [("layer", over_chw)]),
        "InstanceNorm2d": Layer(lambda C, H, W: normcode.InstanceNorm2d(C),
                                [("instance", {})]),
        "InstanceNorm2d, affine, tracked": Layer(
            lambda C, H, W: normcode.InstanceNorm2d(C, affine=True, track_running_stats=True),
            [("instance", {})]),
        "GroupNorm": Layer(lambda C, H, W: normcode.GroupNorm(groups, C),
                           [("group", {"num_groups": groups})]),
        "SwitchNorm2d": Layer(lambda C, H, W: normcode.SwitchNorm2d(C),
                              [(part, over_chw if part == "layer" else {})
                               for part in PARTS["SwitchNorm2d"]]),
        "RMSNorm": Layer(lambda C, H, W: normcode.RMSNorm([C, H, W]), [("rms", over_chw)]),
        "LocalResponseNorm": Layer(lambda C, H, W: normcode.LocalResponseNorm(3)),
    }


def html_table(header, rows):
    """An HTML table (the book renders a cell's HTML output as it is; Markdown output would be
    read as CommonMark, which has no tables). Text in backticks becomes <code>."""
    def cell(text):
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", str(text))

    head = "".join(f"<th>{cell(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    from IPython.display import HTML
    return HTML(f'<table class="table"><thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>")


# --------------------------------------------------------------------------------------------
# What each layer computes its statistics over
# --------------------------------------------------------------------------------------------
def axis_roles(ids):
    """For each axis of ``ids`` (from ``statistic_ids``): "reduced" if every index shares index
    0's statistics, "kept" if none does, else the size of the blocks that do (GroupNorm's
    C // G channels)."""
    roles = {}
    for a, name in enumerate(AXES[:ids.dim()]):
        others = [d for d in range(ids.dim()) if d != a]
        k = int((ids == ids.narrow(a, 0, 1)).all(dim=others).sum())
        roles[name] = "reduced" if k == ids.shape[a] else "kept" if k == 1 else k
    return roles


def _describe(norm, options, shape):
    ids = normcode.statistic_ids(norm, shape, **options)
    roles = axis_roles(ids)
    per = ["G" if isinstance(r, int) else a for a, r in roles.items() if r != "reduced"]
    over = [a if r == "reduced" else f"{a} in blocks of {r}"
            for a, r in roles.items() if r != "kept"]
    return roles, ", ".join(per) or "-", ", ".join(over), normcode.statistics_count(
        norm, shape, **options)


def statistics_table(layers, shape):
    """Rows (layer, one statistic per, reduced over, how many) and each layer's axis roles."""
    N, C, H, W = shape
    rows, roles_of = [], {}
    for name, layer in layers.items():
        module = layer.make(C, H, W)
        if not layer.sets:                     # LocalResponseNorm: a window, not a set
            rows.append([name, "N, C, H, W (each element)",
                         f"C in a sliding window of {module.size}",
                         f"{N * C * H * W} window sums, one per element"])
            continue
        described = [_describe(norm, opts, shape) for norm, opts in layer.sets]
        roles_of[name] = [d[0] for d in described]
        per = " / ".join(d[1] for d in described)
        over = " / ".join(d[2] for d in described)
        counts = " + ".join(str(d[3]) for d in described)
        # RMSNorm keeps a mean square only; the others a mean and a variance per set
        numbers = sum(d[3] * (1 if norm == "rms" else 2)
                      for d, (norm, _) in zip(described, layer.sets))
        what = "mean squares" if layer.sets[0][0] == "rms" else "means and variances"
        if len(described) > 1:
            per += " (IN / LN / BN)"
        rows.append([name, per, over, f"{counts} sets: {numbers} {what}"])
    header = ["layer", "one statistic per", "reduced over", f"statistics for {tuple(shape)}"]
    return header, rows, roles_of


# --------------------------------------------------------------------------------------------
# What each layer carries, and when it looks at the batch
# --------------------------------------------------------------------------------------------
@dataclass
class Behaviour:
    parameters: int
    train_eval_differ: bool
    batch_in_training: bool
    batch_in_eval: bool


def _run(layer, training, x):
    layer = copy.deepcopy(layer).train(training)
    with torch.no_grad():
        return layer(x)


def _shape(t):
    return "(" + ", ".join(map(str, t.shape)) + ")"


def behaviour_table(layers, x, others, atol=1e-9):
    """Rows (layer, parameters, buffers, train/eval differ, batch-dependent in training and in
    eval) and a :class:`Behaviour` per layer. Each layer gets random parameters and running
    statistics (as a trained model has); sample 0 of ``x`` is kept and the rest replaced by
    ``others`` to see whether sample 0's output depends on its companions."""
    _, C, H, W = x.shape
    swapped = torch.cat([x[:1], others[1:]])
    yes = {True: "yes", False: "no"}
    rows, behaviour = [], {}
    for name, spec in layers.items():
        layer = randomize_(spec.make(C, H, W).double(), torch.Generator().manual_seed(1))
        params = sum(p.numel() for p in layer.parameters())
        param_shapes = ", ".join(f"`{p}` {_shape(t)}" for p, t in layer.named_parameters())
        buffers = ", ".join(f"`{b}` {_shape(t)}" for b, t in layer.named_buffers())

        def differ(a, b):
            return not torch.allclose(a, b, rtol=0, atol=atol)

        b = behaviour[name] = Behaviour(
            params,
            differ(_run(layer, True, x), _run(layer, False, x)),
            differ(_run(layer, True, x)[0], _run(layer, True, swapped)[0]),
            differ(_run(layer, False, x)[0], _run(layer, False, swapped)[0]))
        rows.append([name, f"{params}: {param_shapes or 'none'}", buffers or "none",
                     yes[b.train_eval_differ], yes[b.batch_in_training], yes[b.batch_in_eval]])
    header = ["layer", "learnable parameters", "buffers", "train and eval differ",
              "sample depends on batch in training", "in eval"]
    return header, rows, behaviour


def fold_into_conv(conv, bn):
    """A convolution equal to ``bn(conv(x))`` for a BatchNorm in evaluation mode: BN then is
    ``x * a + b`` per channel, which scales the convolution's filters and shifts its bias."""
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        folded.weight.mul_(a.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        folded.bias = nn.Parameter((bias - bn.running_mean) * a + bn.bias)
    return folded


# --------------------------------------------------------------------------------------------
# The source post's usage examples, each torch.nn call next to its normcode twin
# --------------------------------------------------------------------------------------------
#: (the post's call, torch.nn layer, normcode layer, input shape, statistics set for
#:  ``statistics_count``). The calls and shapes are the post's (from the torch.nn docstrings),
#:  plus BatchNorm1d on (N, C, L), which the post names as an accepted shape.
SEED_EXAMPLES = [
    ("BatchNorm1d(100)", lambda: nn.BatchNorm1d(100), lambda: normcode.BatchNorm1d(100),
     (20, 100), ("batch", {})),
    ("BatchNorm1d(100)", lambda: nn.BatchNorm1d(100), lambda: normcode.BatchNorm1d(100),
     (20, 100, 7), ("batch", {})),
    ("BatchNorm1d(100, affine=False)", lambda: nn.BatchNorm1d(100, affine=False),
     lambda: normcode.BatchNorm1d(100, affine=False), (20, 100), ("batch", {})),
    ("BatchNorm2d(100)", lambda: nn.BatchNorm2d(100), lambda: normcode.BatchNorm2d(100),
     (20, 100, 35, 45), ("batch", {})),
    ("LayerNorm(embedding_dim)", lambda: nn.LayerNorm(10), lambda: normcode.LayerNorm(10),
     (20, 5, 10), ("layer", {"normalized_ndim": 1})),
    ("LayerNorm([C, H, W])", lambda: nn.LayerNorm([5, 10, 10]),
     lambda: normcode.LayerNorm([5, 10, 10]), (20, 5, 10, 10), ("layer", {"normalized_ndim": 3})),
    ("InstanceNorm2d(100)", lambda: nn.InstanceNorm2d(100),
     lambda: normcode.InstanceNorm2d(100), (20, 100, 35, 45), ("instance", {})),
    ("InstanceNorm2d(100, affine=True)", lambda: nn.InstanceNorm2d(100, affine=True),
     lambda: normcode.InstanceNorm2d(100, affine=True), (20, 100, 35, 45), ("instance", {})),
    ("GroupNorm(3, 6)", lambda: nn.GroupNorm(3, 6), lambda: normcode.GroupNorm(3, 6),
     (20, 6, 10, 10), ("group", {"num_groups": 3})),
    ("GroupNorm(6, 6)", lambda: nn.GroupNorm(6, 6), lambda: normcode.GroupNorm(6, 6),
     (20, 6, 10, 10), ("group", {"num_groups": 6})),
    ("GroupNorm(1, 6)", lambda: nn.GroupNorm(1, 6), lambda: normcode.GroupNorm(1, 6),
     (20, 6, 10, 10), ("group", {"num_groups": 1})),
]


@dataclass
class Usage:
    call: str
    input_shape: tuple
    output_shape: tuple
    statistics: int                  # means (and as many variances)
    parameters: dict                 # name: shape
    largest_difference: float        # normcode against torch.nn, training mode, float64


def usage_table(examples=SEED_EXAMPLES, seed=0):
    """Run every example through torch.nn and normcode in training mode, in float64: torch's
    layer gets random parameters and running statistics, normcode's a copy of them, and the
    outputs and updated buffers are compared. Rows for the chapter, and a :class:`Usage` each."""
    g = torch.Generator().manual_seed(seed)
    usages = []
    for call, make_torch, make_ours, shape, (norm, options) in examples:
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
        theirs = randomize_(make_torch().double(), g)
        ours = make_ours().double()
        ours.load_state_dict(theirs.state_dict())
        with torch.no_grad():
            y_theirs, y_ours = theirs(x), ours(x)
        pairs = [(y_ours, y_theirs)] + [(b, dict(theirs.named_buffers())[n])
                                         for n, b in ours.named_buffers()]
        usages.append(Usage(call, shape, tuple(y_theirs.shape),
                            normcode.statistics_count(norm, shape, **options),
                            {n: tuple(p.shape) for n, p in theirs.named_parameters()},
                            max((a.double() - b.double()).abs().max().item() for a, b in pairs)))
    rows = [[f"`nn.{u.call}`", str(u.input_shape), str(u.output_shape), u.statistics,
             ", ".join(f"`{n}` {s}" for n, s in u.parameters.items()) or "none"]
            for u in usages]
    header = ["the post's call", "input", "output", "means (and variances)",
              "learnable parameters"]
    return header, rows, usages


# --------------------------------------------------------------------------------------------
# Every layer on one input: the figure
# --------------------------------------------------------------------------------------------
def plot_every_norm(means, stds):
    """Two blocks of four layers; for each layer the (N, C) grid of slice means above and of
    slice standard deviations below. ``means`` and ``stds`` map a panel title to an (N, C)
    tensor, in the order to draw them."""
    import matplotlib.pyplot as plt

    names = list(means)
    fig = plt.figure(figsize=(10, 6.8))
    grid = fig.add_gridspec(5, 4, height_ratios=[1, 1, 0.28, 1, 1], left=0.07, right=0.88,
                            top=0.94, bottom=0.05, wspace=0.06, hspace=0.2)
    axes = [[fig.add_subplot(grid[r, c]) for c in range(4)] for r in (0, 1, 3, 4)]  # 2: gap
    kinds = [(means, "RdBu_r", (-2.5, 2.5), "mean"), (stds, "viridis", (0, 2.5), "std")]
    for block in range(2):
        for k, (values, cmap, (vmin, vmax), label) in enumerate(kinds):
            row = 2 * block + k
            for col, name in enumerate(names[4 * block: 4 * block + 4]):
                ax = axes[row][col]
                image = ax.imshow(values[name].numpy(), cmap=cmap, vmin=vmin, vmax=vmax)
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0:
                    ax.set_title(name.replace("\n", " "), fontsize=10)
                if col == 0:
                    ax.set_ylabel(f"{label}\nsamples (N)", fontsize=9)
                if k == 1:
                    ax.set_xlabel("channels (C)", fontsize=8)
            if block == 0:
                box = axes[row][-1].get_position()
                fig.colorbar(image, cax=fig.add_axes([0.9, box.y0, 0.015, box.height]),
                             label=f"{label} of a slice")
    return fig

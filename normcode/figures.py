"""The cube figure: which elements of an (N, C, H*W) tensor share one mean and one variance.

Drawn in the style of Wu & He (2018), Fig. 2: one cube per norm, axes N, C and H*W, the
coloured voxels being one statistics set. The colours come from
:func:`normcode.statistic_ids`, the function the layers compute their statistics with,
so the picture cannot disagree with the code.
"""
import matplotlib.pyplot as plt
from matplotlib.colors import to_rgb
from matplotlib.patches import Patch, Polygon

from ._axes import statistic_ids, statistics_count

#: The panels of the figure, in Wu & He's order, then SN.
FIGURE_NORMS = ("batch", "layer", "instance", "group", "switchable")

#: The norms whose statistics Switchable Normalization mixes, in the paper's order.
SWITCHABLE_PARTS = ("instance", "layer", "batch")

TITLES = {
    "batch": "Batch Norm",
    "layer": "Layer Norm",
    "instance": "Instance Norm",
    "group": "Group Norm",
    "switchable": "Switchable Norm",
}
SHORT = {"batch": "BN", "layer": "LN", "instance": "IN", "group": "GN"}

# One colour per norm, kept in the SN panel so that it reads as the other three overlaid.
COLOURS = {"batch": "#4c8fd6", "layer": "#f0a04b", "instance": "#5bb974", "group": "#a678d6"}
EMPTY = "#f4f4f4"
EDGE = "#6b6b6b"

# Cabinet projection: the C axis recedes up and to the right, shortened.
DEPTH_X, DEPTH_Y = 0.42, 0.30
# Light from the upper left: the top face is brighter, the right face darker.
SHADE = {"front": 1.0, "top": 1.25, "right": 0.85}


def _options(norm, shape, num_groups):
    """The keyword arguments statistic_ids needs for ``norm`` on an (N, C, *) shape."""
    if norm in ("layer", "rms"):
        return {"normalized_ndim": len(shape) - 1}     # LayerNorm([C, *spatial])
    if norm == "group":
        return {"num_groups": num_groups}
    return {}


def statistics_sets(norm, shape=(4, 6, 5), element=(0, 0, 0), *, num_groups=2):
    """The sets the figure colours: ``{norm: mask}``, True where an element
    shares ``element``'s mean and variance.

    ``"switchable"`` gives three masks (instance, layer, batch): SN computes
    all three statistics and blends them.
    """
    parts = SWITCHABLE_PARTS if norm == "switchable" else (norm,)
    sets = {}
    for part in parts:
        ids = statistic_ids(part, shape, **_options(part, shape, num_groups))
        sets[part] = ids == ids[element]
    return sets


def _voxel_colours(sets, shape):
    """An (N, C, L) nested list of colours; a voxel takes the colour of the smallest set holding it."""
    N, C, L = shape
    colours = [[[EMPTY] * L for _ in range(C)] for _ in range(N)]
    for norm, mask in sorted(sets.items(), key=lambda item: -int(item[1].sum())):
        for n, c, l in mask.nonzero().tolist():
            colours[n][c][l] = COLOURS[norm]
    return colours


def _shade(colour, face):
    r, g, b = to_rgb(colour)
    k = SHADE[face]
    if k >= 1:                                   # blend towards white
        t = k - 1
        return (r + (1 - r) * t, g + (1 - g) * t, b + (1 - b) * t)
    return (r * k, g * k, b * k)


def _project(n, c, l):
    return (n + c * DEPTH_X, l + c * DEPTH_Y)


def draw_statistics_cube(ax, sets, shape, title=None, subtitle=None):
    """Draw one cube on ``ax``: ``sets`` as returned by :func:`statistics_sets`."""
    N, C, L = shape
    colours = _voxel_colours(sets, shape)

    def face(corners, colour, name):
        ax.add_patch(Polygon([_project(*p) for p in corners], closed=True,
                             facecolor=_shade(colour, name), edgecolor=EDGE, linewidth=0.6))

    for n in range(N):                          # front face: c = 0
        for l in range(L):
            face([(n, 0, l), (n + 1, 0, l), (n + 1, 0, l + 1), (n, 0, l + 1)],
                 colours[n][0][l], "front")
    for n in range(N):                          # top face: the last position
        for c in range(C):
            face([(n, c, L), (n + 1, c, L), (n + 1, c + 1, L), (n, c + 1, L)],
                 colours[n][c][L - 1], "top")
    for c in range(C):                          # right face: the last sample
        for l in range(L):
            face([(N, c, l), (N, c + 1, l), (N, c + 1, l + 1), (N, c, l + 1)],
                 colours[N - 1][c][l], "right")

    # Axis labels along three edges, as in Wu & He's figure.
    label = dict(fontsize=15, color="#222222")
    x, y = _project(N / 2, 0, 0)
    ax.text(x, y - 0.45, "N", ha="center", va="top", **label)
    x, y = _project(0, 0, L / 2)
    ax.text(x - 0.35, y, "H, W", ha="right", va="center", rotation=90, **label)
    x, y = _project(N, C / 2, 0)
    ax.text(x + 0.35, y - 0.15, "C", ha="left", va="center", **label)

    x0, y0 = _project(0, 0, 0)
    x1, _ = _project(N, C, 0)
    _, y1 = _project(0, C, L)
    ax.set_xlim(x0 - 1.0, x1 + 1.0)
    ax.set_ylim(y0 - 1.2, y1 + 0.3)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=17, pad=6)
    if subtitle:
        ax.text(0.5, 0.0, subtitle, transform=ax.transAxes, ha="center", va="top",
                fontsize=13.5, color="#444444")


def _panel_axes(fig, count, ncols):
    """Axes for ``count`` panels, ``ncols`` to a row, a short last row centred."""
    rows = -(-count // ncols)
    grid = fig.add_gridspec(rows, 2 * ncols)            # half-width columns
    axes = []
    for k in range(count):
        row, j = divmod(k, ncols)
        in_row = min(ncols, count - row * ncols)
        start = (ncols - in_row) + 2 * j
        axes.append(fig.add_subplot(grid[row, start:start + 2]))
    return axes


def draw_statistics_cubes(fig=None, shape=(4, 6, 5), norms=FIGURE_NORMS, *,
                          element=(-1, 0, 0), num_groups=2, ncols=3):
    """Wu & He's Fig. 2 for ``norms``: one cube per norm, the sets holding ``element`` coloured.

    ``shape`` is (N, C, H*W). The default ``element`` (last sample, first channel) puts every
    set on a visible face. Panels go ``ncols`` to a row. Returns the figure (a new one when
    ``fig`` is None).
    """
    if fig is None:
        rows = -(-len(norms) // ncols)
        fig = plt.figure(figsize=(3.2 * min(ncols, len(norms)), 3.5 * rows), dpi=120)
    axes = _panel_axes(fig, len(norms), ncols)
    for ax, norm in zip(axes, norms):
        sets = statistics_sets(norm, shape, element, num_groups=num_groups)
        if norm == "switchable":
            title, subtitle = TITLES[norm], None
            ax.legend(handles=[Patch(facecolor=COLOURS[p], edgecolor=EDGE, label=SHORT[p] + " set")
                               for p in SWITCHABLE_PARTS],
                      loc="upper center", bbox_to_anchor=(0.5, 0.04), ncol=3, frameon=False,
                      fontsize=12, handlelength=1.1, handletextpad=0.4, columnspacing=0.8)
        else:
            count = statistics_count(norm, shape, **_options(norm, shape, num_groups))
            title = TITLES[norm] + (f" (G = {num_groups})" if norm == "group" else "")
            subtitle = f"{count} sets of {int(sets[norm].sum())} elements"
        draw_statistics_cube(ax, sets, shape, title, subtitle)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.06, top=0.94, wspace=0.1, hspace=0.22)
    return fig

"""The chapters keep the book's promises: code that reads in the book's column, numbers in the
prose that come from cells, and outputs that nbval really checks.

These read the notebooks' JSON only (nbval executes them, in `make test`'s second command).
"""
import json
import re
from pathlib import Path

import pytest

CHAPTERS = Path(__file__).resolve().parent.parent / "chapters"
NOTEBOOKS = sorted(CHAPTERS.glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]

#: The book's code column: a wider line scrolls sideways in the HTML page.
LINE_LENGTH = 88
#: Output that is there for the eye only (a timing) may be ignored by nbval; this many cells in
#: the whole book, and the prose may not quote them.
MAX_IGNORED_CELLS = 1


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def cells(nb, kind):
    return [(i, c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == kind]


def source(cell):
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_code_fits_the_column(path):
    wide = [(i, line) for i, c in cells(load(path), "code")
            for line in source(c).splitlines() if len(line) > LINE_LENGTH]
    assert not wide, f"lines wider than {LINE_LENGTH} (run `ruff format chapters`): {wide}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_version_gates(path):
    """An assertion gated on a torch version is a no-op on every other version: a known torch
    bug is asserted as it is, so that a torch that fixes it fails the chapter and is noticed."""
    gated = [i for i, c in cells(load(path), "code") if "__version__" in source(c)]
    assert not gated, f"cells {gated} read a __version__"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_code_cell_has_stored_output(path):
    """nbval compares only what is stored: a cell never executed checks nothing."""
    unexecuted = [i for i, c in cells(load(path), "code")
                  if source(c).strip() and c.get("execution_count") is None]
    assert not unexecuted, f"cells {unexecuted} have no stored execution (`make execute`)"


def test_ignored_outputs_are_rare():
    ignored = [f"{p.stem}[{i}]" for p in NOTEBOOKS for i, c in cells(load(p), "code")
               if "nbval-ignore-output" in c.get("metadata", {}).get("tags", [])]
    assert len(ignored) <= MAX_IGNORED_CELLS, f"nbval ignores the output of {ignored}"


# ------------------------------------------------------------------------------------------
# Numbers in the prose. A measured number is glued from the cell that computed it
# ({glue:text}`key:.1%`), never typed. What remains typed is checked here: every decimal,
# percentage, power of ten and ratio ("4.7", "30%", "1e-7", "2.5x", "10-fold") written in a markdown cell, outside
# math, code and roles. A typed number that is a definition or a constant (momentum 0.1) or a
# figure quoted from a paper is declared in that cell's metadata, with its reason:
#     "metadata": {"typed-numbers": {"34.7%": "Wu & He (2018), Figure 1: BN at batch 2"}}
# ------------------------------------------------------------------------------------------
_NOT_PROSE = re.compile(
    r"\$\$.*?\$\$"                     # display math
    r"|\$[^$\n]+\$"                    # inline math
    r"|```.*?```"                      # fenced code and directives
    r"|:::.*?:::"                      # colon fences
    r"|`[^`\n]*`"                      # inline code, and the bodies of roles
    r"|\]\([^)]*\)"                    # link targets
    r"|<[^>\n]+>",                     # HTML tags and autolinks
    re.S)
_TYPED_NUMBER = re.compile(
    r"(?<![\w.\-/])"
    r"(\d+(?:\.\d+)?\s?(?:%|×|x(?![\w])|-fold)|\d+(?:\.\d+)?e[-+]?\d+|\d+\.\d+)"
    r"(?![\w.]*\d)")
_GLUE_ROLE = re.compile(r"\{glue(?::\w+)?\}`([^`:]+)")


def typed_numbers(text):
    """The decimals, percentages and ratios a reader sees typed in ``text``."""
    return [m.group(1).replace(" ", "") for m in _TYPED_NUMBER.finditer(_NOT_PROSE.sub(" ", text))]


def test_typed_number_detector():
    found = typed_numbers("BN is 4.7% worse, 2.5x slower and 10-fold noisier; $0.5$ and `eps=1e-5`"
                          " and {glue:text}`gap:.1%` and an 8x8 image and 3 layers, v1.2.3, off by 3e-7")
    assert found == ["4.7%", "2.5x", "10-fold", "3e-7"]


def prose(nb):
    """(index, cell, text) for each piece of prose a reader sees: every markdown cell, and every
    figure caption (a code cell's metadata mystnb.figure.caption)."""
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] == "markdown":
            yield i, c, source(c)
        caption = c.get("metadata", {}).get("mystnb", {}).get("figure", {}).get("caption")
        if caption:
            yield i, c, caption


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_prose_numbers_are_glued_or_declared(path):
    undeclared = []
    for i, c, text in prose(load(path)):
        declared = c.get("metadata", {}).get("typed-numbers", {})
        for number in typed_numbers(text):
            if number not in declared:
                undeclared.append(f"cell {i}: {number}")
    assert not undeclared, (
        "typed numbers in the prose: glue them from the cell that computes them, or declare a "
        "constant or a quoted paper figure in the cell's metadata 'typed-numbers' with its "
        f"reason: {undeclared}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_declared_numbers_are_still_there(path):
    """A declaration outlives its number only by mistake."""
    stale = []
    for i, c, text in prose(load(path)):
        present = set(typed_numbers(text))
        stale += [f"cell {i}: {n}" for n in c.get("metadata", {}).get("typed-numbers", {})
                  if n not in present]
    assert not stale, f"declared typed numbers no longer in the cell: {stale}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_glued_keys_exist(path):
    """Every {glue} in the prose names a value a code cell of the same notebook glued."""
    nb = load(path)
    glued = {o.get("metadata", {}).get("scrapbook", {}).get("name")
             for _, c in cells(nb, "code") for o in c.get("outputs", [])}
    used = {key for _, _, text in prose(nb) for key in _GLUE_ROLE.findall(text)}
    assert used <= glued, f"glue keys used but never glued: {sorted(used - glued)}"

"""The Chinese edition (i18n/zh/) against the English notebooks it translates.

A Chinese page is its English page with each markdown cell replaced by a translation that
records a hash of the English it was made from. These tests fail, naming the page and the cell:
- when a markdown cell has no translation, or its English changed since it was translated
  (so an English edit cannot land with a stale translation), or a translation names a cell
  the page no longer has;
- when a translation lost or changed what must carry over unchanged: math, code spans,
  labels, the targets of cross-references, glued numbers, citations, directives, links;
- when a translation types a number that its English cell does not (numbers come from glue);
- when a glossary term the English page uses is missing from the Chinese page in the
  glossary's Chinese name (the glossary is the one list of terms both editions use).
The build of both editions and the browser check of every page are in test_browser.py.
"""
import re
import sys
from pathlib import Path

import pytest
from test_notebooks import _NOT_PROSE, typed_numbers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "i18n"))
import editions  # noqa: E402

PAGES = editions.pages()


@pytest.mark.parametrize("page", PAGES)
def test_every_markdown_cell_has_a_current_translation(page):
    found = editions.problems(page)
    assert not found, (
        f"{page}: the Chinese edition is not current; `python i18n/editions.py status {page}` "
        "shows the English to translate, `put` records a translation:\n"
        + "\n".join(f"  cell {key}: {why}" for key, why, _ in found))


@pytest.mark.parametrize("page", PAGES)
def test_translation_keeps_math_code_and_references(page):
    english, entries = editions.english_units(page), editions.load(page)
    found = [f"cell {key}: {why}" for key, entry in entries.items()
             if key in english and entry and entry.get("zh")
             for why in editions.mismatches(english[key], entry["zh"])]
    assert not found, f"{page}:\n  " + "\n  ".join(found)


def _numeral(number):
    return re.sub(r"(%|％|×|x|-fold|倍)$", "", number)


# Chinese sets no space between a character and a number (为4.7%), which the English detector's
# "not inside a word" rule would read as part of a word; and a ratio may be written 2.5倍.
_CJK = re.compile(r"([\u3000-\u303f\u4e00-\u9fff\uff00-\uffef])")
_BEI = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s?倍")


def typed_numbers_zh(text):
    """The decimals, percentages and ratios typed in a Chinese text (as ``typed_numbers``)."""
    spaced = _CJK.sub(r" \1 ", text.replace("％", "%"))
    return typed_numbers(spaced) + [m.group(1) + "倍" for m in _BEI.finditer(spaced)]


def test_typed_number_detector_zh():
    assert typed_numbers_zh("误差为4.7%，快了2.5倍，{glue:text}`gap:.1%`，10倍，第 3 节") == [
        "4.7%", "2.5", "2.5倍", "10倍"]


@pytest.mark.parametrize("page", PAGES)
def test_translation_types_no_number_its_english_does_not(page):
    english, entries = editions.english_units(page), editions.load(page)
    found = []
    for key, entry in entries.items():
        if key in english and entry and entry.get("zh"):
            allowed = {_numeral(n) for n in typed_numbers(english[key])}
            found += [f"cell {key}: {n}" for n in typed_numbers_zh(entry["zh"])
                      if _numeral(n) not in allowed]
    assert not found, f"{page}: numbers typed in the translation only (glue them in English first): {found}"


def _prose(text):
    return _NOT_PROSE.sub(" ", text)


@pytest.mark.parametrize("page", [p for p in PAGES if not p.endswith("glossary")])
def test_chinese_page_uses_the_glossary_terms_of_its_english(page):
    english = " ".join(editions.english_units(page).values())
    chinese = " ".join((e or {}).get("zh") or "" for e in editions.load(page).values())
    if not chinese.strip():
        pytest.skip("not translated yet (the first test of this page fails)")
    missing = []
    for name, zh_name in editions.glossary_pairs():
        uses = re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", _prose(english), re.IGNORECASE)
        if uses and zh_name not in chinese:
            missing.append(f"{name} -> {zh_name}")
    assert not missing, f"{page}: glossary terms the English uses, missing in the Chinese: {missing}"


def test_glossary_names_are_the_same_in_both_editions():
    """Every entry keeps its English and Chinese names in the Chinese glossary, so that a
    {term} role resolves to the same entry in both editions."""
    zh = editions.load("chapters/glossary").get("page", {}).get("zh")
    if not zh:
        pytest.fail("the glossary has no translation")
    english = (ROOT / "chapters" / "glossary.md").read_text()
    assert editions.glossary_names(zh) == editions.glossary_names(english)


def test_book_strings_cover_every_part_caption():
    import yaml

    captions = [part["caption"] for part in yaml.safe_load((ROOT / "_toc.yml").read_text())["parts"]]
    strings = editions.book_strings()
    assert set(captions) <= set(strings["captions"]), sorted(set(captions) - set(strings["captions"]))
    assert strings["title"] and strings["author"]


def test_drift_is_detected_and_names_the_cell(monkeypatch):
    """The mechanism itself: edit one English sentence (in memory) and the cell is named."""
    page = "chapters/batchnorm"
    english = editions.english_units(page)
    key = next(iter(english))
    current = {k: {"source": editions.digest(text), "zh": "译文"} for k, text in english.items()}
    edited = dict(english, **{key: english[key].replace("the", "a", 1)})
    assert edited[key] != english[key]
    monkeypatch.setattr(editions, "load", lambda p: current)
    assert editions.problems(page) == []
    monkeypatch.setattr(editions, "english_units", lambda p: edited)
    found = editions.problems(page)
    assert [(k, why) for k, why, _ in found] == [(key, "the English changed since it was translated")]


def test_invariants_catch_a_lost_formula_and_a_changed_glue():
    english = "The mean $\\mu_B$ is {glue:text}`gap:.1%` (see {doc}`batchnorm`), `eps` too."
    assert editions.mismatches(english, "均值 $\\mu_B$ 为 {glue:text}`gap:.1%`（见 {doc}`批归一化 <batchnorm>`），`eps` 亦然。") == []
    broken = editions.mismatches(english, "均值 $\\mu$ 为 {glue:text}`gap:.2%`，eps 亦然。")
    assert [b.split(":")[0] for b in broken] == ["math differs", "role target differs", "code missing"]


def test_invariants_catch_a_changed_include_a_lost_entry_and_a_lost_equation_label():
    english = ("See:\n\n```{literalinclude} ../normcode/functional.py\n:pyobject: batch_norm\n```\n\n"
               "```{eval-rst}\n.. autoclass:: normcode.A\n.. autoclass:: normcode.B\n```\n\n"
               "$$\nx = 1\n$$ (eq-a)\n\n:::{note}\nA note.\n:::\n")
    chinese = english.replace("See:", "见：").replace("A note.", "注释。")
    assert editions.mismatches(english, chinese) == []
    for broken, kind in [(chinese.replace(":pyobject: batch_norm", ":pyobject: layer_norm"), "verbatim"),
                         (chinese.replace(".. autoclass:: normcode.B\n", ""), "verbatim"),
                         (chinese.replace("$$ (eq-a)", "$$"), "label")]:
        assert any(m.startswith(kind) for m in editions.mismatches(english, broken)), broken

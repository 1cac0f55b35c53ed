"""The book's editions: English (the source) and Chinese (its translation), built from one set of notebooks.

The English notebooks are the only source of code and outputs. A Chinese page is its English
page with each markdown cell replaced by the translation that ``i18n/zh/<page>.yml`` keeps for
that cell, keyed by the cell's id, next to a hash of the English source it translates. Code
cells and their stored outputs are copied unchanged, so every number, table and figure (and
every glued number) is the one the English edition computed and nbval checked.

    python i18n/editions.py build              # both editions: _build/html and _build/html/zh
    python i18n/editions.py source             # only write the Chinese book's source, _build/zh-src
    python i18n/editions.py status [PAGE ...]  # cells with no translation or a stale one, with their English
    python i18n/editions.py check [PAGE ...]   # translations that lost math, code, labels or references
    python i18n/editions.py put PAGE CELL FILE HASH  # set a cell's translation from a file and
                                               # check it; HASH: the English's, as status showed
                                               # it (refused if the English has changed since)

PAGE is a page's path without suffix, as in _toc.yml (``chapters/batchnorm``, ``index``).
A markdown page (``.md``) is translated as one entry, keyed ``page``. A figure's caption (in its
code cell's metadata) is an entry of its own, keyed ``<cell id>/caption``.
"""
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LANG = "zh"
TRANSLATIONS = ROOT / "i18n" / LANG
BOOK_STRINGS = TRANSLATIONS / "_book.yml"
BUILD = ROOT / "_build"
SOURCE = BUILD / f"{LANG}-src"         # the generated Chinese book source (never committed)
OUT = BUILD / f"{LANG}-out"            # its jupyter-book output, moved to _build/html/zh
HTML = BUILD / "html"
# Files and folders of the book's source that the Chinese build needs besides its pages.
# normcode's source is there for the chapters' literalinclude directives.
SHARED = ["references.bib", "_static", "_ext", "normcode"]


def pages():
    """The book's pages in _toc.yml order, as paths without suffix (root first)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))

    def walk(entries):
        for entry in entries:
            if "file" in entry:
                yield entry["file"]
            for key in ("parts", "chapters", "sections"):
                yield from walk(entry.get(key, []))

    found = [toc["root"], *walk([toc])]
    names = [Path(page).name for page in found]
    if len(set(names)) != len(names):   # i18n/zh/<name>.yml: one file per page name
        raise SystemExit(f"two pages share a name, and so a translation file: {sorted(names)}")
    return found


def page_file(page):
    for suffix in (".ipynb", ".md"):
        if (ROOT / (page + suffix)).exists():
            return ROOT / (page + suffix)
    raise FileNotFoundError(f"no .ipynb or .md for page {page!r}")


def digest(text):
    """The hash a translation records of the English it translates: sha256, 12 hex digits."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def english_units(page):
    """{key: English source} for the page's translatable units, in page order."""
    path = page_file(page)
    if path.suffix == ".md":
        return {"page": path.read_text(encoding="utf-8")}
    nb = json.loads(path.read_text(encoding="utf-8"))
    units = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            units[cell["id"]] = "".join(cell["source"])
        caption = _caption(cell)
        if caption is not None:
            units[cell["id"] + CAPTION] = caption
    return units


# A figure's caption lives in its code cell's metadata (mystnb.figure.caption): it is prose,
# translated like a markdown cell, under the key "<cell id>/caption".
CAPTION = "/caption"


def _caption(cell):
    return cell.get("metadata", {}).get("mystnb", {}).get("figure", {}).get("caption") or None


def translation_path(page):
    return TRANSLATIONS / (Path(page).name + ".yml")


def load(page):
    path = translation_path(page)
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.exists() else {}


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, text):
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def save(page, entries):
    """Write a page's translations, one entry per unit in page order; text as YAML block scalars."""
    for entry in entries.values():
        if entry.get("zh"):
            # A line with trailing spaces cannot be a YAML block scalar. (In markdown two of them
            # would be a hard line break; the book's English has none.)
            entry["zh"] = "\n".join(line.rstrip() for line in entry["zh"].split("\n"))
    head = (f"# The Chinese translation of {page_file(page).relative_to(ROOT)}: one entry per "
            "markdown cell (key: the cell's id) or figure caption (key: <cell id>/caption).\n"
            "# source: the hash of the English it translates (editions.digest); zh: the "
            "translation. Write entries with `python i18n/editions.py put`.\n")
    body = yaml.dump(entries, Dumper=_Dumper, allow_unicode=True, sort_keys=False, width=10_000)
    translation_path(page).write_text(head + body, encoding="utf-8")


def problems(page):
    """What keeps the page's translation from being current: [(key, why, English source)]."""
    english, entries = english_units(page), load(page)
    found = []
    for key, text in english.items():
        entry = entries.get(key)
        if not entry or entry.get("zh") is None or (text.strip() and not entry["zh"].strip()):
            found.append((key, "no translation", text))
        elif entry.get("source") != digest(text):
            found.append((key, "the English changed since it was translated", text))
    found += [(key, "translates a cell the page no longer has", "") for key in entries if key not in english]
    return found


def book_strings():
    return yaml.safe_load(BOOK_STRINGS.read_text(encoding="utf-8"))


def _translate_notebook(page, entries):
    nb = json.loads(page_file(page).read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            cell["source"] = entries[cell["id"]]["zh"]
        if _caption(cell) is not None:
            cell["metadata"]["mystnb"]["figure"]["caption"] = entries[cell["id"] + CAPTION]["zh"]
    return json.dumps(nb, ensure_ascii=False, indent=1) + "\n"


def write_source():
    """Write the Chinese book's source to _build/zh-src: translated pages, shared files, config."""
    stale = [(page, key, why) for page in pages() for key, why, _ in problems(page)]
    if stale:
        raise SystemExit("the Chinese edition is not current (i18n/editions.py status shows the English):\n"
                         + "\n".join(f"  {page} cell {key}: {why}" for page, key, why in stale))
    strings = book_strings()
    if SOURCE.exists():
        shutil.rmtree(SOURCE)
    SOURCE.mkdir(parents=True)
    for name in SHARED:
        src, dst = ROOT / name, SOURCE / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    for page in pages():
        path, entries = page_file(page), load(page)
        out = SOURCE / path.relative_to(ROOT)
        out.parent.mkdir(parents=True, exist_ok=True)
        text = _translate_notebook(page, entries) if path.suffix == ".ipynb" else entries["page"]["zh"]
        out.write_text(text, encoding="utf-8")

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    for part in toc.get("parts", []):
        part["caption"] = strings["captions"][part["caption"]]
    (SOURCE / "_toc.yml").write_text(yaml.safe_dump(toc, allow_unicode=True, sort_keys=False),
                                     encoding="utf-8")

    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    config["title"] = strings["title"]
    config["author"] = strings["author"]
    sphinx = config["sphinx"]["config"]
    sphinx["language"] = "zh_CN"
    # Sphinx's Chinese search splits words with jieba; the glossary's Chinese terms are added to
    # its dictionary so that 批归一化 is indexed as one word (and, cut for search, as 归一化 too).
    sphinx["html_search_language"] = "zh"
    sphinx["extensions"] = sphinx["extensions"] + ["zh_search"]      # _ext/zh_search.py
    sphinx["html_search_options"] = {"dict": str(SOURCE / "search-terms.txt")}
    # The English edition's switch, pointing back: same label, the other way round.
    sphinx["edition"].update(lang=LANG, other_lang="en", other_root="../")
    (SOURCE / "_config.yml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False),
                                        encoding="utf-8")
    terms = sorted(glossary_terms_zh())
    (SOURCE / "search-terms.txt").write_text("".join(f"{t} 1000 n\n" for t in terms), encoding="utf-8")
    return SOURCE


def _glossary_block(text):
    """The body of the ```{glossary} directive of a glossary page's text."""
    return text.split("```{glossary}", 1)[1].split("\n```", 1)[0]


def glossary_names(text):
    """The term-name lines (unindented, not options) of a glossary page's text, in order."""
    return [line for line in _glossary_block(text).splitlines()
            if line.strip() and not line.startswith((" ", ":"))]


def _has_cjk(text):
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def glossary_pairs():
    """(English name, the Chinese name both editions use for it) for every English name that
    the glossary follows with Chinese names (an entry may hold two terms: Pre-LN and Post-LN)."""
    block = _glossary_block((ROOT / "chapters" / "glossary.md").read_text(encoding="utf-8"))
    pairs, latin = [], None
    for line in block.splitlines()[1:]:
        name = line.strip()
        if not name or line.startswith((" ", ":")):
            latin = None
        elif not _has_cjk(name):
            latin = name
        elif latin is not None:
            pairs.append((latin, name))
            latin = None
    return pairs


def glossary_terms_zh():
    """The glossary's Chinese names that are one word (jieba's dictionary cannot hold a space)."""
    names = glossary_names((ROOT / "chapters" / "glossary.md").read_text(encoding="utf-8"))
    return {name for name in names if _has_cjk(name) and " " not in name}


# What a translation must carry over unchanged: math, code, labels, cross-reference targets,
# glued numbers, citations, directives (with their options, and the whole body of those whose
# body is not prose: a literalinclude, an eval-rst block, a math block), links and images. Link
# texts, {term} roles and the bodies of prose directives (a note, a figure's caption, the
# glossary's definitions) are translated; a Chinese glossary name resolves to the same entry.
PROSE_DIRECTIVES = {"glossary", "note", "tip", "warning", "important", "admonition", "seealso",
                    "figure", "dropdown", "margin", "sidebar", "epigraph", "caution", "hint"}
_FENCE = re.compile(r"^(\s*)(```+|:::+)\s*\{([\w:-]+)\}.*?^\1\2\s*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(?<![`\\])`((?:[^`\n]|\n(?!\n))+)`(?!`)")
_INVARIANTS = {
    # Inline math may wrap onto a second line; a blank line ends a paragraph, and with it any span.
    "math": re.compile(r"\$\$.+?\$\$|(?<![\\$])\$(?:[^$\n]|\n(?!\n))+?\$", re.DOTALL),
    "label": re.compile(r"^\(([^)\s]+)\)=\s*$|\$\$\s*\(([^)\s]+)\)\s*$", re.MULTILINE),
    "role target": re.compile(r"\{(glue(?::\w+)?|cite(?::\w+)?|ref|numref|doc|eq|download|math|py:\w+)\}"
                              r"`(?:[^`<]*<)?([^`>]+)>?`"),
    "directive": re.compile(r"^\s*(?:```+|:::+)\s*\{([\w:-]+)\}(.*)$", re.MULTILINE),
    "directive option": re.compile(r"^\s*:(\w[\w-]*):(.*)$", re.MULTILINE),
    "verbatim block": _FENCE,
    "link target": re.compile(r"\]\(([^)\s]+)\)"),
    "code": _CODE_SPAN,
}
_ANY_ROLE = re.compile(r"\{[\w:-]+\}`[^`]*`")


def invariants(text, kinds=tuple(_INVARIANTS)):
    """{kind: sorted list of what the text holds of it} for the parts a translation must keep."""
    found = {}
    without_roles = _ANY_ROLE.sub(" ", text)
    without_code = _CODE_SPAN.sub(" ", without_roles)
    for kind in kinds:
        subject = {"code": without_roles, "math": without_code}.get(kind, text)
        items = []
        for match in _INVARIANTS[kind].finditer(subject):
            if kind == "verbatim block":
                if match.group(3) not in PROSE_DIRECTIVES:
                    items.append(match.group(0).strip())
                continue
            groups = [g for g in match.groups() if g is not None] or [match.group(0)]
            items.append(" ".join(" ".join(g.split()) for g in groups))
        found[kind] = sorted(items)
    return found


def mismatches(english, chinese):
    """How a translation's math, code and references differ from its English: [str]."""
    en, zh = invariants(english), invariants(chinese)
    out = []
    for kind in _INVARIANTS:
        if kind == "code":             # every English code span appears; more may be added
            missing = sorted(set(en[kind]) - set(zh[kind]))
            if missing:
                out.append(f"{kind} missing: {missing}")
        elif en[kind] != zh[kind]:
            out.append(f"{kind} differs: only in English {sorted(set(en[kind]) - set(zh[kind]))}, "
                       f"only in Chinese {sorted(set(zh[kind]) - set(en[kind]))}"
                       + ("" if set(en[kind]) != set(zh[kind]) else " (counts differ)"))
    return out


def _jupyter_book():
    exe = Path(sys.executable).with_name("jupyter-book")
    return str(exe) if exe.exists() else shutil.which("jupyter-book")


def build(flags=("-W", "-n", "--keep-going", "--all")):
    """Build both editions side by side; return (exit status, combined log).

    The English edition is built even when the Chinese one cannot be (a translation is
    missing or stale): the status is then 1 and the log names the cells. A Chinese edition
    that did not build is removed from _build/html/zh, never left there from an earlier build.
    """
    start = time.perf_counter()
    target = HTML / LANG
    commands = {"en": [_jupyter_book(), "build", ".", *flags]}
    try:
        write_source()
        commands[LANG] = [_jupyter_book(), "build", str(SOURCE), "--path-output", str(OUT), *flags]
        stale = ""
    except SystemExit as refused:
        stale = f"===== {LANG} edition: not built =====\n{refused}\n"
    with tempfile.TemporaryDirectory() as logs:          # files, not pipes: neither job blocks
        jobs = {}
        for name, command in commands.items():
            with open(Path(logs) / name, "w", encoding="utf-8") as log:
                jobs[name] = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        codes = {name: job.wait() for name, job in jobs.items()}
        text = {name: (Path(logs) / name).read_text(encoding="utf-8") for name in jobs}
    ok = all(code == 0 for code in codes.values()) and not stale   # a killed job's code is < 0
    if target.exists():
        shutil.rmtree(target)
    if ok:
        (OUT / "_build" / "html").rename(target)       # same file system: a rename, not a copy
    log = "".join(f"===== {name} edition =====\n{text[name]}" for name in jobs) + stale
    log += f"{' and '.join(jobs)} built in {time.perf_counter() - start:.1f} s (exit {int(not ok)})\n"
    return int(not ok), log


def main(argv):
    command, args = (argv[0], argv[1:]) if argv else ("build", [])
    if command == "build":
        status, log = build()
        print(log, end="")
        return status
    if command == "status":
        left = 0
        for page in args or pages():
            for key, why, text in problems(page):
                left += 1
                print(f"=== {page} cell {key} (English {digest(text)}): {why}\n{text}\n")
        print(f"{left} cell(s) to translate")
        return 1 if left else 0
    if command == "put":
        page, key, file, expect = args
        entries, english = load(page), english_units(page)
        if key not in english:
            raise SystemExit(f"{page} has no markdown cell or caption {key!r}")
        if expect != digest(english[key]):
            raise SystemExit(f"{page} cell {key}: the English changed since `status` showed it "
                             f"({expect}, now {digest(english[key])}); translate the new English")
        text = Path(file).read_text(encoding="utf-8").rstrip("\n")
        if english[key].endswith("\n"):
            text += "\n"
        entries[key] = {"source": digest(english[key]), "zh": text}
        save(page, {k: entries[k] for k in english if k in entries})
        found = mismatches(english[key], text)
        for why in found:
            print(f"{page} cell {key}: {why}")
        return 1 if found else 0
    if command == "check":
        bad = 0
        for page in args or pages():
            english, entries = english_units(page), load(page)
            for key, entry in entries.items():
                if key in english and entry and entry.get("zh"):
                    for why in mismatches(english[key], entry["zh"]):
                        bad += 1
                        print(f"{page} cell {key}: {why}")
        print(f"{bad} problem(s)")
        return 1 if bad else 0
    if command == "source":
        print(write_source())
        return 0
    raise SystemExit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

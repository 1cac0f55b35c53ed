"""A link on every page to the same page in the book's other edition (English ⇄ 中文).

Both editions have the same pages at the same paths: English at the site's root, Chinese
under ``zh/`` (i18n/editions.py builds both). The config value ``edition`` says which edition
this build is and where the other one's root lies, relative to this one's:

    edition = {"lang": "en", "other_lang": "zh", "other_root": "zh/", "label": "EN ⇄ 中文"}

Each page with a body (all but the generated genindex, py-modindex and search pages) gets, at
the top of its article, a link to its twin, and a ``<link rel="alternate" hreflang=...>`` in
its head. Nothing is fetched: the link is plain HTML.
"""
from html import escape


def _twin(app, pagename):
    edition = app.config.edition
    depth = pagename.count("/")
    return "../" * depth + edition["other_root"] + pagename + ".html"


def _add_switch(app, pagename, templatename, context, doctree):
    edition = app.config.edition
    if not edition:
        return
    href = escape(_twin(app, pagename))
    here, there = edition["lang"], edition["other_lang"]
    # "EN ⇄ 中文", the current edition's side in bold (English's is the first side).
    sides = [escape(side) for side in edition["label"].split("⇄")]
    current = 0 if here == "en" else len(sides) - 1
    sides[current] = f"<strong>{sides[current].strip()}</strong>"
    label = " ⇄ ".join(side.strip() for side in sides)
    title = "Read this page in Chinese" if here == "en" else "阅读本页的英文版"
    link = (f'<p class="edition-switch"><a href="{href}" hreflang="{there}" '
            f'title="{title}">{label}</a></p>\n')
    if "body" in context:
        context["body"] = link + context["body"]
    context["metatags"] = context.get("metatags", "") + (
        f'\n<link rel="alternate" hreflang="{there}" href="{href}" />')


def setup(app):
    app.add_config_value("edition", {}, "html")
    app.connect("html-page-context", _add_switch)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""The built book, read in a real browser.

Builds both editions with warnings as errors, as `make book` does (English in ``_build/html``,
Chinese in ``_build/html/zh``), serves ``_build/html`` on 127.0.0.1 and opens every page of
both in headless Chromium. On every page: no console error, no request leaving loopback (each
is recorded and aborted), every formula typeset by the book's own MathJax, every image loaded,
every link in the page (navigation, table of contents, download button, cross references)
resolving to a file of the book, and a link to the same page in the other edition. Then the
English search page must find "momentum", and the Chinese one 批归一化 on the BatchNorm chapter.

Needs Debian's Chromium at /usr/bin/chromium (playwright cannot download browsers here): without
it the browser tests skip, unless NORMCODE_REQUIRE_BROWSER=1 (set by CI), where they fail.
A failing page's screenshot is saved in test-artifacts/. NORMCODE_SCREENSHOTS=1 saves a
full-page screenshot of every page there, for looking at.
"""
import functools
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOOPBACK = "127.0.0.1"

pytestmark = [pytest.mark.browser]


@pytest.fixture(scope="module")
def build():
    """Build both editions once per session, as `make book` does, with fresh environments.

    i18n/editions.py passes --all: an incremental build skips unchanged pages and with them
    the warnings they raised last time, so it could pass on a book that does not build clean.
    """
    cmd = [sys.executable, str(ROOT / "i18n" / "editions.py"), "build"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    return done.returncode, done.stdout + done.stderr


def test_book_builds_without_warnings(build):
    returncode, log = build
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert returncode == 0 and not warnings, (
        f"the book's build (-W -n, both editions) failed (exit {returncode}):\n" + "\n".join(warnings or [log[-5000:]]))


@pytest.fixture(scope="module")
def site(build):
    """The built HTML, served on loopback; yields the base URL."""
    if build[0] != 0:
        pytest.fail("the book did not build; see test_book_builds_without_warnings")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), functools.partial(Quiet, directory=str(HTML)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{LOOPBACK}:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium and one context for every page; yields (context, external requests)."""
    if not Path(CHROMIUM).exists():
        message = (f"no browser at {CHROMIUM}: install Debian's Chromium (`apt-get install -y chromium`) "
                   "to run the browser check")
        if os.environ.get("NORMCODE_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (NORMCODE_REQUIRE_BROWSER=1 makes it mandatory)")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    external = []

    def only_loopback(route):
        url = route.request.url
        if urlsplit(url).hostname in (None, LOOPBACK):       # None: data: and blob: URLs
            route.continue_()
        else:
            external.append(url)
            route.abort()

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = chromium.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
        context.set_default_timeout(30_000)
        context.route("**/*", only_loopback)
        yield context, external
        chromium.close()


# Runs in the page once it has loaded: waits for MathJax and the images, then reports.
INSPECT = r"""
async () => {
  const report = {formulas: 0, untypeset: [], mathErrors: [], rawTex: [], badImages: [], images: 0,
                  links: [], navLinks: 0, mathjax: null};
  if (document.querySelector('script[src*="mathjax"]')) {
    for (let i = 0; i < 400 && !(window.MathJax && MathJax.startup && MathJax.startup.promise); i++)
      await new Promise(r => setTimeout(r, 50));
    if (!(window.MathJax && MathJax.startup)) { report.mathjax = 'MathJax never started'; }
    else { await MathJax.startup.promise; report.mathjax = 'ok'; }
  }
  report.formulas = document.querySelectorAll('mjx-container').length;
  for (const node of document.querySelectorAll('.math'))
    if (!node.querySelector('mjx-container')) report.untypeset.push(node.textContent.slice(0, 80));
  report.mathErrors = Array.from(document.querySelectorAll('mjx-merror'),
                                 e => e.getAttribute('data-mjx-error') || e.textContent);

  // TeX left in the reading text (code is allowed to contain $ and backslashes).
  const main = document.querySelector('main') || document.body;
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT, {acceptNode(node) {
    return node.parentElement.closest('pre, code, script, style, textarea, mjx-container, .highlight, kbd')
      ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT; }});
  const tex = /\\\(|\\\)|\\\[|\\\]|\$\$|\$[^\s$][^$]*\$|\\(frac|sqrt|sum|mathrm|hat|begin)\b/;
  for (let node = walker.nextNode(); node; node = walker.nextNode())
    if (tex.test(node.textContent)) report.rawTex.push(node.textContent.trim().slice(0, 80));

  const images = Array.from(document.images);
  for (const img of images) if (img.loading === 'lazy') img.loading = 'eager';
  await Promise.all(images.map(img => img.complete ? null : new Promise(r => {
    img.addEventListener('load', r); img.addEventListener('error', r); setTimeout(r, 15000); })));
  report.images = images.length;
  report.badImages = images.filter(img => !img.complete || img.naturalWidth === 0).map(img => img.src);

  const twin = document.querySelector('p.edition-switch a[hreflang]');
  report.twin = twin ? twin.href : null;

  const nav = '.bd-sidebar-primary, .bd-sidebar-secondary, .bd-header-article, .prev-next-area, .bd-toc-nav';
  for (const a of document.querySelectorAll('a[href]')) {
    report.links.push(a.href);
    if (a.closest(nav)) report.navLinks++;
  }
  return report;
}
"""


def _pages():
    """Every built HTML page of both editions but search.html (tested on its own, with a query)."""
    skip = {"_static", "_sources", "_images"}
    return sorted(p.relative_to(HTML).as_posix() for p in HTML.rglob("*.html")
                  if not skip & set(p.relative_to(HTML).parts) and p.name != "search.html")


def _twin(name):
    """The same page in the other edition."""
    return name.removeprefix("zh/") if name.startswith("zh/") else "zh/" + name


@functools.lru_cache(maxsize=None)
def _ids(path):
    return set(re.findall(r'\sid="([^"]+)"', path.read_text(encoding="utf-8", errors="replace")))


def _broken_link(url, base):
    """Why a link into the book does not resolve (None if it does, or leaves the book)."""
    if not url.startswith(base):
        return None                                  # external: a link, never fetched here
    parts = urlsplit(url)
    target = HTML / unquote(parts.path.lstrip("/"))
    if target.is_dir():
        target = target / "index.html"
    if not target.is_file():
        return f"{url}: no such file"
    fragment = unquote(parts.fragment)
    if fragment and target.suffix == ".html" and fragment not in _ids(target):
        return f"{url}: no element with id {fragment!r}"
    return None


def _open(context, url):
    """Open ``url`` in a new page; returns (page, console errors) with listeners attached."""
    page = context.new_page()
    errors = []
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url} ({req.failure})"))
    page.on("response", lambda res: errors.append(f"HTTP {res.status}: {res.url}") if res.status >= 400 else None)
    page.goto(url, wait_until="load")
    return page, errors


def _screenshot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / (name.replace("/", "__").removesuffix(".html") + ".png")
    page.screenshot(path=str(path), full_page=True)
    return path


def test_every_page_renders_offline(site, browser):
    context, external = browser
    pages = _pages()
    assert "index.html" in pages and len(pages) >= 3, pages
    english = [p for p in pages if not p.startswith("zh/")]
    assert sorted(_twin(p) for p in english) == [p for p in pages if p.startswith("zh/")], (
        "the Chinese edition does not have exactly the English edition's pages")
    problems, formulas, images, links, nav_links = {}, 0, 0, 0, 0
    for name in pages:
        seen = len(external)
        page, errors = _open(context, site + name)
        report = page.evaluate(INSPECT)
        page.wait_for_timeout(100)                     # let late requests show up
        found = list(errors)
        found += [f"request outside loopback (aborted): {url}" for url in external[seen:]]
        if report["mathjax"] not in (None, "ok"):
            found.append(report["mathjax"])
        found += [f"formula not typeset: {tex!r}" for tex in report["untypeset"]]
        found += [f"MathJax error: {message}" for message in report["mathErrors"]]
        found += [f"raw TeX in the text: {text!r}" for text in report["rawTex"]]
        found += [f"image did not load: {src}" for src in report["badImages"]]
        found += [why for why in map(lambda url: _broken_link(url, site), report["links"]) if why]
        if name not in ("genindex.html", "zh/genindex.html", "py-modindex.html", "zh/py-modindex.html") \
                and report["twin"] != site + _twin(name):
            found.append(f"no link to the other edition's page {_twin(name)} (found {report['twin']})")
        formulas += report["formulas"]
        images += report["images"]
        links += len(report["links"])
        nav_links += report["navLinks"]
        if found:
            problems[name] = found + [f"screenshot: {_screenshot(page, name)}"]
        elif os.environ.get("NORMCODE_SCREENSHOTS") == "1":
            _screenshot(page, name)
        page.close()
    print(f"\nbrowser check: {len(pages)} pages ({len(english)} per edition), {formulas} formulas typeset, {images} images loaded, "
          f"{links} links checked ({nav_links} in the navigation)")
    assert not problems, "\n".join(f"{name}:\n  " + "\n  ".join(found) for name, found in problems.items())
    assert formulas > 0, "no formula was typeset anywhere: is MathJax loaded?"


def _search(site, browser, edition, query):
    """The result links of the edition's search page for ``query`` (the edition's root: "" or
    "zh/"), failing on no result, a console error or a request leaving the book."""
    context, external = browser
    seen = len(external)
    page, errors = _open(context, f"{site}{edition}search.html?q={query}")
    results = page.locator("#search-results ul.search li")
    try:
        results.first.wait_for(timeout=20_000)
    except Exception:
        pytest.fail(f"no search result for {query!r} (screenshot: {_screenshot(page, edition + 'search')})")
    hits = [results.nth(i).locator("a").first.get_attribute("href") for i in range(results.count())]
    page.close()
    assert not errors and len(external) == seen, (errors, external[seen:])
    print(f"\nsearch {edition or 'en/'}: {query!r} found on {len(hits)} page(s)")
    return hits


def test_search_finds_momentum(site, browser):
    hits = _search(site, browser, "", "momentum")
    assert any("glossary" in href for href in hits), hits


def test_chinese_search_finds_batchnorm(site, browser):
    """The Chinese edition's search segments words with jieba and the glossary's terms, so a
    query for 批归一化 (batch normalization) finds the BatchNorm chapter."""
    hits = _search(site, browser, "zh/", "批归一化")
    assert any("chapters/batchnorm" in href for href in hits), hits


def _api_names():
    """Every public class and function the API page must document, by its documented path."""
    import inspect

    import normcode

    names = {f"normcode.{n}" for n in normcode.__all__
             if inspect.isclass(getattr(normcode, n)) or inspect.isfunction(getattr(normcode, n))}
    for module in ("functional", "masked", "switchable", "distributed", "manual", "variance",
                   "testing", "figures"):
        mod = getattr(normcode, module, None) or __import__(f"normcode.{module}", fromlist=["_"])
        for n, obj in vars(mod).items():
            if (not n.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                    and obj.__module__ == mod.__name__ and f"normcode.{n}" not in names
                    and obj not in [getattr(normcode, m) for m in normcode.__all__]):
                names.add(f"{mod.__name__}.{n}")
    return names


@pytest.mark.parametrize("edition", ["", "zh/"], ids=["en", "zh"])
def test_api_page_documents_every_public_name(site, browser, edition):
    """The API page (chapters/api.md, by autodoc) has an entry for every public class and
    function, each with its signature, and its formulas typeset by MathJax, in both editions."""
    context, _ = browser
    page, errors = _open(context, site + edition + "chapters/api.html")
    report = page.evaluate(INSPECT)
    documented = set(page.evaluate("[...document.querySelectorAll('dt.sig[id]')].map(e => e.id)"))
    signatures = page.evaluate("document.querySelectorAll('dt.sig .sig-paren').length")
    page.close()
    missing = sorted(_api_names() - documented)
    assert not missing, f"the API page lacks {missing}"
    assert signatures >= 2 * len(_api_names()), "signatures missing"          # ( and ) each
    assert report["formulas"] >= 10 and not report["untypeset"] and not report["mathErrors"], report
    assert not errors, errors

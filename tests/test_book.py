"""The book builds, and every page of the built site works in a real (headless) browser, offline.

The build here uses the outputs saved in the notebooks (nbval executes them separately), so this
module checks what a reader of the website sees: no error output, typeset math, loaded images,
rendered widgets, solutions that start collapsed and open on a click, and no request leaving
127.0.0.1. A screenshot of every page is saved under _build/screenshots/, and the page weights are
written to _build/page_weight.txt (printed at the end of the test run).
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "_build" / "screenshots"
PAGE_WEIGHT = ROOT / "_build" / "page_weight.txt"


def _toc_pages() -> list[str]:
    """Every document in _toc.yml (without suffix), in reading order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                pages.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(toc.get("parts", toc.get("chapters", [])))
    return pages


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Build the book from the saved notebook outputs into a temporary folder; return the HTML root."""
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
    return out / "_build" / "html"


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


def test_widgets_render_with_their_saved_state(site, server, browser):
    rendered = {}
    for page in _toc_pages():
        report = _visit(browser, f"{server}/{page}.html")
        if report["widgetViews"]:
            rendered[page] = report["widgetsRendered"]
    assert rendered, "no page carries a widget: did the notebooks save their widget state?"
    assert all(count > 0 for count in rendered.values()), rendered


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


def test_in_site_search_finds_a_chapter(site, server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{server}/search.html?q=rotary")
    results = WebDriverWait(browser, 30).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "ul.search li a") or None,
        message="the search page listed no result for 'rotary'",
    )
    assert any("04_position" in (a.get_attribute("href") or "") for a in results)

"""Sphinx extension: serve MathJax, RequireJS and the Jupyter widgets manager from the site itself.

By default Sphinx loads MathJax from a CDN and myst-nb loads RequireJS and the widgets' HTML manager
from two more, so a page read offline shows raw LaTeX and dead widgets. This extension installs the
three from the npm registry (once, into ``_build/.offline_assets``), copies them into the site's
``_static`` folder and points Sphinx and myst-nb at those copies. A page whose widget views all gave way
to static HTML (`llmbook.widgets.static_interact`, ranked above widget views in _config.yml) loads none of
the widget scripts: the widgets manager alone weighs several megabytes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ExtensionError

# Pinned so the site is reproducible. html-manager 1.x is the one that speaks ipywidgets 8's protocol;
# MathJax 3 is the major version Sphinx 7's math output is written for.
NPM_PACKAGES = {
    "mathjax": "3.2.2",
    "requirejs": "2.3.8",
    "@jupyter-widgets/html-manager": "1.0.15",
    # The Chinese edition's typeface (SIL Open Font License), served from the site: a reader offline, or on
    # a system without a CJK font, still sees Chinese text rather than boxes. Fontsource splits it into ~100
    # unicode-range slices, so a page downloads only the slices of the characters it uses.
    "@fontsource/noto-sans-sc": "5.2.8",
}
CJK_FONT_WEIGHTS = (400, 700)


def _install(root: Path) -> Path:
    """Install the pinned npm packages under root (skipped when already there) and return node_modules."""
    modules = root / "node_modules"
    stamp = root / "installed.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == NPM_PACKAGES and modules.is_dir():
        return modules
    npm = shutil.which("npm")
    if npm is None:
        raise ExtensionError(
            "the book serves MathJax and the widget scripts itself and installs them with npm, "
            "but `npm` is not on PATH; install Node.js (e.g. `apt-get install nodejs npm`) and build again"
        )
    root.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}@{version}" for name, version in NPM_PACKAGES.items()]
    cmd = [npm, "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(root), *specs]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ExtensionError(f"`{' '.join(cmd)}` failed:\n{result.stderr[-2000:]}")
    stamp.write_text(json.dumps(NPM_PACKAGES))
    return modules


def _stage(modules: Path, static: Path) -> None:
    """Copy just the files the pages load into one folder that becomes part of _static."""
    if static.exists():
        shutil.rmtree(static)
    static.mkdir(parents=True)
    # MathJax finds its fonts and extensions relative to its own script, so keep its es5 tree whole.
    shutil.copytree(modules / "mathjax" / "es5", static / "mathjax")
    shutil.copy2(modules / "requirejs" / "require.js", static / "require.js")
    shutil.copy2(
        modules / "@jupyter-widgets" / "html-manager" / "dist" / "embed-amd.js", static / "embed-amd.js"
    )


def _stage_cjk_font(modules: Path, static: Path) -> None:
    """Copy Noto Sans SC's woff2 slices and write fonts/noto-sans-sc.css, whose rules point at them and
    make it the Chinese pages' typeface (after the theme's Latin system fonts)."""
    package = modules / "@fontsource" / "noto-sans-sc"
    fonts = static / "fonts"
    fonts.mkdir()
    faces = []
    for weight in CJK_FONT_WEIGHTS:
        css = (package / f"{weight}.css").read_text()
        for face in re.findall(r"@font-face\s*\{[^}]*\}", css):
            woff2 = re.search(r"url\(\./files/([^)]+\.woff2)\)", face).group(1)
            shutil.copy2(package / "files" / woff2, fonts / woff2)
            faces.append(re.sub(r"src:[^;]*;", f"src: url(./{woff2}) format('woff2');", face))
    latin = '-apple-system, BlinkMacSystemFont, "Segoe UI", "Helvetica Neue", Arial'
    stack = f'{latin}, "Noto Sans SC", sans-serif'
    rules = f":root {{ --pst-font-family-base: {stack}; --pst-font-family-heading: {stack}; }}"
    (fonts / "noto-sans-sc.css").write_text("\n".join(faces) + "\n" + rules + "\n")


def _configure(app: Sphinx, config: Config) -> None:
    # Under the source folder's _build (not the output folder) so that every build shares one install; a
    # build of staged sources (the Chinese edition) names the book's own with llmbook_assets_dir.
    assets = Path(config.llmbook_assets_dir or Path(app.srcdir) / "_build" / ".offline_assets")
    static = assets / ("static-" + (config.language or "en"))
    modules = _install(assets)
    _stage(modules, static)
    if (config.language or "").startswith("zh"):
        _stage_cjk_font(modules, static)
        config.html_css_files = [*config.html_css_files, "fonts/noto-sans-sc.css"]
    config.html_static_path = [*config.html_static_path, str(static)]
    config.mathjax_path = "mathjax/tex-chtml.js"
    # myst-nb adds each key as a script tag; relative names resolve inside _static.
    config.nb_ipywidgets_js = {"require.js": {}, "embed-amd.js": {}}


def _drop_widget_scripts_without_views(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    """Remove the widget state and scripts myst-nb registered for a page that renders no widget view.

    Runs once the builder's mime type is chosen for every output (myst-nb's SelectMimeType), before the
    page's scripts are written (html-page-context).
    """
    view = "application/vnd.jupyter.widget-view+json"
    if any(view in node.astext() for node in doctree.findall(nodes.raw)):
        return
    js_files = getattr(app.env, "nb_metadata", {}).get(docname, {}).get("js_files", {})
    for key in [key for key in js_files if key.startswith("ipywidgets_")]:
        del js_files[key]


def setup(app: Sphinx) -> dict:
    # Run before myst-nb reads nb_ipywidgets_js from the config.
    app.add_config_value("llmbook_assets_dir", "", "env")
    app.connect("config-inited", _configure, priority=100)
    app.connect("doctree-resolved", _drop_widget_scripts_without_views)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

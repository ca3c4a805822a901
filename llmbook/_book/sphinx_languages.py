"""Sphinx extension: a link at the top of every page to the same page in the book's other language.

The English site is built into ``_build/html`` and the Chinese one into ``_build/html/zh``
(llmbook/_book/i18n.py), with the same page names, so a page's counterpart is the other site's root, then
the page's own name. ``llmbook_other_language`` says where that root is, relative to this site's root,
and how to label the link:

    llmbook_other_language = {"href": "zh/", "label": "中文", "hreflang": "zh-CN"}   # the English site
    llmbook_other_language = {"href": "../", "label": "English", "hreflang": "en"}  # the Chinese site

The link is plain HTML in the page body, so it works without JavaScript and on a page saved to disk.
"""

from __future__ import annotations

from html import escape

from sphinx.application import Sphinx


def other_language_href(pagename: str, root_href: str) -> str:
    """The relative URL of pagename in the other site, whose root is root_href from this site's root."""
    return "../" * pagename.count("/") + root_href + pagename + ".html"


def _add_link(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    other = app.config.llmbook_other_language
    if not other or doctree is None or "body" not in context:
        return
    href = escape(other_language_href(pagename, other["href"]), quote=True)
    lang = escape(other["hreflang"], quote=True)
    link = (
        f'<p class="llmbook-language"><a href="{href}" hreflang="{lang}" lang="{lang}">'
        f"{escape(other['label'])}</a></p>\n"
    )
    context["body"] = link + context["body"]
    context["metatags"] = context.get("metatags", "") + (
        f'\n<link rel="alternate" hreflang="{lang}" href="{href}" />'
    )


def setup(app: Sphinx) -> dict:
    app.add_config_value("llmbook_other_language", {}, "html")
    app.connect("html-page-context", _add_link)
    app.add_css_file("llmbook-language.css")
    app.connect("builder-inited", _write_css)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def _write_css(app: Sphinx) -> None:
    from pathlib import Path

    static = Path(app.outdir) / "_static"
    static.mkdir(parents=True, exist_ok=True)
    (static / "llmbook-language.css").write_text(
        ".llmbook-language { text-align: right; margin: 0 0 0.5rem; font-size: 0.9rem; }\n"
    )

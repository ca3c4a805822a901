"""The book's pages in reading order, from _toc.yml (Jupyter Book 1.x): the one walk every tool uses."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def toc_pages(root: Path = ROOT) -> list[str]:
    """Every page of _toc.yml without its suffix, in reading order: the root page, then each `file`."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(node) -> None:
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

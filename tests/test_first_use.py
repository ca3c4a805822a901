"""Nothing is used before it is taught: a chapter uses only what its own and earlier chapters build.

The reading order is `_toc.yml`'s; the chapter that builds each module is the module map's chapter column
(llmbook/README.md; rows marked `all` or `-` are shared and exempt). A chapter, or one of its exercise
notebooks, fails when it imports a module a later chapter builds, runs `python -m` on one, quotes a glue key
whose `chNN_` prefix is a later chapter's, or checks an exercise id (`check("NN.name", ...)`) of a later
chapter. Nothing is executed: the tests read the saved notebooks.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHAPTER_PAGE = re.compile(r"^chapters/(\d\d)_\w+$")

IMPORT = re.compile(r"^[ \t]*import[ \t]+(.+)$", re.MULTILINE)
FROM_IMPORT = re.compile(
    r"^[ \t]*from[ \t]+(llmbook[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[\w ,]+)", re.MULTILINE
)
RUN_MODULE = re.compile(r"-m\s+(llmbook[\w.]*)")
GLUE_KEY = re.compile(r"\bch(\d\d)_\w+")
CHECK_ID = re.compile(r"\bcheck\(\s*[\"'](\d\d)\.")

# Forward uses a notebook may make on purpose: (notebook, module) -> why the reader is not lost.
ALLOWED = {
    (
        "chapters/00_forward_pass",
        m,
    ): "chapter 0 is the tour: it runs the finished model station by station, as a "
    "black box whose parts the later chapters build, so the reader knows where each chapter is going"
    for m in ("llmbook.tokenizer", "llmbook.model", "llmbook.loss")
} | {
    (
        "chapters/04_position",
        "llmbook.model",
    ): "the experiment that compares position schemes needs a whole model; "
    "the reader has run TransformerLM in chapter 0's tour, and chapter 4 changes only its position setting",
}


def reading_order(toc_text: str) -> list[int]:
    """Chapter numbers in the order `_toc.yml` lists their pages (`chapters/NN_name`)."""
    order = []

    def walk(node):
        if isinstance(node, dict):
            match = CHAPTER_PAGE.match(str(node.get("file", "")))
            if match:
                order.append(int(match.group(1)))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load(toc_text))
    return order


def builders(module_map: str) -> dict[str, int]:
    """Module -> the chapter that builds it, from the module map's table (shared `all`/`-` rows left out)."""
    rows = re.findall(r"^\| \d+ \| `(llmbook[\w.]*)` \| ([^|]+) \|", module_map, re.MULTILINE)
    return {module: int(chapter) for module, chapter in rows if chapter.strip().isdigit()}


def _unit(module: str) -> str:
    """The module map's row a module belongs to: llmbook.kernels.rope -> llmbook.kernels."""
    return ".".join(module.split(".")[:2])


def imported_modules(code: str) -> set[str]:
    """The llmbook modules a code cell imports or runs with `python -m` (as module-map rows)."""
    found = set()
    for names in IMPORT.findall(code):
        found |= {name.split(" as ")[0].strip() for name in names.split(",")}
    for base, names in FROM_IMPORT.findall(code):
        if base != "llmbook":
            found.add(base)
        else:  # from llmbook import model: a module
            found |= {
                f"llmbook.{name.split(' as ')[0].strip()}"
                for name in names.strip("()").split(",")
                if name.strip()
            }
    for module in RUN_MODULE.findall(code):
        found.add("llmbook.__main__" if module == "llmbook" else module)
    return {_unit(name) for name in found if name.startswith("llmbook")}


def forward_uses(notebook: dict, chapter: int, order: list[int], built_by: dict[str, int]) -> list[str]:
    """What the notebook of `chapter` uses that a chapter after it in the reading order builds."""

    def later(other: int) -> bool:
        if other == chapter:
            return False
        if other not in order:  # a chapter the book does not have yet cannot have been read
            return True
        return chapter not in order or order.index(other) > order.index(chapter)

    problems = []
    for cell in notebook["cells"]:
        text = "".join(cell["source"])
        if cell["cell_type"] == "code":
            for module in sorted(imported_modules(text)):
                if module in built_by and later(built_by[module]):
                    problems.append(f"imports {module}, which chapter {built_by[module]} builds")
            for number in sorted(set(CHECK_ID.findall(text))):
                if later(int(number)):
                    problems.append(f"checks exercise {number}.*, an exercise of chapter {int(number)}")
        for number in sorted(set(GLUE_KEY.findall(text))):
            if later(int(number)):
                problems.append(f"uses glue key ch{number}_..., a value chapter {int(number)} computes")
    return problems


def _notebooks() -> list[Path]:
    return sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb")) + sorted(
        (ROOT / "exercises").glob("[0-9][0-9]_*.ipynb")
    )


NOTEBOOKS = _notebooks()


def test_every_chapter_notebook_is_in_the_reading_order():
    order = reading_order((ROOT / "_toc.yml").read_text())
    missing = [
        p.name for p in ROOT.joinpath("chapters").glob("[0-9][0-9]_*.ipynb") if int(p.name[:2]) not in order
    ]
    assert not missing, (
        f"chapters that _toc.yml does not list, so have no place in the reading order: {missing}"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[f"{p.parent.name}/{p.stem}" for p in NOTEBOOKS])
def test_notebook_uses_nothing_a_later_chapter_builds(path):
    order = reading_order((ROOT / "_toc.yml").read_text())
    built_by = builders((ROOT / "llmbook" / "README.md").read_text())
    notebook = json.loads(path.read_text(encoding="utf-8"))
    name = f"{path.parent.name}/{path.stem}"
    problems = [
        problem
        for problem in forward_uses(notebook, int(path.name[:2]), order, built_by)
        if not any(problem.startswith(f"imports {module},") for (page, module) in ALLOWED if page == name)
    ]
    assert not problems, (
        f"{path.parent.name}/{path.name} (chapter {int(path.name[:2])}) uses what a later chapter teaches: "
        f"{problems}. Move the use to that chapter or later, teach the thing here (and move its row in "
        f"llmbook/README.md's chapter column), or change the reading order in _toc.yml."
    )


# The test of the test: a tiny notebook and map where each kind of forward use must be caught.
TOC = "format: jb-book\nroot: intro\nchapters:\n  - file: chapters/02_a\n  - file: chapters/01_b\n"
MAP = (
    "| layer | module | chapter | what |\n|---|---|---|---|\n"
    "| 1 | `llmbook.early` | 2 | read first |\n| 1 | `llmbook.late` | 1 | read second |\n"
    "| 0 | `llmbook.data` | all | shared |\n| 9 | `llmbook.__main__` | 1 | the command line |\n"
)


def _notebook(*cells: tuple[str, str]) -> dict:
    return {"cells": [{"cell_type": kind, "source": [source]} for kind, source in cells]}


def test_reading_order_follows_the_toc_not_the_file_numbers():
    assert reading_order(TOC) == [2, 1]


def test_module_map_rows_marked_all_are_exempt():
    assert builders(MAP) == {"llmbook.early": 2, "llmbook.late": 1, "llmbook.__main__": 1}


def test_imports_of_every_form_are_found():
    code = (
        "import llmbook.late as l, os\nfrom llmbook.early.sub import f\nfrom llmbook import (data,\n late)\n"
        "!python -m llmbook train\n"
    )
    assert imported_modules(code) == {"llmbook.late", "llmbook.early", "llmbook.data", "llmbook.__main__"}


@pytest.mark.parametrize(
    "cell",
    [
        ("code", "from llmbook.late import thing"),
        ("code", "from llmbook import late"),
        ("code", "!python -m llmbook sample"),
        ("code", 'check("01.thing", answer)'),
        ("markdown", "The loss is {glue:text}`ch01_loss:.2f`."),
    ],
)
def test_a_notebook_that_uses_a_later_chapters_work_fails(cell):
    notebook = _notebook(("markdown", "# Chapter"), cell)
    assert forward_uses(notebook, 2, reading_order(TOC), builders(MAP))


def test_a_notebook_using_its_own_and_earlier_chapters_work_passes():
    notebook = _notebook(
        ("code", "from llmbook import early, data\nimport llmbook.early\nglue('ch01_x', 1)"),
        ("markdown", "The loss is {glue:text}`ch01_x`."),
    )
    assert forward_uses(notebook, 1, reading_order(TOC), builders(MAP)) == []


def test_a_chapter_the_book_does_not_have_yet_counts_as_later():
    notebook = _notebook(("code", "from llmbook import unwritten"))
    assert forward_uses(notebook, 2, reading_order(TOC), {"llmbook.unwritten": 7})

"""The book's conventions, checked on the saved notebooks (cheap: nothing is executed here)."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = sorted((ROOT / "exercises").glob("[0-9][0-9]_*_solution.ipynb"))
# The issues ask for at least this many graded exercises per chapter.
MIN_EXERCISES = {
    "00": 3, "01": 4, "02": 3, "03": 4, "04": 3, "05": 3,
    "06": 3, "07": 3, "08": 3, "09": 3, "10": 3, "11": 3,
}  # fmt: skip
CHECK_CALL = re.compile(r"""check\(\s*["'](\d\d\.\w+)["']""")


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _checked(cell: dict) -> bool:
    """nbval compares this cell's saved output (the cell tag, so readers never see test plumbing)."""
    return "nbval-check-output" in cell.get("metadata", {}).get("tags", [])


@pytest.mark.parametrize(
    "path", [*CHAPTERS, *sorted((ROOT / "exercises").glob("*.ipynb"))], ids=lambda p: p.name
)
def test_no_nbval_comment_markers_show_in_code(path):
    code = [_source(c) for c in _load(path)["cells"] if c["cell_type"] == "code"]
    hint = "use the nbval-check-output cell tag, not a comment"
    assert not [s for s in code if "NBVAL_" in s], f"{path.name}: {hint}"


def test_every_chapter_of_the_curriculum_exists():
    numbers = {p.name[:2] for p in CHAPTERS}
    assert numbers == set(MIN_EXERCISES), f"chapters present: {sorted(numbers)}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_opens_with_what_you_build_and_its_cpu_budget(path):
    first = _load(path)["cells"][0]
    assert first["cell_type"] == "markdown" and _source(first).startswith("# ")
    assert re.search(r"CPU budget:\*\*\s*about [\d.]+ minutes? on 2 cores", _source(first)), (
        f"{path.name}: the first cell must state '**CPU budget:** about N minutes on 2 cores.'"
    )


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_closes_with_a_summary_and_its_exercises(path):
    markdown = "\n".join(_source(c) for c in _load(path)["cells"] if c["cell_type"] == "markdown")
    assert "## Summary" in markdown
    assert f"exercises/{path.stem}_solution" in markdown, f"{path.name} must link its exercise page"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_is_saved_executed_with_figures_and_no_errors(path):
    cells = [c for c in _load(path)["cells"] if c["cell_type"] == "code"]
    outputs = [o for c in cells for o in c.get("outputs", [])]
    assert all(c.get("execution_count") for c in cells), f"{path.name}: some code cells were never run"
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} has no figure"
    assert any(_checked(c) for c in cells), f"{path.name} checks none of its outputs"
    assert path.stat().st_size < 2_000_000, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_seeds_its_random_generators(path):
    code = "\n".join(_source(c) for c in _load(path)["cells"] if c["cell_type"] == "code")
    draws = r"torch\.(randn|rand|randint|randperm|multinomial)|nn\.(Linear|Embedding)|TransformerLM"
    if re.search(draws, code):
        assert "manual_seed" in code, f"{path.name} draws random numbers without seeding"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_widgets_come_with_a_static_figure(path):
    cells = [c for c in _load(path)["cells"] if c["cell_type"] == "code"]
    if any("ipywidgets" in _source(c) for c in cells):
        images = sum("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", []))
        assert images >= 2, f"{path.name} has a widget but too few static figures beside it"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_solution_has_enough_graded_exercises_each_checked_and_collapsed(path):
    cells = [c for c in _load(path)["cells"] if c["cell_type"] == "code"]
    checks = [c for c in cells if CHECK_CALL.search(_source(c))]
    names = {m for c in checks for m in CHECK_CALL.findall(_source(c))}
    assert len(names) >= MIN_EXERCISES[path.name[:2]], f"{path.name}: only {sorted(names)}"
    hint = "every check(...) cell must be tagged nbval-check-output"
    assert all(_checked(c) for c in checks), f"{path.name}: {hint}"
    solved = [c for c in cells if "hide-input" in c.get("metadata", {}).get("tags", [])]
    assert solved, f"{path.name}: solution cells must be tagged hide-input so the site collapses them"
    for cell in checks:
        text = "".join("".join(o.get("text", "")) for o in cell.get("outputs", []))
        assert "✅" in text and "❌" not in text, f"{path.name}: a saved check did not pass: {text[:200]}"


TEMPLATES = sorted(p for p in (ROOT / "exercises").glob("[0-9][0-9]_*.ipynb") if p not in SOLUTIONS)


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_blank_notebook_reads_in_jupyterlab_and_states_its_running_time(path):
    # Blank notebooks are opened in JupyterLab, not built into the site: MyST roles would show raw there.
    markdown = "\n".join(_source(c) for c in _load(path)["cells"] if c["cell_type"] == "markdown")
    roles = re.findall(r"\{[a-z-]+\}`[^`]*`", markdown)
    assert not roles, f"{path.name} shows MyST roles JupyterLab does not render: {roles}"
    assert re.search(r"\*\*Running time:\*\* about \d+ minutes?", _source(_load(path)["cells"][0])), (
        f"{path.name}: the first cell must say '**Running time:** about N minutes'"
    )
    for target in re.findall(r"\]\(([^)#]+\.ipynb)\)", markdown):
        assert (path.parent / target).is_file(), f"{path.name} links to a missing notebook {target}"


# A chapter is read in one sitting: at most this many words of prose (code, maths, roles and link targets
# are not prose). The longest chapter before the second half was rebuilt had about 6,400.
MAX_PROSE_WORDS = 3500
_NOT_PROSE = [
    re.compile(r"```.*?```|:::.*?:::", re.S),  # fenced code and directives
    re.compile(r"\$\$.*?\$\$", re.S),  # display maths
    re.compile(r"\$[^$\n]+\$"),  # inline maths
    re.compile(r"\{[\w:]+\}`[^`]*`"),  # roles: glue, cite, doc, ref
    re.compile(r"`[^`]*`"),  # code spans
    re.compile(r"\]\([^)]*\)"),  # link targets
    re.compile(r"<[^>]+>"),  # html tags
]


def prose_words(markdown: str) -> int:
    """The words a reader reads in `markdown`: what is left once code, maths, roles and links are removed."""
    for pattern in _NOT_PROSE:
        markdown = pattern.sub(" ", markdown)
    return len(re.findall(r"[A-Za-z][\w'’-]*", markdown))


def test_prose_words_count_what_a_reader_reads():
    text = (
        "The cache holds $2 L d$ numbers, `KVCache` per layer, {glue:text}`ch09_x:.1f` bytes ([see](a.md)).\n"
    )
    assert prose_words(text) == len("The cache holds numbers per layer bytes see".split())


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_prose_fits_one_sitting(path):
    cells = _load(path)["cells"]
    words = sum(prose_words(_source(cell)) for cell in cells if cell["cell_type"] == "markdown")
    assert words <= MAX_PROSE_WORDS, (
        f"{path.name}: {words} words of prose, more than {MAX_PROSE_WORDS}: split it"
    )


_COUNT_WORDS = {w: n for n, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}  # fmt: skip


@pytest.mark.parametrize("chapter", sorted(p.name for p in (ROOT / "chapters").glob("[0-9][0-9]_*.ipynb")))
def test_a_chapter_counts_its_exercises_right(chapter):
    """A summary that says "Six graded exercises" has six numbered exercises in its solution notebook."""
    import re

    import nbformat

    cells = nbformat.read(ROOT / "chapters" / chapter, 4).cells
    text = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    claims = re.findall(r"\b([A-Z][a-z]+) graded exercises", text)
    solution = next((ROOT / "exercises").glob(chapter[:3] + "*_solution.ipynb"))
    sections = [
        line for c in nbformat.read(solution, 4).cells if c.cell_type == "markdown"
        for line in c.source.splitlines() if re.match(r"## \d+\. ", line)
    ]  # fmt: skip
    for word in claims:
        assert _COUNT_WORDS[word.lower()] == len(sections), (
            f"{chapter} says {word} graded exercises; {solution.name} has {len(sections)}"
        )

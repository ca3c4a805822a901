"""Static checks that the chapters' prose quotes its numbers from the executed outputs (myst-nb glue).

Nothing is executed: the tests read the saved notebooks. A `{glue}` role whose key no cell glues, or whose
key is missing from the saved outputs, would render as an error (or a stale value) on the website; a bare
decimal in the prose that also appears in an output is a copy of a computed number that can drift.
"""

import json
import re
from pathlib import Path

import pytest

CHAPTERS = sorted((Path(__file__).resolve().parent.parent / "chapters").glob("*.ipynb"))

# `{glue}`key``, `{glue:text}`key:.2f``, `{glue:any}`key``, `{glue:md}`key``, and the glue directives.
GLUE_ROLE = re.compile(r"\{glue(?::\w+)?\}`([^`:]+)(?::[^`]*)?`")
GLUE_DIRECTIVE = re.compile(r"^\s*[`:]{3,}\{glue(?::\w+)?\}\s+(\S+)", re.MULTILINE)
GLUE_CALL = re.compile(r"\bglue\(\s*(f?)[\"']([^\"']+)[\"']")
# A decimal with a fractional part (2.8, 0.125) or a percentage (42%, 99.2 %), standing on its own.
BARE_NUMBER = re.compile(r"(?<![\w.,])(\d+(?:\.\d+)?\s?%|\d+\.\d+)(?![\w.]*\d)")
# The budget line states a measured wall time of the whole page, which is measured outside the notebook.
BUDGET_LINE = re.compile(r"^\*\*CPU budget:\*\*.*$", re.MULTILINE)
# Section numbers ("## 2.1 The table", "section 2.4") are labels, not quantities.
SECTION_NUMBER = re.compile(r"^#+\s+\d+(?:\.\d+)+|\b[Ss]ections?\s+\d+(?:\.\d+)+", re.MULTILINE)

# Decimals that the prose may share with an output because they are not computed results:
# (chapter stem, number) -> why.
EXEMPT = {
    ("03_attention", "0.3"): "a bandwidth the code chooses (an input of the cell, not a result)",
    ("03_attention", "1.5"): "a bandwidth the code chooses (an input of the cell, not a result)",
    ("03_attention", "0.05"): "a bandwidth the code chooses (an input of the cell, not a result)",
    ("02_embeddings", "0.75"): "word2vec's exponent for the context distribution, a published constant",
    ("04_position", "95%"): "an accuracy threshold the code chooses and prints in its label",
    ("04_position", "99%"): "an accuracy threshold the code chooses and prints in its label",
    ("06_lm_head", "0.5"): "q_t = 0.5, a probability the example starts from (an input)",
    ("06_lm_head", "88.7"): "an exponent either side of float32's overflow (ln max = 88.72) the cell tries",
    ("06_lm_head", "88.8"): "an exponent either side of float32's overflow (ln max = 88.72) the cell tries",
    ("10_real_model", "8.5"): "derived in the sentence itself from Q8_0's block layout, 34 * 8 / 32",
    ("07_kernels", "0.0"): "the `other=0.0` argument of tl.load, quoted code rather than a result",
    ("08_training", "0.1"): "the dropout rate the sweep sets (an input)",
    ("11_finetuning", "95%"): "the confidence level of the Wilson intervals, printed as a label",
}


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _markdown(notebook: dict) -> list[str]:
    return [_source(cell) for cell in notebook["cells"] if cell["cell_type"] == "markdown"]


def _code(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def used_keys(notebook: dict) -> set[str]:
    """The glue keys that the notebook's markdown refers to."""
    keys = set()
    for text in _markdown(notebook):
        keys.update(GLUE_ROLE.findall(text))
        keys.update(GLUE_DIRECTIVE.findall(text))
    return keys


def glued_in_code(notebook: dict) -> set[str]:
    """The keys that a `glue("key", ...)` call in the notebook's code produces (f-strings as patterns)."""
    return {key for cell in _code(notebook) for _, key in GLUE_CALL.findall(_source(cell))}


def _glued_patterns(notebook: dict) -> list[re.Pattern]:
    patterns = []
    for cell in _code(notebook):
        for is_fstring, key in GLUE_CALL.findall(_source(cell)):
            parts = re.split(r"\{[^}]*\}", key) if is_fstring else [key]
            patterns.append(re.compile(".+".join(re.escape(part) for part in parts) + "$"))
    return patterns


def not_glued_in_code(notebook: dict) -> set[str]:
    """Keys used in the prose that no glue call (a literal key, or an f-string key) can produce."""
    patterns = _glued_patterns(notebook)
    return {key for key in used_keys(notebook) if not any(pattern.match(key) for pattern in patterns)}


def glued_in_outputs(notebook: dict) -> set[str]:
    """The keys recorded in the saved outputs (myst-nb stores them as scrapbook metadata)."""
    keys = set()
    for cell in _code(notebook):
        for output in cell.get("outputs", []):
            scrapbook = output.get("metadata", {}).get("scrapbook")
            if scrapbook:
                keys.add(scrapbook["name"])
    return keys


def output_text(notebook: dict) -> str:
    """Everything the saved outputs print, as one string (streams and text/plain results)."""
    parts = []
    for cell in _code(notebook):
        for output in cell.get("outputs", []):
            if "text" in output:
                parts.append("".join(output["text"]))
            elif "text/plain" in output.get("data", {}) and "scrapbook" not in output.get("metadata", {}):
                parts.append("".join(output["data"]["text/plain"]))
    return "\n".join(parts)


def prose_numbers(notebook: dict) -> set[str]:
    """Bare decimals and percentages in the markdown, outside glue roles, section numbers, the budget line."""
    numbers = set()
    for text in _markdown(notebook):
        text = SECTION_NUMBER.sub("", BUDGET_LINE.sub("", GLUE_ROLE.sub("", text)))
        numbers.update(match.replace(" ", "") for match in BARE_NUMBER.findall(text))
    return numbers


def _ids(paths):
    return [path.stem for path in paths]


def test_chapters_are_found():
    assert len(CHAPTERS) >= 5, CHAPTERS


@pytest.mark.parametrize("path", CHAPTERS, ids=_ids(CHAPTERS))
def test_every_glue_key_in_the_prose_is_glued_by_the_notebooks_code(path):
    notebook = _load(path)
    missing = not_glued_in_code(notebook)
    assert not missing, f"{path.name}: the prose uses glue keys no glue(...) call produces: {sorted(missing)}"


@pytest.mark.parametrize("path", CHAPTERS, ids=_ids(CHAPTERS))
def test_every_glue_key_in_the_prose_is_in_the_saved_outputs(path):
    notebook = _load(path)
    missing = used_keys(notebook) - glued_in_outputs(notebook)
    assert not missing, (
        f"{path.name}: glue keys missing from the saved outputs (re-execute the notebook): {sorted(missing)}"
    )


@pytest.mark.parametrize("path", CHAPTERS, ids=_ids(CHAPTERS))
def test_glue_keys_carry_the_chapter_prefix(path):
    prefix = "ch" + path.stem.split("_")[0] + "_"
    wrong = sorted(key for key in glued_in_code(_load(path)) if not key.startswith(prefix))
    assert not wrong, f"{path.name}: glue keys should start with {prefix!r}: {wrong}"


def _decimals(number: str) -> int:
    return len(number.rstrip("%").strip().partition(".")[2])


def copied_numbers(prose: set[str], printed: set[str]) -> set[str]:
    """Prose numbers that an output prints, exactly or rounded to the prose's precision (2.9 for 2.894).

    A rounded match counts only for numbers with at least two significant digits, so that a quoted 0.5 or 2%
    is not matched against every output that happens to round to it.
    """
    values = {}
    for number in printed:
        values.setdefault(number.endswith("%"), set()).add(float(number.rstrip("%")))
    copied = set()
    for number in prose:
        is_percent = number.endswith("%")
        value, places = float(number.rstrip("%")), _decimals(number)
        significant = len(number.rstrip("%").replace(".", "").lstrip("0"))
        for candidate in values.get(is_percent, ()):
            if candidate == value or (significant >= 2 and round(candidate, places) == value):
                copied.add(number)
                break
    return copied


@pytest.mark.parametrize("path", CHAPTERS, ids=_ids(CHAPTERS))
def test_prose_quotes_no_bare_decimal_that_an_output_prints(path):
    notebook = _load(path)
    printed = {match.replace(" ", "") for match in BARE_NUMBER.findall(output_text(notebook))}
    copied = copied_numbers(prose_numbers(notebook), printed)
    copied = sorted(number for number in copied if (path.stem, number) not in EXEMPT)
    assert not copied, (
        f"{path.name}: the prose copies numbers that a cell prints; glue them instead "
        f"(from myst_nb import glue) or, if they are inputs rather than results, exempt them with a reason: "
        f"{copied}"
    )


def test_drift_detector_matches_exact_and_rounded_copies_only():
    printed = {"2.894", "41.9%", "0.519", "3.093"}
    assert copied_numbers({"2.9", "41.9%", "0.5", "3.093", "7.5"}, printed) == {"2.9", "41.9%", "3.093"}


def test_number_pattern_finds_decimals_ratios_and_percentages_but_not_versions():
    text = "about 2.8 bits, 42% and 99.5 % of 1,024 tokens, 3.9x; Python 3.11.2, v1.2.3"
    found = set(BARE_NUMBER.findall(text))
    assert found == {"2.8", "42%", "99.5 %", "3.9"}


def test_glue_calls_with_fstring_keys_cover_the_keys_they_can_produce():
    code = ["for p in runs:\n", '    glue(f"ch04_final_{p}", 1.0)\n', 'glue("ch04_x", 2)']
    prose = ["{glue:text}`ch04_final_rope:.0%`, {glue}`ch04_x`, {glue}`ch04_y`"]
    notebook = {"cells": [{"cell_type": "code", "source": code}, {"cell_type": "markdown", "source": prose}]}
    assert not_glued_in_code(notebook) == {"ch04_y"}


def test_section_numbers_are_not_quantities():
    prose = ["## 2.1 The table\n", "see section 2.4, or 2.5 s"]
    notebook = {"cells": [{"cell_type": "markdown", "source": prose}]}
    assert prose_numbers(notebook) == {"2.5"}


def test_glue_role_pattern_reads_keys_with_and_without_a_format():
    text = "{glue:text}`ch03_gqa_saving:.1f` and {glue}`ch00_loss` and {glue:any}`ch01_ratio`"
    assert GLUE_ROLE.findall(text) == ["ch03_gqa_saving", "ch00_loss", "ch01_ratio"]

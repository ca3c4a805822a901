"""Static checks that the chapters' prose quotes its numbers from the executed outputs (myst-nb glue).

Nothing is executed: the tests read the saved notebooks. A `{glue}` role whose key no cell glues, or whose
key is missing from the saved outputs, would render as an error (or a stale value) on the website; a bare
decimal in the prose that also appears in an output is a copy of a computed number that can drift.
"""

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
# (notebook, phrase) -> why a number or comparison in that sentence is a definition, not a measurement.
ALLOW_FILE = ROOT / "tests" / "glue_allow.toml"

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


def _name(path: Path) -> str:
    """The allow-list's name of a notebook: `03_attention` (a chapter) or `exercises/03_attention`."""
    return path.stem if path.parent.name == "chapters" else f"{path.parent.name}/{path.stem}"


def load_allowed(text: str) -> list[dict]:
    """The allow-list's entries ({notebook, phrase, reason}); each must say why it is no measurement."""
    entries = tomllib.loads(text).get("allow", [])
    for entry in entries:
        missing = {"notebook", "phrase", "reason"} - {
            key for key, value in entry.items() if str(value).strip()
        }
        if missing:
            raise ValueError(f"{ALLOW_FILE.name}: entry {entry} lacks {sorted(missing)}")
    return entries


ALLOWED = load_allowed(ALLOW_FILE.read_text(encoding="utf-8"))

GLUED = "\u27e8glued\u27e9"  # stands for a glue role while the sentence is checked
FENCE = re.compile(r"^(`{3,}|:{3,}).*?^\1\s*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK_TARGET = re.compile(r"\]\([^)\s]*\)")
HTML_TAG = re.compile(r"<[^>\n]*>")
MATH = re.compile(r"\$[^$]+\$")
# A new unit starts at a heading, a list item, a table row, a quote or a blank line.
BLOCK_START = re.compile(r"\n(?=\s*(?:#|[-*+]\s|\d+\.\s|\||>))|\n\s*\n")
SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+(?=[A-Z(\"'*_\u27e8])")

# Numbers a sentence can copy from an output: a decimal, a percentage, or an integer of 3+ digits (1,049,984).
NUMBER = re.compile(
    r"(?<![\w.,/^_+-])(\d+(?:\.\d+)?\s?%|\d+\.\d+|\d{1,3}(?:[, \u00a0\u202f]\d{3})+(?!\d)|\d{3,})"
    r"(?![\w.]*\d)(?![A-Za-z])"
)
_COUNT = r"(?:\d[\d,.]*|a|one|two|three|four|five|six|seven|eight|nine|ten|a few|several|many|hundreds?)"
# Quantitative comparisons, in digits or in words.
COMPARISON = re.compile(
    "|".join(
        [
            rf"\b{_COUNT}\s+times\s+(?:as|more|less|fewer|larger|smaller|bigger|faster|slower|longer|shorter|"
            r"higher|lower|the|its|their|that|this|what)\b",
            r"\b\d[\d.]*\s?[x×](?!\s*\d)(?![\w])",
            r"\b(?:\w+|\d+)-fold\b",
            r"\b(?:twice|thrice)\s+(?:as|the|that|this|its|their|a|an|more|less|fewer|faster|slower|larger|"
            r"smaller|longer|shorter)\b",
            r"\b(?:half\s+(?:the|as)|(?:halves|doubles|triples|quadruples)\s+(?:the|its|their))\b",
            r"\b(?:faster|slower|fewer|more|less|larger|smaller|bigger|cheaper|higher|lower|better|worse|"
            r"longer|shorter)\s+than\b",
            r"\b(?:under|over|below|above|nearly|almost|at\s+least|at\s+most)\s+(?:a|one)\s+"
            r"(?:hundred|thousand|million|billion)\b",
            r"\bthe\s+same\s+(?:number|amount|size|loss|speed|cost|accuracy)\s+(?:of|as)\b",
            r"\bas\s+(?:many|much|fast|large|small|good|accurate)\s+as\b",
            r"\d\s?%\s+(?:faster|slower|fewer|more|less|smaller|larger|better|worse|higher|lower|cheaper)\b",
            r"\borders?\s+of\s+magnitude\b",
        ]
    ),
    re.IGNORECASE,
)
# A line of output that is only a verdict: `True`, `False`, `by hand == package: False`, `tensor(True)`.
VERDICT = re.compile(r"^(?:.*(?:[:=]|==|\bis)\s*)?(?:tensor\()?(True|False)\)?\s*$")
# A check within a tolerance, whose verdict hides how close it came (an exact `torch.equal` may print a bool).
APPROXIMATE = re.compile(
    r"allclose|isclose|assert_close|<=?\s*[\d.]*e-\d+|<=?\s*(?:tol|atol|rtol|tolerance)\b"
)


def sentences(markdown: str) -> list[str]:
    """The prose's sentences, one per string: glue roles as a marker, code, link targets and tags removed."""
    text = BUDGET_LINE.sub("", markdown)
    text = GLUE_ROLE.sub(GLUED, FENCE.sub("", text))
    text = SECTION_NUMBER.sub("", HTML_TAG.sub(" ", LINK_TARGET.sub("]", INLINE_CODE.sub("", text))))
    found = []
    for block in BLOCK_START.split(text):
        block = " ".join(block.split())
        found += [sentence for sentence in SENTENCE_END.split(block) if sentence.strip()]
    return found


def _normal(number: str) -> str:
    return re.sub(r"[\s,]", "", number)


def _decimals(number: str) -> int:
    return len(number.rstrip("%").partition(".")[2])


def copied_numbers(prose: set[str], printed: set[str]) -> set[str]:
    """Prose numbers that an output prints, exactly or rounded to the prose's precision (2.9 for 2.894).

    Numbers are compared after dropping thousands separators (1,049,984 is 1049984). A rounded match counts
    only for decimals with at least two significant digits, so that a quoted 0.5 or 2% is not matched
    against every output that happens to round to it, and an integer matches only exactly.
    """
    values: dict[bool, set[float]] = {}
    for number in map(_normal, printed):
        values.setdefault(number.endswith("%"), set()).add(float(number.rstrip("%")))
    copied = set()
    for number in prose:
        plain = _normal(number)
        is_percent = plain.endswith("%")
        value, places = float(plain.rstrip("%")), _decimals(plain)
        significant = len(plain.rstrip("%").replace(".", "").lstrip("0"))
        rounded_ok = significant >= 2 and (places > 0 or is_percent)
        for candidate in values.get(is_percent, ()):
            if candidate == value or (rounded_ok and round(candidate, places) == value):
                copied.add(number)
                break
    return copied


def _allowed(notebook: str, sentence: str, number: str | None = None) -> bool:
    return any(
        entry["notebook"] == notebook
        and entry["phrase"] in sentence
        and (number is None or number.replace(" ", "") in entry["phrase"].replace(" ", ""))
        for entry in ALLOWED
    )


def unglued_numbers(notebook: dict, name: str) -> list[tuple[str, str]]:
    """(number, sentence) for each number the prose states outside a glue role that an output prints."""
    printed = set(NUMBER.findall(output_text(notebook)))
    problems = []
    for text in _markdown(notebook):
        for sentence in sentences(text):
            numbers = set(NUMBER.findall(sentence))
            for number in sorted(copied_numbers(numbers, printed)):
                if not _allowed(name, sentence, number):
                    problems.append((number, sentence))
    return problems


def unbacked_comparisons(notebook: dict, name: str) -> list[tuple[str, str]]:
    """(comparison, sentence) for each quantitative comparison in a sentence with no glue role."""
    problems = []
    for text in _markdown(notebook):
        for sentence in sentences(text):
            match = COMPARISON.search(MATH.sub("", sentence))  # $\sin 2x$ is no ratio
            if match and GLUED not in sentence and not _allowed(name, sentence):
                problems.append((match.group(0), sentence))
    return problems


def verdict_lines(notebook: dict, name: str) -> list[str]:
    """Output lines stating a check's result as a bare True/False, not as a difference and a tolerance."""
    lines = []
    for cell in _code(notebook):
        if not APPROXIMATE.search(_source(cell)):
            continue
        for output in cell.get("outputs", []):
            text = output.get("text") or output.get("data", {}).get("text/plain", "")
            for line in "".join(text).splitlines():
                if VERDICT.match(line.strip()) and not _allowed(name, line):
                    lines.append(line.strip())
    return lines


NOTEBOOKS = CHAPTERS + sorted((ROOT / "exercises").glob("*.ipynb"))
HOW = (
    "glue the value from the cell that computes it (`from myst_nb import glue; glue('chNN_key', value)` and "
    "{glue:text}`chNN_key` in the sentence), reword the sentence so it claims no number or comparison the "
    "page does not compute, or, for a definition rather than a measurement, add an entry to "
    f"tests/{ALLOW_FILE.name} with its reason"
)


def _report(name: str, kind: str, found: list[tuple[str, str]]) -> str:
    listed = "\n".join(f"  - {phrase!r} in: {sentence}" for phrase, sentence in found)
    return f"{name}: {kind}:\n{listed}\nTo fix: {HOW}."


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[_name(p) for p in NOTEBOOKS])
def test_prose_quotes_no_number_that_an_output_prints_unglued(path):
    name = _name(path)
    found = unglued_numbers(_load(path), name)
    assert not found, _report(name, "the prose copies numbers that a cell prints", found)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[_name(p) for p in NOTEBOOKS])
def test_every_quantitative_comparison_sits_beside_a_glued_value(path):
    name = _name(path)
    found = unbacked_comparisons(_load(path), name)
    assert not found, _report(name, "comparisons with no glued value in the sentence", found)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[_name(p) for p in NOTEBOOKS])
def test_derivation_checks_print_a_difference_not_a_bare_verdict(path):
    name = _name(path)
    found = verdict_lines(_load(path), name)
    assert not found, (
        f"{name}: outputs that state a check as a bare True/False: {found}. Print the measured difference "
        f"against a stated tolerance instead (f'max |a - b| = {{d:.1e}} (tolerance 1e-5)'), or allow-list a "
        f"line that is not a check in tests/{ALLOW_FILE.name} with its reason."
    )


def test_every_allow_list_entry_is_used():
    pages = {_name(path): _load(path) for path in NOTEBOOKS}
    unused = []
    for entry in ALLOWED:
        notebook = pages.get(entry["notebook"])
        if notebook is None:
            unused.append((entry["notebook"], entry["phrase"]))
            continue
        texts = [sentence for text in _markdown(notebook) for sentence in sentences(text)]
        texts += output_text(notebook).splitlines()
        if not any(entry["phrase"] in text for text in texts):
            unused.append((entry["notebook"], entry["phrase"]))
    assert not unused, f"allow-list entries in tests/{ALLOW_FILE.name} that match no text any more: {unused}"


@pytest.mark.parametrize(
    "sentence",
    [
        "The model has 1,049,984 parameters.",
        "The model has 1 049 984 parameters.",
        "A GELU MLP with the same number of parameters trains slower.",
        "Muon needs 4× AdamW's learning rate.",
        "The kernel is 3.2x faster.",
        "The cache is twice as large in float32.",
        "It takes half the memory.",
        "The vocabulary is under a million entries.",
        "Flash attention is faster than the naive loop.",
        "The sparse model uses fewer than a third of the weights.",
        "Grouped queries cut the cache four times over, a 4-fold saving.",
        "The loss is three times the baseline's.",
        "Fusing makes it 30% faster, an order of magnitude at length.",
    ],
)
def test_number_test_fails_on_unglued_numbers_and_comparisons(sentence):
    notebook = _fake(sentence, printed="parameters: 1049984\n")
    assert unglued_numbers(notebook, "99_fake") or unbacked_comparisons(notebook, "99_fake")


@pytest.mark.parametrize(
    "sentence",
    [
        "The model has {glue:text}`ch99_params:,` parameters.",
        "Flash attention is {glue:text}`ch99_speedup:.1f` times faster than the naive loop.",
        "A block of 32 weights shares one scale.",
        "Chapter 10 loads the file; see section 2.4.",
        "The run repeats the step 3 times in a row.",
        "The pair occurs once or twice; the package has the algorithm twice.",
        "It runs on the static page as well as in a notebook.",
        "Which half of LayerNorm does the work? The order of the halves is a convention.",
        "The schedule follows half a cosine over 8 × 8 tiles.",
        "Three people joined by U+200D characters.",
        "Contexts of 8k-128k tokens, 1049984e-3.",
        "We train for 200 steps.",
        "**CPU budget:** about 3 minutes on 2 cores, faster than reading it.",
        "Compare `n_layers=1049984` in code.",
        "Our data: samples of $f(x) = \\sin 2x + x/2$.",
    ],
)
def test_number_test_passes_glued_values_definitions_and_unprinted_numbers(sentence):
    notebook = _fake(sentence, printed="parameters: 1049984\n")
    assert unglued_numbers(notebook, "99_fake") == []
    assert unbacked_comparisons(notebook, "99_fake") == []


def _fake(markdown: str, printed: str) -> dict:
    return {
        "cells": [
            {"cell_type": "markdown", "source": [markdown]},
            {
                "cell_type": "code",
                "source": ["print(1)"],
                "outputs": [{"output_type": "stream", "text": [printed]}],
            },
        ]
    }


def test_the_allow_list_excuses_only_its_own_notebook_and_phrase():
    entry = {"notebook": "99_fake", "phrase": "twice the context", "reason": "a configuration change"}
    ALLOWED.append(entry)
    try:
        notebook = _fake("Doubling gives twice the context. The model is twice as slow.", printed="")
        assert [phrase for phrase, _ in unbacked_comparisons(notebook, "99_fake")] == ["twice as"]
        assert len(unbacked_comparisons(notebook, "98_other")) == 2
    finally:
        ALLOWED.remove(entry)


def test_an_allow_list_entry_without_a_reason_is_refused():
    with pytest.raises(ValueError, match="reason"):
        load_allowed('[[allow]]\nnotebook = "03_attention"\nphrase = "twice"\nreason = ""\n')


@pytest.mark.parametrize(
    ("line", "verdict"),
    [
        ("by hand == llmbook.optim.AdamW: False", True),
        ("True", True),
        ("tensor(True)", True),
        ("matches the package: True", True),
        ("max |by hand - package| = 3.1e-07 (tolerance 1e-05)", False),
        ("True positives: 12", False),
    ],
)
def test_a_bare_true_or_false_from_a_tolerance_check_is_a_verdict(line, verdict):
    notebook = _printing("print('check:', torch.allclose(a, b, atol=1e-6))", line)
    assert bool(verdict_lines(notebook, "99_fake")) is verdict


@pytest.mark.parametrize("source", ["print(torch.equal(a, b))", "print(decode(ids) == text)"])
def test_an_exact_check_may_print_true_or_false(source):
    assert verdict_lines(_printing(source, "True"), "99_fake") == []


def _printing(source: str, line: str) -> dict:
    output = {"output_type": "stream", "text": [line]}
    return {"cells": [{"cell_type": "code", "source": [source], "outputs": [output]}]}


def test_sentences_split_prose_but_not_decimals_or_abbreviations():
    text = (
        "The loss is 2.8 nats, e.g. after training. It falls.\n\n- a list item\n- another\n\n## 3 Heading\n"
    )
    assert sentences(text) == [
        "The loss is 2.8 nats, e.g. after training.",
        "It falls.",
        "- a list item",
        "- another",
        "## 3 Heading",
    ]


def test_drift_detector_matches_exact_and_rounded_copies_only():
    printed = {"2.894", "41.9%", "0.519", "3.093", "1049984", "918656.0"}
    prose = {"2.9", "41.9%", "0.5", "3.093", "7.5", "1,049,984", "918,656", "1,050,000"}
    assert copied_numbers(prose, printed) == {"2.9", "41.9%", "3.093", "1,049,984", "918,656"}


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

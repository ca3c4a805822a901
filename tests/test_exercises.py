"""The exercise mechanism: references pass, wrong answers fail readably, templates fail without crashing."""

import json
import re
from pathlib import Path

import pytest
import torch

from llmbook.exercises import all_exercises, run_check
from llmbook.exercises.core import FAIL_MARK, PASS_MARK, compare

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted(
    p for p in (ROOT / "exercises").glob("[0-9][0-9]_*.ipynb") if not p.stem.endswith("_solution")
)
EXERCISES = all_exercises()
CHECK_CALL = re.compile(r"""check\(\s*["'](\d\d\.\w+)["']""")


def _code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def _checked_names(path: Path) -> list[str]:
    return [m for c in _code_cells(path) for m in CHECK_CALL.findall("".join(c["source"]))]


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda e: e.name)
def test_reference_solution_passes_every_case(ex):
    result = run_check(ex.name, ex.reference)
    assert result.passed, result.message
    assert result.message.startswith(PASS_MARK)


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda e: e.name)
def test_every_exercise_has_several_cases(ex):
    assert len(ex.cases()) >= 2, f"{ex.name} should test more than one input (edge cases included)"


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda e: e.name)
def test_a_stub_is_reported_as_not_implemented(ex):
    def stub(*args, **kwargs):
        raise NotImplementedError

    result = run_check(ex.name, stub)
    assert not result.passed and "not implemented yet" in result.message and ex.hint in result.message


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda e: e.name)
def test_a_wrong_answer_fails_with_input_expected_and_actual(ex):
    result = run_check(ex.name, lambda *args, **kwargs: object())
    assert not result.passed
    assert result.message.startswith(FAIL_MARK)
    for label in ("input:", "expected:", "got:", "hint:"):
        assert label in result.message, f"missing {label!r} in:\n{result.message}"


def test_a_crash_in_the_readers_code_is_reported_not_raised():
    def broken(table, ids):
        return table[ids] / undefined_name  # noqa: F821

    result = run_check("00.embedding_lookup", broken)
    assert not result.passed and "NameError" in result.message and "input:" in result.message


def test_in_place_edits_by_the_reader_do_not_change_later_cases():
    def vandal(table, ids):
        out = table[ids].clone()
        table.zero_()
        return out

    assert run_check("00.embedding_lookup", vandal).passed


def test_unknown_names_get_a_helpful_error():
    with pytest.raises(ValueError, match="00.embedding_lookup"):
        run_check("00.no_such_exercise", lambda: None)
    with pytest.raises(ValueError, match="chapter number"):
        run_check("embedding_lookup", lambda: None)


@pytest.mark.parametrize(
    ("expected", "actual", "fragment"),
    [
        (torch.zeros(2, 3), torch.zeros(3, 2), "shape differs"),
        (torch.zeros(2), torch.tensor([0.0, 1e-3]), "first at index (1,)"),
        (torch.tensor([1, 2]), torch.tensor([1.0, 2.0]), "dtype differs"),
        ([1, 2, 3], [1, 2], "length differs"),
        ({"a": 1}, {"b": 1}, "keys differ"),
        (1.0, 1.1, "values differ"),
        (b"ab", "ab", "values differ"),
    ],
)
def test_compare_names_the_first_difference(expected, actual, fragment):
    assert fragment in compare(expected, actual)


def test_compare_accepts_equal_values_including_nan():
    nan_tensor = torch.tensor([float("nan"), 1.0])
    assert compare(nan_tensor, nan_tensor.clone()) is None
    assert compare([torch.ones(2), 3], (torch.ones(2), 3)) is None


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_template_and_solution_check_the_same_exercises(template):
    solution = template.with_name(template.stem + "_solution.ipynb")
    assert solution.is_file(), f"{template.name} has no solution notebook beside it"
    names = _checked_names(template)
    assert names, f"{template.name} calls no check()"
    assert names == _checked_names(solution)
    assert len(set(names)) >= 2
    assert not any(c.get("outputs") for c in _code_cells(template)), "templates are committed without outputs"


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_unsolved_template_runs_and_fails_every_check_readably(template):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(template, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(template.parent)}}
    ).execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert not errors, f"{template.name} crashed: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    text = "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "stream"
    )
    for name in _checked_names(template):
        assert f"{FAIL_MARK} {name}:" in text, (
            f"check of {name} did not print a failure in the unsolved template"
        )
    assert PASS_MARK not in text, "an unsolved template must not pass any check"

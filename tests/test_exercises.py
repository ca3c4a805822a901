"""The exercise mechanism: references pass, wrong answers fail readably, templates fail without crashing."""

import json
import re
import time
from pathlib import Path

import pytest
import torch

from llmbook.exercises import all_exercises, run_check
from llmbook.exercises.core import FAIL_MARK, KINDS, PASS_MARK, get_exercise

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted(
    p for p in (ROOT / "exercises").glob("[0-9][0-9]_*.ipynb") if not p.stem.endswith("_solution")
)
EXERCISES = all_exercises()
FUNCTION_EXERCISES = [ex for ex in EXERCISES if not ex.takes_value]
VALUE_EXERCISES = [ex for ex in EXERCISES if ex.takes_value]
CHECK_CALL = re.compile(r"""check\(\s*["'](\d\d\.\w+)["']""")


def _code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def _checked_names(path: Path) -> list[str]:
    return [m for c in _code_cells(path) for m in CHECK_CALL.findall("".join(c["source"]))]


def _answer(ex):
    """The reference answer in the form a reader hands it in: a value for predict/experiment."""
    return ex.reference() if ex.takes_value else ex.reference


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda e: e.name)
def test_reference_solution_passes_every_shown_and_hidden_case(ex):
    for seed in (0, 1):
        result = run_check(ex.name, _answer(ex), seed=seed, watch_calls=False)
        assert result.passed, result.message
        assert result.message.startswith(PASS_MARK) and result.status == "pass"


@pytest.mark.parametrize("ex", FUNCTION_EXERCISES, ids=lambda e: e.name)
def test_every_exercise_has_several_cases_and_hidden_ones(ex):
    assert len(ex.cases()) >= 2, f"{ex.name} should test more than one input (edge cases included)"
    assert ex.hidden_cases(seed=3), f"{ex.name} has no hidden cases"


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda e: e.name)
def test_every_exercise_has_a_kind_and_progressive_hints(ex):
    assert ex.kind in KINDS
    assert len(ex.hints) >= 2, f"{ex.name} needs at least two hints, the second stronger"


@pytest.mark.parametrize("ex", FUNCTION_EXERCISES, ids=lambda e: e.name)
def test_a_stub_is_reported_as_not_answered(ex):
    def stub(*args, **kwargs):
        raise NotImplementedError

    result = run_check(ex.name, stub)
    assert not result.passed and "not answered yet" in result.message and ex.hint in result.message


@pytest.mark.parametrize("ex", VALUE_EXERCISES, ids=lambda e: e.name)
def test_an_unanswered_prediction_is_reported_as_not_answered(ex):
    result = run_check(ex.name, ...)
    assert not result.passed and "not answered yet" in result.message and "replace `...`" in result.message


@pytest.mark.parametrize("ex", VALUE_EXERCISES, ids=lambda e: e.name)
def test_a_wrong_prediction_says_too_high_or_too_low_but_not_the_measured_value(ex):
    # The verdict is exactly "your answer X is <direction and rough factor> (<the question's note>)".
    from llmbook.exercises.compare import describe_miss, show_number

    measured, note = ex.reference(), ex.cases()[0].note
    for wrong, direction in (
        (type(measured)(measured * 3 + 7), "too high"),
        (type(measured)(measured / 50), "too low"),
    ):
        result = run_check(ex.name, wrong)
        miss = describe_miss(measured, wrong)
        assert miss.startswith(direction)
        verdict = f"{FAIL_MARK} {ex.name}: your answer {show_number(wrong)} is {miss} ({note})"
        assert not result.passed and result.message.splitlines()[0] == verdict, result.message
        assert "expected" not in result.message and "got:" not in result.message


@pytest.mark.parametrize(
    ("expected", "actual", "words"),
    [
        (64.0, 8.0, "too low, by a factor of about 8"),
        (64.0, 70.0, "slightly too high (off by less than 10%)"),
        (64.0, 100.0, "too high, by less than a factor of 2"),
        (64.0, 640.0, "too high, by about 10 times"),
        (64.0, 0.0064, "too low, by about 10^4 times (4 orders of magnitude)"),
        (64.0, -64.0, "of the wrong sign"),
        (64.0, float("nan"), "not a finite number"),
        (0.0, 1.0, "too high"),
    ],
)
def test_a_miss_is_described_by_direction_and_rough_factor(expected, actual, words):
    from llmbook.exercises.compare import describe_miss

    assert describe_miss(expected, actual) == words


def test_check_counts_the_attempts_at_a_prediction(capsys, monkeypatch):
    from llmbook.exercises import check, checker

    monkeypatch.setattr(checker, "_ATTEMPTS", {})
    monkeypatch.setattr(checker, "_grade_note_shown", True)
    for _ in range(3):
        check("03.predict_qk_variance", 8.0)
    check("03.predict_qk_variance", ...)  # not an attempt
    out = capsys.readouterr().out
    assert "(attempt 1)" in out and "(attempt 3)" in out and "(attempt 4)" not in out
    assert checker.attempts() == {"03.predict_qk_variance": 3}


def test_check_says_once_per_session_that_the_grade_comes_from_the_grader(capsys, monkeypatch):
    from llmbook.exercises import check, checker

    monkeypatch.setattr(checker, "_grade_note_shown", False)
    check("03.predict_qk_variance", 64.0)
    check("03.predict_qk_variance", 64.0)
    out = capsys.readouterr().out
    assert out.count("python -m llmbook grade") == 1 and out.startswith(PASS_MARK), out


def test_an_exercise_whose_cases_come_out_empty_is_an_error_not_a_pass(monkeypatch):
    from llmbook.exercises import core

    monkeypatch.setitem(
        core._REGISTRY,
        "98.no_cases",
        core.Exercise("98.no_cases", lambda: iter(()), abs, ("h",), hidden=None),
    )
    result = run_check("98.no_cases", abs)
    assert not result.passed and result.status == "error" and result.n_cases == 0
    assert "no cases for this exercise" in result.message and PASS_MARK not in result.message


@pytest.mark.parametrize("ex", FUNCTION_EXERCISES, ids=lambda e: e.name)
def test_a_wrong_answer_fails_with_input_expected_and_actual(ex):
    result = run_check(ex.name, lambda *args, **kwargs: object())
    assert not result.passed
    assert result.message.startswith(FAIL_MARK)
    for label in ("input:", "expected:", "got:", "hint:"):
        assert label in result.message, f"missing {label!r} in:\n{result.message}"


def _shown_cell(ex) -> list[str]:
    """The lines of the template cell defining the function a debug exercise's check grades."""
    template = next(t for t in TEMPLATES if t.name.startswith(ex.name[:2]))
    cells = ["".join(c["source"]) for c in _code_cells(template)]
    call = re.compile(rf"""check\(\s*["']{re.escape(ex.name)}["']\s*,\s*(\w+)""")
    function = next(m.group(1) for c in cells for m in [call.search(c)] if m)
    return next(c for c in cells if f"def {function}(" in c).splitlines()


@pytest.mark.parametrize("ex", [e for e in EXERCISES if e.kind == "debug"], ids=lambda e: e.name)
def test_strongest_hint_of_a_debug_exercise_points_at_lines_of_the_shown_code(ex):
    strongest, cell = ex.hints[-1], _shown_cell(ex)
    numbers = [
        int(n)
        for m in re.finditer(r"lines? (\d+)(?: (?:and|to) (\d+))?", strongest, re.I)
        for n in m.groups()
        if n
    ]
    assert numbers, f"{ex.name}: the strongest hint names no line: {strongest}"
    assert all(3 <= n <= len(cell) for n in numbers), (
        f"{ex.name}: lines {numbers} are not code lines of the cell"
    )
    # Code in backticks is quoted from the broken function: the hint points at it, it does not write the fix.
    for quoted in re.findall(r"`([^`]+)`", strongest):
        assert quoted in "\n".join(cell), f"{ex.name}: `{quoted}` is not in the code the notebook shows"
    assert "return " not in strongest, f"{ex.name}: the strongest hint spells out code: {strongest}"


@pytest.mark.parametrize("ex", [e for e in EXERCISES if e.kind == "debug"], ids=lambda e: e.name)
def test_the_broken_function_of_a_debug_exercise_fails(ex):
    result = run_check(ex.name, ex.broken, seed=0)
    assert not result.passed and result.status == "fail", result.message


def test_every_chapter_has_at_least_two_exercises_of_the_new_kinds():
    chapters = {t.name[:2] for t in TEMPLATES}
    for chapter in chapters:
        new = [e.name for e in EXERCISES if e.name.startswith(chapter + ".") and e.kind != "implement"]
        assert len(new) >= 2, f"chapter {chapter} has only {new} beyond re-implementation"


# ---------------------------------------------------------------------------------------------------
# Every way the checker used to be fooled, now caught.


@pytest.mark.parametrize("ex", FUNCTION_EXERCISES, ids=lambda e: e.name)
def test_hard_coding_the_shown_cases_fails_on_the_hidden_ones(ex):
    from llmbook.exercises import compare

    shown = ex.cases()

    def memoriser(*args, **kwargs):
        for case in shown:
            if compare(case.args, args, 0, 0) is None and compare(case.kwargs, kwargs, 0, 0) is None:
                return case.expected
        return shown[0].expected

    result = run_check(ex.name, memoriser, seed=5)
    assert not result.passed and "hidden case" in result.message, result.message


def test_an_answer_that_changes_its_input_fails_and_names_the_input():
    def vandal(table, ids):
        out = table[ids].clone()
        table.zero_()
        return out

    result = run_check("00.embedding_lookup", vandal)
    assert not result.passed and "changed its input `table` in place" in result.message


def test_an_integer_question_rejects_a_float_and_accepts_numpy_integers():
    import numpy as np

    from llmbook.exercises import compare
    from llmbook.ffn import swiglu_hidden_dim

    assert "expected an integer" in compare(13824, 13825.0)
    assert "expected an integer" in compare(13824, 13824.0)
    assert compare(13824, np.int64(13824)) is None
    floats = run_check("05.swiglu_hidden_dim", lambda d, m: float(swiglu_hidden_dim(d, m)), watch_calls=False)
    assert not floats.passed and "expected an integer" in floats.message
    numpy_ints = run_check(
        "05.swiglu_hidden_dim", lambda d, m: np.int64(swiglu_hidden_dim(d, m)), watch_calls=False
    )
    assert numpy_ints.passed, numpy_ints.message


@pytest.mark.parametrize(
    ("expected", "actual", "fragment"),
    [
        (torch.zeros(2, 3), torch.zeros(3, 2), "shape differs"),
        (torch.zeros(2), torch.tensor([0.0, 1e-3]), "first at index (1,)"),
        (torch.tensor([1, 2]), torch.tensor([1.0, 2.0]), "dtype differs"),
        (torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64), "dtype differs"),
        (torch.tensor([1.0]), torch.tensor([1.0 + 0j]), "dtype differs"),
        (torch.tensor([255], dtype=torch.uint8), torch.tensor([-1]), "dtype differs"),
        (torch.tensor([-1]), torch.tensor([255], dtype=torch.uint8), "dtype differs"),
        (1.0, 1.0 + 0j, "complex"),
        (torch.zeros(2), [0.0, 0.0], "expected a torch.Tensor"),
        ([1, 2, 3], [1, 2], "length differs"),
        ({"a": 1}, {"b": 1}, "keys differ"),
        (1.0, 1.1, "values differ"),
        (b"ab", "ab", "expected a bytes"),
        (5, True, "expected a number"),
    ],
)
def test_compare_is_strict_and_names_the_first_difference(expected, actual, fragment):
    from llmbook.exercises import compare

    assert fragment in compare(expected, actual)


def test_compare_accepts_equal_values_including_nan():
    from llmbook.exercises import compare

    nan_tensor = torch.tensor([float("nan"), 1.0])
    assert compare(nan_tensor, nan_tensor.clone()) is None
    assert compare([torch.ones(2), 3], (torch.ones(2), 3)) is None


def test_an_endless_loop_is_stopped_by_the_time_limit():
    def endless(table, ids):
        while True:
            try:
                sum(range(1000))
            except Exception:  # a reader's broad except must not swallow the time limit
                pass

    start = time.perf_counter()
    result = run_check("00.embedding_lookup", endless, time_limit=0.5)
    assert time.perf_counter() - start < 10
    assert not result.passed and result.status == "error" and "time limit of 0.5 s" in result.message


class _Hostile:
    def __repr__(self):
        raise RuntimeError("repr exploded")

    def __eq__(self, other):
        raise RuntimeError("eq exploded")


class _BadMessage(Exception):
    def __str__(self):
        raise RuntimeError("str exploded")


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (lambda table, ids: _Hostile(), "repr raised RuntimeError"),
        (lambda table, ids: table[ids] / undefined_name, "NameError"),  # noqa: F821
        (lambda table, ids: (_ for _ in ()).throw(_BadMessage()), "_BadMessage"),
        (lambda table, ids: exit(3), "SystemExit"),
    ],
)
def test_failures_inside_the_readers_code_or_object_are_reported_not_raised(answer, fragment):
    result = run_check("00.embedding_lookup", answer)
    assert not result.passed and fragment in result.message, result.message


def test_an_answer_whose_equality_raises_is_reported_not_raised():
    result = run_check("01.utf8_encode", lambda cp: _Hostile())
    assert not result.passed and "repr raised" in result.message


def test_calling_the_package_function_you_are_asked_to_write_is_reported():
    from llmbook.attention import scaled_dot_product_attention as imported_under_another_name

    result = run_check(
        "03.scaled_dot_product", lambda q, k, v, mask=None: imported_under_another_name(q, k, v, mask)
    )
    assert not result.passed
    assert "you called llmbook.attention.scaled_dot_product_attention; write it yourself" in result.message
    method = run_check("06.stable_softmax", lambda logits: logits.softmax(-1))
    assert not method.passed and "you called torch.Tensor.softmax" in method.message


def test_hidden_cases_change_with_the_seed_and_repeat_with_it():
    ex = get_exercise("03.causal_mask")
    first, again, other = (ex.hidden_cases(seed) for seed in (1, 1, 2))
    assert [c.args for c in first] == [c.args for c in again]
    assert [c.args for c in first] != [c.args for c in other]


def test_unknown_names_get_a_helpful_error():
    with pytest.raises(ValueError, match="00.embedding_lookup"):
        run_check("00.no_such_exercise", lambda: None)
    with pytest.raises(ValueError, match="chapter number"):
        run_check("embedding_lookup", lambda: None)


def test_hints_get_stronger_with_each_call_and_stop_at_the_last():
    from llmbook.exercises.core import next_hint

    ex = get_exercise("03.masked_softmax")
    shown = [next_hint(ex.name) for _ in range(len(ex.hints) + 1)]
    assert shown[0].startswith(f"hint 1 of {len(ex.hints)}") and ex.hints[0] in shown[0]
    assert ex.hints[1] in shown[1] and ex.hints[1] not in shown[0]
    assert "strongest hint" in shown[-1] and ex.hints[-1] in shown[-1]


# ---------------------------------------------------------------------------------------------------
# The notebooks


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
def test_solution_notebook_shows_every_check_passing(template):
    solution = template.with_name(template.stem + "_solution.ipynb")
    text = "".join("".join(o.get("text", "")) for c in _code_cells(solution) for o in c.get("outputs", []))
    for name in _checked_names(solution):
        assert f"{PASS_MARK} {name}:" in text, (
            f"{solution.name}: the saved output does not show {name} passing"
        )
    assert FAIL_MARK not in text


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


def test_a_bug_in_an_exercises_own_cases_is_reported_as_the_checkers(monkeypatch):
    from llmbook.exercises import core

    def cases():
        raise RuntimeError("a broken case generator")
        yield

    monkeypatch.setitem(
        core._REGISTRY, "98.broken_cases", core.Exercise("98.broken_cases", cases, abs, ("h",))
    )
    result = run_check("98.broken_cases", abs)
    assert not result.passed and result.status == "error" and "bug in llmbook's exercise" in result.message


def test_grading_leaves_the_readers_random_state_alone():
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    run_check("03.multi_head", lambda *args: None)  # building its cases initialises nn.Linear layers
    assert torch.equal(torch.rand(3), before)

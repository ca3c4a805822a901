"""`python -m llmbook grade`: solutions pass, blanks fail, and one bad notebook costs only its student.

The end-to-end tests run real kernels (slow); reading notebooks, finding answers and judging values
are tested here without one.
"""

import csv
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from llmbook.exercises.core import get_exercise
from llmbook.exercises.grade import (
    UnreadableNotebook,
    _judge_value,
    find_answers,
    grade_folder,
    load_notebook,
    main_grade,
    read_submission,
    write_reports,
)

ROOT = Path(__file__).resolve().parents[1]


def notebook(*sources: str) -> dict:
    """A version-4 notebook of code cells with the given sources."""
    cells = [
        {"cell_type": "code", "metadata": {}, "source": s, "outputs": [], "execution_count": None}
        for s in sources
    ]
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"}},
            "nbformat": 4, "nbformat_minor": 4}  # fmt: skip


def rows(path: Path) -> dict[str, list[str]]:
    """A CSV file as {first cell: the rest of the row}."""
    with path.open(newline="", encoding="utf-8") as f:
        return {row[0]: row[1:] for row in csv.reader(f)}


def test_unreadable_notebooks_are_refused_with_the_reason(tmp_path):
    cases = {
        "list.ipynb": ("[]", "not an object"),
        "cells.ipynb": ('{"cells": "abc"}', "'cells' is not a list"),
        "number.ipynb": (json.dumps({"cells": [{"cell_type": "code", "source": 7}]}), "source is not text"),
        "broken.ipynb": ("{ this is not json", "not JSON"),
    }
    for name, (text, reason) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UnreadableNotebook, match=reason):
            load_notebook(tmp_path / name)
    os.mkfifo(tmp_path / "fifo.ipynb")
    (tmp_path / "zero.ipynb").symlink_to("/dev/zero")
    for name in ("fifo.ipynb", "zero.ipynb"):
        start = time.monotonic()
        with pytest.raises(UnreadableNotebook, match="not a regular file"):
            load_notebook(tmp_path / name)
        assert time.monotonic() - start < 1  # neither hangs nor reads without bound
    with (tmp_path / "huge.ipynb").open("wb") as f:
        f.truncate(64 * 2**20)
    with pytest.raises(UnreadableNotebook, match="too large"):
        load_notebook(tmp_path / "huge.ipynb")


def test_the_answer_is_the_last_check_call_of_each_exercise():
    sources = [
        'from llmbook.exercises import check\ncheck("03.causal_mask", first)',
        "%time x = 1\ncheck('03.causal_mask', lambda n: (\n  n  # a comment\n))\n"
        "exercises.check('00.linear', lin)",
        "check(name, f)\ncheck('not a name', f)\nthis is ( not python",
    ]
    assert find_answers(sources) == {"03.causal_mask": "lambda n: (\n  n  # a comment\n)", "00.linear": "lin"}


def test_a_notebook_is_graded_on_its_own_chapter(tmp_path):
    (tmp_path / "05_block.ipynb").write_text(json.dumps(notebook("x = 1")))
    (tmp_path / "mine.ipynb").write_text(json.dumps(notebook('check("03.causal_mask", f)')))
    assert read_submission("a", tmp_path / "05_block.ipynb").chapters == ["05"]  # no check: the file name
    assert read_submission("b", tmp_path / "mine.ipynb").chapters == ["03"]


def test_predict_messages_say_how_far_off_never_the_expected_value():
    ex = get_exercise("03.predict_qk_variance")
    case = ex.cases()[0]
    expected = case.expected
    for answer, words in ((expected * 3, "too high, by a factor of about 3"), (expected / 30, "too low")):
        verdict = _judge_value(ex, case, {"value": answer}, {})
        assert verdict.status == "fail" and words in verdict.message
        assert f"{expected:.6g}" not in verdict.message and repr(expected) not in verdict.message
    assert _judge_value(ex, case, {"value": expected}, {}).status == "pass"
    whole = get_exercise("00.predict_logits_bytes")
    wrong = _judge_value(whole, whole.cases()[0], {"value": whole.cases()[0].expected + 1}, {})
    assert wrong.status == "fail" and str(whole.cases()[0].expected) not in wrong.message


@pytest.mark.slow
def test_solutions_pass_blanks_fail_and_other_chapters_are_not_applicable(tmp_path, capsys):
    for chapter in ("00_forward_pass", "03_attention"):
        shutil.copy(
            ROOT / "exercises" / f"{chapter}_solution.ipynb", tmp_path / f"{chapter[:2]}_solved.ipynb"
        )
    shutil.copy(ROOT / "exercises" / "03_attention.ipynb", tmp_path / "03_blank.ipynb")
    out = tmp_path / "report"
    assert main_grade(str(tmp_path), str(out), time_limit=300) == 0
    grades = rows(out / "grades.csv")
    assert grades["exercise"] == ["00_solved", "03_blank", "03_solved"]
    for name, cells in grades.items():
        if name.startswith("00."):
            assert cells == ["pass", "n/a", "n/a"], name
        elif name.startswith("03."):
            assert cells == ["n/a", "fail", "pass"], name
    assert len(grades) == 1 + 6 + 8  # every exercise of both chapters
    summary = rows(out / "summary.csv")
    assert summary["03.masked_softmax"][:5] == ["1", "1", "0", "0", "0"]
    printed = {
        line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip()
    }
    for name, counts in summary.items():  # the console's counts are the CSV's
        if name != "exercise":
            assert printed[name] == counts[:6], name
    assert (out / "executed" / "03_solved.ipynb").is_file() and (out / "messages" / "03_blank.txt").is_file()
    executed = json.loads((out / "executed" / "03_solved.ipynb").read_text())
    assert any(cell.get("outputs") for cell in executed["cells"])  # the outputs are kept for review


@pytest.mark.slow
def test_a_hanging_crashing_or_unreadable_notebook_costs_only_its_student(tmp_path):
    passing = 'check("01.utf8_encode", lambda cp: chr(cp).encode("utf-8"))'
    hints = 'from llmbook.exercises import hint\nhint("01.utf8_encode")\nhint("01.utf8_encode")'
    (tmp_path / "good.ipynb").write_text(json.dumps(notebook(hints, passing)))
    hanging = notebook(passing, "while True:\n    pass", 'check("01.count_pairs", lambda ids: {})')
    (tmp_path / "hangs.ipynb").write_text(json.dumps(hanging))
    stubborn = "import time\nwhile True:\n    try:\n        time.sleep(0.1)\n    except KeyboardInterrupt:\n"
    stubborn += "        pass  # ignores the interrupt at the time limit"
    (tmp_path / "stubborn.ipynb").write_text(json.dumps(notebook(passing, stubborn)))
    (tmp_path / "crashes.ipynb").write_text(json.dumps(notebook(passing, "import os\nos._exit(1)")))
    (tmp_path / "raises.ipynb").write_text(
        json.dumps(notebook("raise RuntimeError('a cell crashed')", passing))
    )
    (tmp_path / "broken.ipynb").write_text("{ this is not json")
    (tmp_path / "list.ipynb").write_text("[]")
    os.mkfifo(tmp_path / "fifo.ipynb")
    (tmp_path / "zero.ipynb").symlink_to("/dev/zero")

    exercises, submissions, _ = grade_folder(tmp_path, time_limit=8)
    by = {s.student: s for s in submissions}
    assert by["good"].verdicts["01.utf8_encode"].status == "pass"
    assert by["good"].verdicts["01.count_pairs"].status == "missing"  # a deleted check is not a pass
    assert by["good"].hints == {"01.utf8_encode": (2, len(get_exercise("01.utf8_encode").hints))}
    assert by["hangs"].verdicts["01.utf8_encode"].status == "pass"  # defined before the stop: graded
    assert by["hangs"].verdicts["01.count_pairs"].status == "fail"
    assert any("time limit" in note for note in by["hangs"].notes)
    assert any("did not stop when interrupted" in note for note in by["stubborn"].notes)
    assert by["stubborn"].verdicts["01.utf8_encode"].status == "missing" and by["stubborn"].seconds < 60
    assert by["raises"].verdicts["01.utf8_encode"].status == "pass"  # a failing cell does not stop the rest
    assert {v.status for v in by["crashes"].verdicts.values()} <= {"missing"}  # died before answering
    assert any("died" in note for note in by["crashes"].notes)
    report = write_reports(exercises, submissions, tmp_path / "out")
    hint_rows = rows(report["hints"])
    good = hint_rows["01.utf8_encode"][hint_rows["exercise"].index("good")]
    assert good == f"2 of {len(get_exercise('01.utf8_encode').hints)}"
    grades = rows(report["grades"])
    for student in ("broken", "list", "fifo", "zero"):
        column = grades["exercise"].index(student)
        assert all(
            cells[column].startswith("unreadable: ") for name, cells in grades.items() if name != "exercise"
        )


@pytest.mark.slow
def test_the_time_limit_is_for_the_whole_notebook(tmp_path):
    sleepy = notebook("import time", *["time.sleep(0.95)"] * 25)
    (tmp_path / "00_sleepy.ipynb").write_text(json.dumps(sleepy))
    start = time.monotonic()
    _, submissions, _ = grade_folder(tmp_path, time_limit=3)
    (sleepy,) = submissions
    assert sleepy.seconds < 10 and time.monotonic() - start < 60
    assert any("time limit of 3 s" in note for note in sleepy.notes)
    assert {v.status for v in sleepy.verdicts.values()} == {"missing"}


def test_grade_rejects_a_folder_without_notebooks(tmp_path):
    with pytest.raises(ValueError, match="no .ipynb files"):
        grade_folder(tmp_path)
    with pytest.raises(ValueError, match="folder of notebooks"):
        grade_folder(tmp_path / "missing")


def test_the_wire_carries_every_kind_of_case_and_answer_and_runs_nothing(tmp_path):
    import torch

    from llmbook.exercises import protocol
    from llmbook.exercises.compare import compare
    from llmbook.model import ModelConfig, TransformerLM

    model = TransformerLM(ModelConfig(vocab_size=20, context_length=8, d_model=16, n_layers=1, n_heads=2))
    value = {
        "tensors": (
            torch.arange(6).view(2, 3).t(),
            torch.tensor([True, False]),
            torch.zeros(2, dtype=torch.uint8),
        ),
        (1, 2): [float("nan"), float("-inf"), 2**70, b"\x00\xff", "é", None, True, 1.5, 3 + 4j],
        7: {"nested": ()},
    }
    protocol.write(tmp_path, "x", [value, model])
    back, model_back = protocol.read(tmp_path, "x", max_bytes=2**24)
    assert compare(value, back, atol=0, rtol=0) is None
    assert compare(dict(model.state_dict()), dict(model_back.state_dict()), atol=0, rtol=0) is None
    data, tensors = protocol.read_raw(tmp_path, "x", max_bytes=2**24)
    weights = protocol.decode(data, tensors, build_models=False)[1]  # the grader never builds a model
    assert compare(dict(model.state_dict()), weights, atol=0, rtol=0) is None
    unsupported = protocol.decode(protocol.encode(torch.zeros(1).numpy(), {}), {})
    assert compare(torch.zeros(1), unsupported) == "expected a torch.Tensor, got numpy.ndarray"
    for forged in ({"$pickle": "gASV"}, {"$tensor": "missing"}, {"a": 1, "b": 2}):
        with pytest.raises(protocol.WireError):
            protocol.decode(forged, {})

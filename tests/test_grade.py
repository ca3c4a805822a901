"""`python -m llmbook grade`: blank templates fail, solutions pass, and one bad notebook spoils nothing else.

Kept modest: the end-to-end test grades chapter 0's template and solution (about 30 s); the unit of
work, one notebook in one kernel, is the same for every chapter.
"""

import csv
import json
import shutil
from pathlib import Path

import pytest

from llmbook.exercises.grade import checked_exercises, grade_folder, write_reports

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "00_forward_pass"


def _notebook(*sources: str) -> dict:
    cells = [
        {"cell_type": "code", "metadata": {}, "source": s, "outputs": [], "execution_count": None}
        for s in sources
    ]
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"}},
            "nbformat": 4, "nbformat_minor": 4}  # fmt: skip


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


@pytest.mark.slow
def test_grade_fails_every_blank_exercise_and_passes_every_solution(tmp_path):
    shutil.copy(ROOT / "exercises" / f"{CHAPTER}.ipynb", tmp_path / "blank.ipynb")
    shutil.copy(ROOT / "exercises" / f"{CHAPTER}_solution.ipynb", tmp_path / "solved.ipynb")
    exercises, submissions = grade_folder(tmp_path, time_limit=300)
    assert exercises == sorted(checked_exercises(ROOT / "exercises" / f"{CHAPTER}.ipynb"))
    by_student = {s.student: s for s in submissions}
    assert by_student["blank"].verdicts == {name: "fail" for name in exercises}
    assert by_student["solved"].verdicts == {name: "pass" for name in exercises}
    grades, summary = write_reports(exercises, submissions, tmp_path / "report")
    assert _rows(grades)[0] == ["exercise", "blank", "solved"]
    assert all(row[1:] == ["fail", "pass"] for row in _rows(grades)[1:])
    assert all(row[1:4] == ["1", "1", "0"] for row in _rows(summary)[1:])


@pytest.mark.slow
def test_a_hanging_or_broken_notebook_does_not_stop_the_others(tmp_path):
    passing = (
        'from llmbook.exercises import check\ncheck("01.utf8_encode", lambda cp: chr(cp).encode("utf-8"))'
    )
    (tmp_path / "good.ipynb").write_text(json.dumps(_notebook(passing)))
    hanging = _notebook(passing, "while True:\n    pass", 'check("01.count_pairs", lambda ids: {})')
    (tmp_path / "hangs.ipynb").write_text(json.dumps(hanging))
    (tmp_path / "broken.ipynb").write_text("{ this is not json")
    crash = _notebook("raise RuntimeError('a student cell crashed')", passing)
    (tmp_path / "crashes.ipynb").write_text(json.dumps(crash))

    exercises, submissions = grade_folder(tmp_path, time_limit=20)
    verdicts = {s.student: s.verdicts for s in submissions}
    problems = {s.student: s.problem for s in submissions}
    assert exercises == ["01.count_pairs", "01.utf8_encode"]
    assert verdicts["good"] == {"01.utf8_encode": "pass"}
    assert verdicts["hangs"] == {"01.utf8_encode": "pass"} and "time limit" in problems["hangs"]
    assert verdicts["broken"] == {} and problems["broken"]
    assert verdicts["crashes"] == {"01.utf8_encode": "pass"}  # a failing cell does not stop the next one
    grades = {row[0]: row[1:] for row in _rows(write_reports(exercises, submissions, tmp_path / "out")[0])}
    assert grades["01.count_pairs"] == ["error", "error", "error", "error"]  # never checked: error


def test_grade_rejects_a_folder_without_notebooks(tmp_path):
    with pytest.raises(ValueError, match="no .ipynb files"):
        grade_folder(tmp_path)
    with pytest.raises(ValueError, match="folder of notebooks"):
        grade_folder(tmp_path / "missing")

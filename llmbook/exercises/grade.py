"""Grading a folder of submitted exercise notebooks: `python -m llmbook grade <folder>`.

Every `*.ipynb` under the folder is one submission (its path relative to the folder, without the suffix,
names the student column). Each is executed in its own kernel, with a time limit for the whole notebook;
a cell that raises does not stop the cells after it, and a notebook that cannot be run at all (bad JSON,
a dead kernel, the time limit) gets "error" for its exercises without stopping the others.

Verdicts come from the checker itself, not from the printed text: while grading, every `check(...)` also
appends its verdict to a log file (see `LOG_VARIABLE` in `checker.py`). An exercise is "pass" or "fail" as
the checker decided (a crash or time-out inside the student's code is "error"), and "error" when no verdict
arrived, e.g. because the check cell was deleted or never reached. The exercises graded are those that any
submission in the folder calls `check` on.

Two CSV files are written: `grades.csv` (one row per exercise, one column per submission, pass/fail/error)
and `summary.csv` (per exercise: how many passed, failed and errored).
"""

from __future__ import annotations

import csv
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from llmbook.exercises.checker import LOG_VARIABLE

STATUSES = ("pass", "fail", "error")
_CHECK_CALL = re.compile(r"""check\(\s*["'](\d\d\.\w+)["']""")


@dataclass
class Submission:
    """One graded notebook: its student label, a verdict per exercise, and why it could not run (if so)."""

    student: str
    path: Path
    verdicts: dict[str, str] = field(default_factory=dict)
    problem: str = ""
    seconds: float = 0.0


def checked_exercises(path: Path) -> list[str]:
    """The exercise names a notebook calls `check` on, in order of first appearance."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    names: list[str] = []
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            source = cell.get("source", "")
            source = "".join(source) if isinstance(source, list) else source
            names += [n for n in _CHECK_CALL.findall(source) if n not in names]
    return names


@contextmanager
def _verdict_log() -> Iterator[Path]:
    # Kernels inherit the environment at start, so the variable is set while the notebook runs.
    with tempfile.TemporaryDirectory(prefix="llmbook-grade-") as tmp:
        log = Path(tmp) / "verdicts.jsonl"
        log.touch()
        previous = os.environ.get(LOG_VARIABLE)
        os.environ[LOG_VARIABLE] = str(log)
        try:
            yield log
        finally:
            if previous is None:
                os.environ.pop(LOG_VARIABLE, None)
            else:
                os.environ[LOG_VARIABLE] = previous


def _read_verdicts(log: Path) -> dict[str, str]:
    verdicts: dict[str, str] = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("status") in STATUSES and isinstance(entry.get("name"), str):
            verdicts[entry["name"]] = entry["status"]  # the last check of an exercise counts
    return verdicts


def run_submission(path: Path, student: str, time_limit: float, kernel_name: str = "python3") -> Submission:
    """Execute one notebook under a time limit and collect the checker's verdicts; never raises."""
    import nbformat
    from nbclient import NotebookClient

    submission = Submission(student, path)
    start = time.monotonic()
    deadline = start + time_limit
    with _verdict_log() as log:
        try:
            nb = nbformat.read(path, as_version=4)
            client = NotebookClient(
                nb,
                kernel_name=kernel_name,
                allow_errors=True,  # a failing cell must not hide the verdicts of the cells after it
                timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
                resources={"metadata": {"path": str(path.parent)}},
            )
            client.execute()
        except Exception as err:  # a broken notebook, the time limit or a dead kernel: report, go on
            reason = "ran past the time limit" if time.monotonic() >= deadline - 1 else type(err).__name__
            submission.problem = f"{reason}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        submission.verdicts = _read_verdicts(log)
    submission.seconds = time.monotonic() - start
    return submission


def find_submissions(folder: Path) -> list[tuple[str, Path]]:
    """(student label, path) of every notebook under `folder`, checkpoints excluded, sorted."""
    if not folder.is_dir():
        raise ValueError(f"grade expects a folder of notebooks, got {str(folder)!r}")
    paths = sorted(p for p in folder.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    if not paths:
        raise ValueError(f"no .ipynb files under {str(folder)!r}")
    return [(p.relative_to(folder).with_suffix("").as_posix(), p) for p in paths]


def grade_folder(folder: str | Path, time_limit: float = 600.0) -> tuple[list[str], list[Submission]]:
    """Grade every notebook under `folder`: (exercise names, one Submission per notebook)."""
    submissions, exercises = [], []
    for student, path in find_submissions(Path(folder)):
        try:
            names = checked_exercises(path)
        except (OSError, ValueError) as err:
            names = []
            problem = f"unreadable notebook: {err}"
        else:
            problem = ""
        exercises += [n for n in names if n not in exercises]
        if problem:
            submissions.append(Submission(student, path, problem=problem))
            continue
        submission = run_submission(path, student, time_limit)
        print(
            f"graded {student}: "
            + ", ".join(f"{sum(v == s for v in submission.verdicts.values())} {s}" for s in STATUSES)
            + (f" ({submission.problem})" if submission.problem else "")
            + f" in {submission.seconds:.0f} s",
            flush=True,
        )
        submissions.append(submission)
    return sorted(exercises), submissions


def write_reports(
    exercises: list[str], submissions: list[Submission], out_dir: str | Path
) -> tuple[Path, Path]:
    """Write grades.csv (exercise x student) and summary.csv (counts per exercise) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grades, summary = out / "grades.csv", out / "summary.csv"
    with grades.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["exercise", *(s.student for s in submissions)])
        for name in exercises:
            writer.writerow([name, *(s.verdicts.get(name, "error") for s in submissions)])
    with summary.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["exercise", *STATUSES, "pass_rate"])
        for name in exercises:
            counts = [
                sum(s.verdicts.get(name, "error") == status for s in submissions) for status in STATUSES
            ]
            writer.writerow([name, *counts, f"{counts[0] / max(len(submissions), 1):.2f}"])
    return grades, summary


def main_grade(folder: str, out: str | None = None, time_limit: float = 600.0) -> int:
    """The `grade` command: grade a folder, write the two CSV files, print the per-exercise summary."""
    exercises, submissions = grade_folder(folder, time_limit)
    grades, summary = write_reports(exercises, submissions, out or folder)
    width = max((len(n) for n in exercises), default=8)
    print(f"\n{'exercise':<{width}}  pass  fail  error")
    for name in exercises:
        counts = [sum(s.verdicts.get(name, "error") == status for s in submissions) for status in STATUSES]
        print(f"{name:<{width}}  {counts[0]:>4}  {counts[1]:>4}  {counts[2]:>5}")
    for s in submissions:
        if s.problem:
            print(f"note: {s.student}: {s.problem}")
    print(f"\nwrote {grades} and {summary}")
    return 0

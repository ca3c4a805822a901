"""Graded exercises: `check("NN.name", your_function)` prints a pass or the first failing case.

Each chapter's cases live in `llmbook/exercises/chNN.py`, computed from the package's own reference
implementation, so the expected values are never hard-coded.
"""

from llmbook.exercises.core import Case, CheckResult, all_exercises, check, exercise, get_exercise, run_check

__all__ = ["Case", "CheckResult", "all_exercises", "check", "exercise", "get_exercise", "run_check"]

"""Graded exercises: `check("NN.name", answer)` prints a pass or the first failing case; `hint("NN.name")`
gives a hint, a stronger one on each call.

Each chapter's cases live in `llmbook/exercises/chNN.py`, computed from the package's own reference
implementation, so the expected values are never hard-coded. The registry and its API are described in
`llmbook/exercises/core.py`; the guarded grading in `checker.py`; grading a folder of notebooks in `grade.py`;
the static audit of a submission's source (imports of references, frame inspection, forbidden calls) in
`audit.py`.
"""

from llmbook.exercises.checker import CheckResult, check, run_check
from llmbook.exercises.compare import compare
from llmbook.exercises.core import Case, all_exercises, exercise, get_exercise, hint

__all__ = [
    "Case",
    "CheckResult",
    "all_exercises",
    "check",
    "compare",
    "exercise",
    "get_exercise",
    "hint",
    "run_check",
]

"""Grading a folder of submitted exercise notebooks: `python -m llmbook grade <folder>`.

Every `*.ipynb` under the folder is one submission (its path relative to the folder, without the suffix,
names the student column). All notebooks are read (size-capped, regular files only) before any runs; one
that cannot be read is "unreadable: why" and the run goes on.

The verdict is computed here, in the grader's process, never in the student's. Each notebook runs in its
own kernel, folder and (as root) uid (see `sandbox.py`), all its cells with errors allowed, under one time
limit for the whole notebook; at the limit the running cell is interrupted and the rest are skipped. A
kernel graded on chapter 7 starts with `TRITON_INTERPRET=1` (`CHAPTER_VARIABLES`), so that the reader's
Triton kernel runs on the CPU in Triton's interpreter whatever the notebook imports first.
Then the grader finds each answer in the notebook's source, the second argument of its last
`check("NN.name", answer)` call, and a cell appended after the student's asks the kernel to call that
answer on inputs the grader sends (`protocol.py`): the shown cases and hidden cases drawn here from a
seed the kernel never sees. What comes back (values, or the exception each call raised) is compared
here with the reference's values, with the exercise's tolerances; nothing the kernel prints or writes
is a verdict. The answers get their own time budget (the exercises' time limits), so a notebook stopped
at its limit still has the answers it defined graded.

A notebook is graded on every exercise of its chapter (the chapters its `check` calls name, else the
number its file name starts with), so a deleted check is "missing". Exercises of other chapters are
"n/a". Statuses: pass, fail (a wrong answer), error (the answer's code raised or ran out of time, or
the kernel died), missing (no check call, or the answer never came back), unreadable. Each cell also
carries the static audit's flags (`audit.py`): "pass (flagged: imports llmbook.attention)".

Written next to each other: grades.csv (exercise × student), summary.csv (counts per exercise),
hints.csv (the strongest hint each student's kernel printed, self-reported), messages/<student>.txt
(each exercise's message) and executed/<student>.ipynb (the notebook with its outputs).
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import secrets
import stat
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmbook.exercises import protocol
from llmbook.exercises.audit import audit_notebook, strip_magics
from llmbook.exercises.checker import _all_cases, _describe_inputs, _judge, _mutation, _value_miss
from llmbook.exercises.compare import show
from llmbook.exercises.core import Exercise, all_exercises
from llmbook.exercises.sandbox import Sandbox, Workspace

STATUSES = ("pass", "fail", "error", "missing", "unreadable")
NOT_APPLICABLE = "n/a"
MAX_NOTEBOOK_BYTES = 32 * 2**20
MAX_ANSWER_BYTES = 256 * 2**20
ANSWER_GRACE = 60.0  # seconds for the answers' cell beyond the exercises' own time limits (imports)
INTERRUPT_GRACE = 10  # seconds an interrupted notebook has to stop before it is ended
_NAME = re.compile(r"^\d\d\.\w+$")
_HINT_LINE = re.compile(r"hint (\d+) of (\d+) for (\d\d\.\w+)")
_CHAPTER_IN_FILE_NAME = re.compile(r"^(\d\d)(?:[_.-]|$)")
# Environment variables a chapter's kernels start with. Chapter 7's Triton exercise runs the reader's
# kernel on CPU tensors, which only Triton's interpreter can do, and Triton reads TRITON_INTERPRET once,
# when it is first imported: so the kernel must start with it on, whatever the notebook does first.
CHAPTER_VARIABLES = {"07": {"TRITON_INTERPRET": "1"}}


def chapter_variables(chapters: list[str]) -> dict[str, str]:
    """The extra environment of a kernel graded on `chapters` (CHAPTER_VARIABLES, merged)."""
    return {k: v for chapter in chapters for k, v in CHAPTER_VARIABLES.get(chapter, {}).items()}


class UnreadableNotebook(ValueError):
    """A submission is not a notebook the grader can run; the message says what is wrong with it."""


@dataclass
class Verdict:
    """One exercise's grade for one submission: status, the message explaining it, the audit's flags."""

    status: str
    message: str
    flags: list[str] = field(default_factory=list)

    def cell(self) -> str:
        """The CSV cell: the status, and the flags beside it."""
        return self.status + (f" (flagged: {'; '.join(self.flags)})" if self.flags else "")


@dataclass
class Submission:
    """One notebook: its label, chapters, verdicts, hint use, and notes about how its run went."""

    student: str
    path: Path
    notebook: Any = None  # the parsed notebook (nbformat NotebookNode), executed in place
    problem: str = ""  # why the notebook is unreadable
    chapters: list[str] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)  # exercise -> source of its answer
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    hints: dict[str, tuple[int, int]] = field(default_factory=dict)  # exercise -> (strongest, of)
    notes: list[str] = field(default_factory=list)
    seed: int = 0
    seconds: float = 0.0

    def cell(self, name: str) -> str:
        """This submission's CSV cell for exercise `name`."""
        if self.problem:
            return (
                f"unreadable: {self.problem}" if _chapter(name) in self.chapters or not self.chapters else ""
            )
        verdict = self.verdicts.get(name)
        return verdict.cell() if verdict else NOT_APPLICABLE

    def status(self, name: str) -> str | None:
        """The status counted in the summary (None: the exercise is not this submission's)."""
        if self.problem:
            return "unreadable" if _chapter(name) in self.chapters or not self.chapters else None
        verdict = self.verdicts.get(name)
        return verdict.status if verdict else None


# ----------------------------------------------------------------------------------------------------
# Reading a submission without trusting it


def load_notebook(path: Path) -> Any:
    """The notebook at `path` (nbformat v4); UnreadableNotebook if it is not a regular, sane notebook file."""
    import nbformat

    try:
        info = os.lstat(path)
    except OSError as err:
        raise UnreadableNotebook(f"cannot stat the file ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "a FIFO, device or folder"
        raise UnreadableNotebook(f"not a regular file ({kind})")
    if info.st_size > MAX_NOTEBOOK_BYTES:
        raise UnreadableNotebook(f"too large ({info.st_size} bytes; at most {MAX_NOTEBOOK_BYTES})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped after the lstat
                raise UnreadableNotebook("not a regular file")
            raw = f.read(MAX_NOTEBOOK_BYTES + 1)
    except OSError as err:
        raise UnreadableNotebook(f"cannot read the file ({err.strerror})") from None
    if len(raw) > MAX_NOTEBOOK_BYTES:
        raise UnreadableNotebook(f"too large (more than {MAX_NOTEBOOK_BYTES} bytes)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UnreadableNotebook(f"not JSON ({type(err).__name__}: {str(err)[:120]})") from None
    _check_structure(data)
    try:
        notebook = nbformat.reads(json.dumps(data), as_version=4)
    except Exception as err:  # nbformat's own complaints about a structure we did not foresee
        raise UnreadableNotebook(f"not a notebook ({type(err).__name__}: {str(err)[:120]})") from None
    for cell in notebook.cells:
        cell.outputs = [] if cell.cell_type == "code" else cell.get("outputs")
        if cell.cell_type == "code":
            cell.execution_count = None
    return notebook


def _check_structure(data: Any) -> None:
    if not isinstance(data, dict):
        raise UnreadableNotebook(f"not a notebook (the JSON is a {type(data).__name__}, not an object)")
    cells = data.get("cells")
    if not isinstance(cells, list):
        raise UnreadableNotebook("not a notebook (its 'cells' is not a list)")
    for index, cell in enumerate(cells):
        if not isinstance(cell, dict) or not isinstance(cell.get("cell_type"), str):
            raise UnreadableNotebook(f"not a notebook (cell {index} is not a cell object)")
        source = cell.get("source", "")
        if not (
            isinstance(source, str) or (isinstance(source, list) and all(isinstance(s, str) for s in source))
        ):
            raise UnreadableNotebook(f"not a notebook (cell {index}'s source is not text)")
    if not isinstance(data.get("nbformat", 4), int) or data.get("nbformat", 4) < 4:
        raise UnreadableNotebook("not a version-4 notebook")


def code_sources(notebook: Any) -> list[str]:
    """The source of each code cell, in order."""
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def find_answers(sources: list[str]) -> dict[str, str]:
    """Exercise name -> the source of the answer given to its last `check(name, answer)` call."""
    answers: dict[str, str] = {}
    for source in sources:
        code = strip_magics(source)[0]  # the audit's reading of IPython lines, so both see the same Python
        try:
            tree = ast.parse(code)
        except (SyntaxError, ValueError):
            continue
        calls = sorted(
            (node for node in ast.walk(tree) if _is_check_call(node)), key=lambda n: (n.lineno, n.col_offset)
        )
        for call in calls:
            text = ast.get_source_segment(code, call.args[1])
            if text is not None:
                answers[call.args[0].value] = text
    return answers


def checked_exercises(path: Path) -> list[str]:
    """The exercise names a notebook calls `check` on, in order of first appearance."""
    return list(find_answers(code_sources(load_notebook(path))))


def _is_check_call(node: ast.AST) -> bool:
    if not (isinstance(node, ast.Call) and len(node.args) == 2 and not node.keywords):
        return False
    func = node.func
    named = (isinstance(func, ast.Name) and func.id == "check") or (
        isinstance(func, ast.Attribute) and func.attr == "check"
    )
    first = node.args[0]
    return (
        named
        and isinstance(first, ast.Constant)
        and isinstance(first.value, str)
        and bool(_NAME.match(first.value))
    )


def _chapter(name: str) -> str:
    return name[:2]


def chapters_of(answers: dict[str, str], path: Path) -> list[str]:
    """The chapters a notebook is graded on: those its check calls name, else its file name's number."""
    named = sorted({_chapter(n) for n in answers})
    if named:
        return named
    match = _CHAPTER_IN_FILE_NAME.match(path.name)
    return [match.group(1)] if match else []


def find_submissions(folder: Path, skip: Path | None = None) -> list[tuple[str, Path]]:
    """(student label, path) of every notebook under `folder` (checkpoints and `skip` excluded), sorted."""
    if not folder.is_dir():
        raise ValueError(f"grade expects a folder of notebooks, got {str(folder)!r}")
    skip = skip.resolve() if skip else None
    paths = sorted(
        p
        for p in folder.rglob("*.ipynb")
        if ".ipynb_checkpoints" not in p.parts and not (skip and skip in p.resolve(strict=False).parents)
    )
    if not paths:
        raise ValueError(f"no .ipynb files under {str(folder)!r}")
    return [(p.relative_to(folder).with_suffix("").as_posix(), p) for p in paths]


def read_submission(student: str, path: Path) -> Submission:
    """A Submission with its notebook, answers and chapters; `problem` set if the notebook is unreadable."""
    submission = Submission(student, path)
    try:
        submission.notebook = load_notebook(path)
    except UnreadableNotebook as err:
        submission.problem = str(err)
        match = _CHAPTER_IN_FILE_NAME.match(path.name)
        submission.chapters = [match.group(1)] if match else []
        return submission
    submission.answers = find_answers(code_sources(submission.notebook))
    submission.chapters = chapters_of(submission.answers, path)
    if not submission.chapters:
        submission.notes.append("no check(...) call and no chapter number in the file name: nothing to grade")
    elif len(submission.chapters) > 1:
        submission.notes.append(
            f"check calls of several chapters ({', '.join(submission.chapters)}): graded on all"
        )
    return submission


# ----------------------------------------------------------------------------------------------------
# Running one submission


def chapter_exercises(chapters: list[str]) -> list[Exercise]:
    """Every registered exercise of the given chapters, sorted by name."""
    return [ex for ex in all_exercises() if _chapter(ex.name) in chapters]


def _request(exercises: list[Exercise], answers: dict[str, str], seed: int) -> tuple[dict, dict]:
    """(what the kernel is sent, the grader's labelled cases with expected values) for the answered ones;
    an exercise whose cases could not be built has the reason instead of its cases."""
    request, cases = {}, {}
    for ex in exercises:
        if ex.name not in answers:
            continue
        try:
            with torch.random.fork_rng(devices=[]):  # references that initialise modules: keep our RNG still
                labelled = _all_cases(ex, seed)
        except Exception as err:  # a bug in the exercise's own cases: judged "error" below, not sent
            cases[ex.name] = (
                f"the grader could not build its cases ({type(err).__name__}: {err}); a bug in llmbook"
            )
            continue
        cases[ex.name] = labelled
        request[ex.name] = {
            "value": ex.takes_value,
            "forbid": list(ex.forbid),
            "time_limit": ex.time_limit,
            "report_inputs": not (ex.mutates or ex.takes_value),
            "cases": [] if ex.takes_value else [[c.args, c.kwargs] for _, c in labelled],
        }
    return request, cases


def run_submission(submission: Submission, sandbox: Sandbox, time_limit: float) -> None:
    """Execute the notebook under `time_limit`, collect its answers, and judge them here; never raises."""
    start = time.monotonic()
    submission.seed = secrets.randbelow(2**31)
    exercises = chapter_exercises(submission.chapters)
    request, cases = _request(exercises, submission.answers, submission.seed)
    space = sandbox.workspace()
    protocol.write(space.request, protocol.INPUTS, request)
    for path in space.request.iterdir():
        path.chmod(0o644)
    replies, tensors = {}, {}
    try:
        replies, tensors = _execute(submission, sandbox, space, request, time_limit)
    finally:
        sandbox.end(space)
    for ex in exercises:
        reply = replies.get(ex.name)
        if isinstance(cases.get(ex.name), str):
            submission.verdicts[ex.name] = Verdict("error", cases[ex.name])
            continue
        try:
            verdict = judge(ex, submission.answers.get(ex.name), cases.get(ex.name, []), reply, tensors)
        except Exception as err:  # a reply shaped unlike anything `serve` writes: the kernel tampered
            verdict = Verdict(
                "error", f"the kernel's reply could not be judged ({type(err).__name__}: {err})"
            )
        submission.verdicts[ex.name] = verdict
    submission.hints = hints_shown(submission.notebook)
    submission.seconds = time.monotonic() - start


def _execute(
    submission: Submission, sandbox: Sandbox, space: Workspace, request: dict, limit: float
) -> tuple[dict, dict]:
    """Run the cells, then the answers' cell; the kernel's replies (raw JSON data) and their tensors."""
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    notebook = submission.notebook
    km = _kernel_manager(AsyncKernelManager, sandbox, space)
    client = NotebookClient(
        notebook, km=km, allow_errors=True, startup_timeout=180, interrupt_on_timeout=False,
        resources={"metadata": {"path": str(space.work)}},
    )  # fmt: skip
    budget = sum(float(spec["time_limit"]) for spec in request.values()) + ANSWER_GRACE
    watchdog: threading.Timer | None = None
    # The kernel's own stdout/stderr go to a file, not the grader's console (a detached process would
    # otherwise write into the instructor's terminal).
    with open(space.root / "kernel.log", "wb") as log:
        try:
            env = space.kernel_env() | chapter_variables(submission.chapters)
            with client.setup_kernel(env=env, cwd=str(space.work), stdout=log, stderr=log):
                space.leader = km.provisioner.process.pid if km.provisioner else None
                # The last resort if an interrupt is ignored: everything ends at the hard deadline.
                watchdog = threading.Timer(limit + budget + 30, sandbox.kill, args=(space,))
                watchdog.start()
                if _run_cells(client, notebook, limit, submission.notes) and request:
                    _run_answers(client, notebook, _answers_cell(space, submission.answers, request), budget)
        except DeadKernelError:
            submission.notes.append("the kernel died")
        except CellTimeoutError:
            submission.notes.append(f"the answers did not come back within {budget:.0f} s")
        except Exception as err:  # a kernel that would not start, or a client failure: report, go on
            submission.notes.append(f"the notebook could not be run ({type(err).__name__}: {str(err)[:200]})")
        finally:
            if watchdog:
                watchdog.cancel()
            sandbox.kill(space)
    if not request:
        return {}, {}
    try:
        data, tensors = protocol.read_raw(space.work, protocol.OUTPUTS, MAX_ANSWER_BYTES)
    except protocol.WireError as err:
        submission.notes.append(f"no answers came back ({err})")
        return {}, {}
    return (data, tensors) if isinstance(data, dict) else ({}, {})


def _kernel_manager(base: type, sandbox: Sandbox, space: Workspace) -> Any:
    """A KernelManager whose kernel runs as `sandbox` says, with its connection file in `space`."""
    from jupyter_client.kernelspec import KernelSpec

    class SandboxedKernelManager(base):
        def write_connection_file(self, **kwargs: Any) -> None:
            super().write_connection_file(**kwargs)
            if space.uid is not None:  # the kernel, as its own uid, must read its connection file
                os.chown(self.connection_file, space.uid, space.uid)

    km = SandboxedKernelManager(kernel_name="python3")
    km._kernel_spec = KernelSpec(
        argv=sandbox.kernel_argv(space), display_name="Python 3 (graded)", language="python"
    )
    km.connection_file = str(space.work / "kernel-connection.json")
    return km


def _run_cells(client: Any, notebook: Any, limit: float, notes: list[str]) -> bool:
    """Run every code cell until the time limit; False if the kernel is gone."""
    from jupyter_core.utils import run_sync
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    deadline = time.monotonic() + limit
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            notes.append(f"stopped before cell {index}: the notebook ran past its time limit of {limit:g} s")
            return True
        client.timeout = max(1, int(remaining + 0.999))
        try:
            client.execute_cell(cell, index)
        except CellTimeoutError:
            notes.append(f"stopped in cell {index}: the notebook ran past its time limit of {limit:g} s")
            run_sync(client.km.interrupt_kernel)()  # the answers it defined so far can still be graded
            return _responds(client, notebook, notes)
        except DeadKernelError:
            notes.append(f"the kernel died in cell {index}")
            return False
    return True


def _responds(client: Any, notebook: Any, notes: list[str]) -> bool:
    """Whether the kernel, once interrupted, runs an empty cell within INTERRUPT_GRACE seconds."""
    import nbformat
    from nbclient.exceptions import CellTimeoutError

    notebook.cells.append(nbformat.v4.new_code_cell("pass"))
    try:
        client.timeout = INTERRUPT_GRACE
        client.execute_cell(notebook.cells[-1], len(notebook.cells) - 1)
    except CellTimeoutError:
        notes.append(f"the notebook did not stop when interrupted; ended after {INTERRUPT_GRACE} s more")
        return False
    finally:
        notebook.cells.pop()
    return True


def _run_answers(client: Any, notebook: Any, cell: Any, budget: float) -> None:
    notebook.cells.append(cell)  # nbclient executes cells by index; the cell is not kept
    try:
        client.timeout = int(budget) + 1
        client.execute_cell(cell, len(notebook.cells) - 1)
    finally:
        notebook.cells.pop()


def _answers_cell(space: Workspace, answers: dict[str, str], request: dict) -> Any:
    import nbformat

    source = protocol.kernel_cell(space.request, {name: answers[name] for name in request})
    return nbformat.v4.new_code_cell(source)


# ----------------------------------------------------------------------------------------------------
# Judging, in the grader's process


def judge(ex: Exercise, source: str | None, cases: list, reply: Any, tensors: dict) -> Verdict:
    """The verdict on one exercise from the kernel's `reply` to its `cases` (label, Case with expected)."""
    if source is None:
        return Verdict("missing", f'no check("{ex.name}", ...) call in the notebook')
    if not isinstance(reply, dict):
        return Verdict(
            "missing", f"the answer `{_short(source)}` never came back (the notebook stopped first?)"
        )
    answer = reply.get("answer")
    if answer == "error":
        return Verdict("error", f"the answer `{_short(source)}` could not be evaluated: {reply.get('error')}")
    if answer == "not answered":
        return Verdict("fail", "not answered yet (the answer is `...`)")
    if answer == "not callable":
        return Verdict("fail", f"the answer `{_short(source)}` is a {reply.get('type')}, not a function")
    sent = reply.get("cases")
    if answer != "ok" or not isinstance(sent, list) or not sent:
        return Verdict("error", "no case came back (zero cases is never a pass)")
    if ex.takes_value:
        return _judge_value(ex, cases[0][1], sent[0], tensors)
    for (label, case), record in zip(cases, sent, strict=False):
        problem = _judge_case(ex, label, case, record, tensors)
        if problem:
            return problem
    if len(sent) < len(cases):
        return Verdict("error", f"only {len(sent)} of {len(cases)} cases came back")
    shown = len(ex.cases())
    return Verdict("pass", f"all {len(cases)} cases pass ({shown} shown, {len(cases) - shown} hidden)")


def _judge_case(ex: Exercise, label: str, case: Any, record: Any, tensors: dict) -> Verdict | None:
    inputs = f"\n   input:    {_describe_inputs(case)}"
    if not isinstance(record, dict):
        return Verdict("error", f"{label}: the kernel's reply is malformed")
    if record.get("not_answered"):
        return Verdict("fail", f"{label}: not answered yet (raises NotImplementedError)")
    if record.get("timeout"):
        return Verdict("error", f"{label} ran past the exercise's time limit of {ex.time_limit:g} s{inputs}")
    if "error" in record:
        return Verdict("error", f"{label} raised {str(record['error'])[:600]}{inputs}")
    if record.get("called"):
        return Verdict(
            "fail", f"{label}: the answer called {record['called'][0]}; the exercise is to write it"
        )
    actual = protocol.decode(record["value"], tensors, build_models=False)
    if "inputs_after" in record:
        after_args, after_kwargs = protocol.decode(record["inputs_after"], tensors, build_models=False)
        mutated = _mutation(ex, _plain_case(case), _plain(tuple(after_args)), _plain(dict(after_kwargs)))
        if mutated:
            return Verdict("fail", f"{label} failed — {mutated}{inputs}")
    try:
        problem = _judge(ex, case, actual)
    except Exception as err:  # a compare callable that chokes on the answer's shape
        problem = f"comparing the answer raised {type(err).__name__}: {err}"
    if problem:
        return Verdict(
            "fail",
            f"{label} failed — {problem}{inputs}\n   expected: {show(case.expected)}\n"
            f"   got:      {show(actual)}",
        )
    return None


def _plain(value: Any) -> Any:
    """`value` with models replaced by their weights, so 'changed in place' compares what can change."""
    if isinstance(value, torch.nn.Module):
        return dict(value.state_dict())
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _plain_case(case: Any) -> Any:
    from dataclasses import replace

    return replace(case, args=_plain(case.args), kwargs=_plain(case.kwargs))


def _judge_value(ex: Exercise, case: Any, record: Any, tensors: dict) -> Verdict:
    """A predict/experiment answer: pass, or how far off it is (direction, rough factor), never the value."""
    if not isinstance(record, dict) or "value" not in record:
        return Verdict(
            "error",
            f"the answer could not be sent back: {record.get('error') if isinstance(record, dict) else ''}",
        )
    actual = protocol.decode(record["value"], tensors, build_models=False)
    if isinstance(actual, torch.Tensor) and actual.numel() == 1:
        actual = actual.item()
    problem = _judge(ex, case, actual)
    if not problem:
        return Verdict("pass", f"the answer {_short(repr(actual))} agrees with the measured value")
    return Verdict("fail", _value_miss(case, actual, problem))  # the in-notebook check's words


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hints_shown(notebook: Any) -> dict[str, tuple[int, int]]:
    """Exercise -> (strongest hint level, number of hints), from the outputs' `hint K of N for NAME` lines."""
    shown: dict[str, tuple[int, int]] = {}
    for cell in notebook.cells if notebook is not None else []:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            text = output.get("text", "") or output.get("data", {}).get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else str(text)
            for level, total, name in _HINT_LINE.findall(text):
                best = shown.get(name, (0, int(total)))
                shown[name] = (max(best[0], int(level)), int(total))
    return shown


# ----------------------------------------------------------------------------------------------------
# The audit's flags


def add_flags(submission: Submission) -> None:
    """Put the static audit's flags (notebook-wide "*" and per exercise) beside each verdict."""
    if submission.notebook is None:
        return
    flags = audit_notebook(code_sources(submission.notebook), sorted(submission.verdicts))
    for name, verdict in submission.verdicts.items():
        if verdict.status != "missing":  # a notebook-wide flag belongs to the answers it could have helped
            verdict.flags = list(dict.fromkeys([*flags.get("*", []), *flags.get(name, [])]))


# ----------------------------------------------------------------------------------------------------
# The folder, the reports and the command


def grade_folder(
    folder: str | Path,
    time_limit: float = 600.0,
    skip: Path | None = None,
    log: Any = print,
    isolation: str = "auto",
) -> tuple[list[str], list[Submission], Sandbox]:
    """Grade every notebook under `folder`: (exercise names, one Submission per notebook, the sandbox)."""
    found = find_submissions(Path(folder), skip)
    submissions = [read_submission(student, path) for student, path in found]  # all read before any runs
    sandbox = Sandbox.start(isolation=isolation)
    log(sandbox.note)
    try:
        for submission in submissions:
            if not submission.problem and submission.chapters:
                run_submission(submission, sandbox, time_limit)
                add_flags(submission)
            counts = Counter(v.status for v in submission.verdicts.values())
            what = (
                f"unreadable: {submission.problem}"
                if submission.problem
                else ", ".join(f"{counts[s]} {s}" for s in STATUSES[:4])
            )
            log(f"graded {submission.student}: {what} in {submission.seconds:.0f} s")
    finally:
        sandbox.close()
    chapters = sorted({c for s in submissions for c in s.chapters})
    exercises = [ex.name for ex in chapter_exercises(chapters)]
    return exercises, submissions, sandbox


def summary_rows(exercises: list[str], submissions: list[Submission]) -> list[list[Any]]:
    """Per exercise: the count of each status over the submissions it applies to, and the pass rate."""
    rows = []
    for name in exercises:
        statuses = [s.status(name) for s in submissions if s.status(name) is not None]
        counts = [statuses.count(status) for status in STATUSES]
        flagged = sum(bool(s.verdicts.get(name) and s.verdicts[name].flags) for s in submissions)
        rows.append([name, *counts, flagged, f"{counts[0] / max(len(statuses), 1):.2f}"])
    return rows


def _safe_name(student: str) -> str:
    return re.sub(r"[^\w.-]", "_", student.replace("/", "__"))


def write_reports(
    exercises: list[str], submissions: list[Submission], out_dir: str | Path, note: str = ""
) -> dict:
    """Write grades.csv, summary.csv, hints.csv, messages/ and executed/ into `out_dir`; their paths."""
    import nbformat

    out = Path(out_dir)
    (out / "messages").mkdir(parents=True, exist_ok=True)
    (out / "executed").mkdir(exist_ok=True)
    paths = {name: out / f"{name}.csv" for name in ("grades", "summary", "hints")}
    students = [s.student for s in submissions]
    _write_csv(
        paths["grades"], ["exercise", *students], [[n, *(s.cell(n) for s in submissions)] for n in exercises]
    )
    _write_csv(
        paths["summary"],
        ["exercise", *STATUSES, "flagged", "pass_rate"],
        summary_rows(exercises, submissions),
    )
    hint_rows = [
        [n, *(f"{s.hints[n][0]} of {s.hints[n][1]}" if n in s.hints else "" for s in submissions)]
        for n in exercises
    ]
    _write_csv(paths["hints"], ["exercise", *students], hint_rows)
    for s in submissions:
        (out / "messages" / f"{_safe_name(s.student)}.txt").write_text(_messages(s, note), encoding="utf-8")
        if s.notebook is not None and s.verdicts:
            nbformat.write(s.notebook, str(out / "executed" / f"{_safe_name(s.student)}.ipynb"))
    return paths


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _messages(s: Submission, note: str) -> str:
    lines = [f"{s.student} ({s.path})", note]
    if s.problem:
        lines.append(f"unreadable: {s.problem}")
    lines += [f"chapters: {', '.join(s.chapters) or 'none'}; hidden cases' seed {s.seed}; {s.seconds:.0f} s"]
    lines += [f"note: {n}" for n in s.notes]
    for name, verdict in sorted(s.verdicts.items()):
        hint = f"; hints seen: {s.hints[name][0]} of {s.hints[name][1]}" if name in s.hints else ""
        lines += ["", f"{name}: {verdict.cell()}{hint}", f"   {verdict.message}"]
    return "\n".join(lines) + "\n"


def main_grade(folder: str, out: str | None = None, time_limit: float = 600.0) -> int:
    """The `grade` command: grade a folder, write the reports, print the summary (the CSV's counts)."""
    out_dir = Path(out) if out else Path(folder) / "grading"
    exercises, submissions, sandbox = grade_folder(folder, time_limit, skip=out_dir)
    paths = write_reports(exercises, submissions, out_dir, sandbox.note)
    width = max((len(n) for n in exercises), default=8)
    print(f"\n{'exercise':<{width}}  " + "  ".join(STATUSES) + "  flagged")
    for row in summary_rows(exercises, submissions):
        print(
            f"{row[0]:<{width}}  "
            + "  ".join(f"{c:>{len(h)}}" for c, h in zip(row[1:-1], [*STATUSES, "flagged"], strict=True))
        )
    for s in submissions:
        for note in s.notes:
            print(f"note: {s.student}: {note}")
    print(
        f"\n{sandbox.note}\nwrote {', '.join(p.name for p in paths.values())}, messages/ and executed/ "
        f"in {out_dir}"
    )
    return 0

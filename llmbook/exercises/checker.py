"""Grading one answer: run it on the shown and hidden cases under guards, and explain the first failure.

This is the reader's feedback, in the reader's own process: the reader's code runs on private copies of
the inputs (and an answer that changes them fails), under a time limit, with calls to the package
function it is meant to replace noticed, and anything that goes wrong inside the reader's code or
returned object (even its `__repr__`) is reported in the message, never raised. A wrong prediction or
experiment is told "too high" or "too low" and by roughly how much, never the measured value, and
`check` counts the attempts. Nothing here can be a course's grade, since the reader's code could change
it: `python -m llmbook grade` computes the verdict in its own process, and `check` says so once.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import os
import secrets
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from llmbook.exercises.compare import as_number, compare, describe_miss, safe_str, show, show_number
from llmbook.exercises.core import FAIL_MARK, PASS_MARK, Case, Exercise, get_exercise

SEED_VARIABLE = "LLMBOOK_EXERCISE_SEED"  # pin the hidden cases' seed (default: a fresh one per check)


@dataclass
class CheckResult:
    """The verdict of one `run_check`: pass, fail (a wrong answer) or error (the answer's code broke)."""

    name: str
    passed: bool
    n_cases: int
    message: str
    status: str = "pass"

    def __bool__(self) -> bool:
        return self.passed


class TimeLimitExceeded(BaseException):
    """Raised inside the reader's code when its time is up (a BaseException, so `except Exception` in
    the reader's code cannot swallow it)."""


@contextmanager
def _time_limit(seconds: float):
    # SIGALRM interrupts pure-Python loops; it exists only in the main thread on POSIX, which is where a
    # notebook kernel runs cells. Elsewhere the code runs unlimited rather than not at all.
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise TimeLimitExceeded

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _resolve(dotted: str) -> Any:
    """The function, method or class named by `dotted` (the longest importable prefix, then attributes)."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ValueError(f"cannot find {dotted!r} to watch for")


def _call_signatures(dotted: str) -> tuple[Any, Any, str | None]:
    """(code object, builtin, tensor-method name) by which a call to `dotted` shows up in a profile hook."""
    obj = _resolve(dotted)
    if inspect.isclass(obj):
        obj = obj.forward if hasattr(obj, "forward") else obj.__init__
    obj = inspect.unwrap(obj)
    code = getattr(obj, "__code__", None)
    if code is not None:
        return code, None, None
    method = obj.__name__ if dotted.startswith("torch.Tensor.") else None
    return None, obj, method


@contextmanager
def _watch_calls(forbidden: tuple[str, ...], seen: list[str]):
    # A profile hook sees every call, however the function was imported (module.f, or `from m import f`).
    if not forbidden:
        yield
        return
    targets = {dotted: _call_signatures(dotted) for dotted in forbidden}
    codes = {code: dotted for dotted, (code, _, _) in targets.items() if code is not None}
    builtins = {id(fn): dotted for dotted, (_, fn, _) in targets.items() if fn is not None}
    methods = {name: dotted for dotted, (_, _, name) in targets.items() if name is not None}

    def hook(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            seen.append(codes[frame.f_code])
        elif event == "c_call":
            if id(arg) in builtins:
                seen.append(builtins[id(arg)])
            elif methods and isinstance(getattr(arg, "__self__", None), torch.Tensor):
                if arg.__name__ in methods:
                    seen.append(methods[arg.__name__])

    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        yield
    finally:
        sys.setprofile(previous)


def _clone(value: Any) -> Any:
    # Give the reader's function its own copies so an in-place edit cannot spoil the check.
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _argument_names(ex: Exercise, case: Case) -> list[str]:
    try:
        params = list(inspect.signature(ex.reference).parameters)
    except (TypeError, ValueError):
        params = []
    names = [params[i] if i < len(params) else f"argument {i + 1}" for i in range(len(case.args))]
    return names + list(case.kwargs)


def _mutation(ex: Exercise, case: Case, given: tuple, given_kwargs: dict) -> str | None:
    values = list(case.args) + list(case.kwargs.values())
    after = list(given) + list(given_kwargs.values())
    for name, before, now in zip(_argument_names(ex, case), values, after, strict=True):
        if compare(before, now, atol=0.0, rtol=0.0):
            return (
                f"your function changed its input `{name}` in place; leave the inputs as they were "
                "(work on a copy, e.g. x = x.clone(), or use out-of-place operations)"
            )
    return None


def _describe_inputs(case: Case) -> str:
    parts = [show(a, 160) for a in case.args] + [f"{k}={show(v, 160)}" for k, v in case.kwargs.items()]
    return ", ".join(parts) or "(none)"


def _where(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    frame = frames[-1]
    return f"\n   (at line {frame.lineno}: {frame.line})"


def _hint_line(ex: Exercise) -> str:
    more = f'  (hint("{ex.name}") gives more)' if len(ex.hints) > 1 else ""
    return f"   hint: {ex.hint}{more}"


def _not_answered(ex: Exercise, n: int) -> CheckResult:
    what = (
        "replace `...` with your number"
        if ex.takes_value
        else "replace `raise NotImplementedError` with your code"
    )
    msg = f"{FAIL_MARK} {ex.name}: not answered yet — {what}, then run this cell again.\n{_hint_line(ex)}"
    return CheckResult(ex.name, False, n, msg, "fail")


def _seed(seed: int | None) -> int:
    if seed is not None:
        return seed
    pinned = os.environ.get(SEED_VARIABLE)
    return int(pinned) if pinned else secrets.randbelow(2**31)


def _all_cases(ex: Exercise, seed: int) -> list[tuple[str, Case]]:
    shown = ex.cases()
    labelled = [
        (f"case {i} of {len(shown)}" + (f" ({c.note})" if c.note else ""), c) for i, c in enumerate(shown, 1)
    ]
    hidden = ex.hidden_cases(seed)
    labelled += [
        (f"hidden case {i} of {len(hidden)}" + (f" (like: {c.note})" if c.note else "") + f", seed {seed}", c)
        for i, c in enumerate(hidden, 1)
    ]
    return labelled


def _run_case(
    ex: Exercise, fn: Callable[..., Any], case: Case, budget: float, watch: bool
) -> tuple[Any, list[str], float]:
    args, kwargs = _clone(case.args), _clone(case.kwargs)
    called: list[str] = []
    start = time.perf_counter()
    with _time_limit(budget), _watch_calls(ex.forbid if watch else (), called):
        actual = fn(*args, **kwargs)
    elapsed = time.perf_counter() - start
    if not ex.mutates:
        problem = _mutation(ex, case, args, kwargs)
        if problem:
            raise _Mutated(problem)
    return actual, called, elapsed


class _Mutated(Exception):
    pass


def _judge(ex: Exercise, case: Case, actual: Any) -> str | None:
    atol = case.atol if case.atol is not None else ex.atol
    rtol = case.rtol if case.rtol is not None else ex.rtol
    return case.compare(case.expected, actual) if case.compare else compare(case.expected, actual, atol, rtol)


def _grade_case(
    ex: Exercise,
    fn: Callable[..., Any],
    label: str,
    case: Case,
    budget: float,
    time_limit: float,
    watch: bool,
) -> tuple[tuple[str, str] | None, float, Any]:
    """((message, status) of the failure or None, seconds the reader's code took, its answer) for one case."""
    head = f"{FAIL_MARK} {ex.name}:"
    inputs = "" if ex.takes_value else f"   input:    {_describe_inputs(case)}\n"
    try:
        actual, called, elapsed = _run_case(ex, fn, case, budget, watch)
    except NotImplementedError:
        return (_not_answered(ex, 0).message, "fail"), 0.0, None
    except TimeLimitExceeded:
        return (
            (
                f"{head} {label} ran past the time limit of {time_limit:g} s for this exercise (an endless "
                f"loop, or far more work than needed); it was stopped.\n{inputs}{_hint_line(ex)}",
                "error",
            ),
            0.0,
            None,
        )
    except _Mutated as err:
        return (f"{head} {label} failed — {err}\n{inputs}{_hint_line(ex)}", "fail"), 0.0, None
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # the reader's code failed: report it, with where, instead of crashing
        what = f"{type(err).__name__}: {safe_str(err)}{_where(err)}"
        return (f"{head} {label} raised {what}\n{inputs}{_hint_line(ex)}", "error"), 0.0, None
    if called:
        message = f"{head} you called {called[0]}; write it yourself (this exercise is about building it)."
        return (f"{message}\n{_hint_line(ex)}", "fail"), elapsed, actual
    try:
        problem = _judge(ex, case, actual)
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # e.g. the answer's __eq__ or __bool__ raised
        problem = f"comparing your answer raised {type(err).__name__}: {safe_str(err)}"
    if not problem:
        return None, elapsed, actual
    if ex.takes_value:  # never the measured value itself: resubmitting it would pass
        return (f"{head} {_value_miss(case, actual, problem)}\n{_hint_line(ex)}", "fail"), elapsed, actual
    message = (
        f"{head} {label} failed — {problem}\n{inputs}   expected: {show(case.expected)}\n"
        f"   got:      {show(actual)}\n{_hint_line(ex)}"
    )
    return (message, "fail"), elapsed, actual


def _value_miss(case: Case, actual: Any, problem: str) -> str:
    """Why a predicted or measured value was refused, without giving the value away."""
    number = as_number(actual)
    if not problem.startswith("values differ") or not isinstance(number, numbers.Real):
        return f"your answer does not fit the question ({case.note}) — {problem}"
    return f"your answer {show_number(number)} is {describe_miss(case.expected, float(number))} ({case.note})"


def _grade(ex: Exercise, fn: Callable[..., Any], seed: int, time_limit: float, watch: bool) -> CheckResult:
    try:
        with torch.random.fork_rng(devices=[]):  # references that initialise modules must not move the
            cases = _all_cases(ex, seed)  # reader's global random state
    except Exception as err:  # a bug in the exercise's own cases: say so rather than crash the notebook
        msg = (
            f"{FAIL_MARK} {ex.name}: the checker could not build its cases ({type(err).__name__}: "
            f"{safe_str(err)}). This is a bug in llmbook's exercise, not in your answer; please report it."
        )
        return CheckResult(ex.name, False, 0, msg, "error")
    n, budget, actual = len(cases), time_limit, None
    if not n:  # nothing was checked, so nothing passed
        msg = (
            f"{FAIL_MARK} {ex.name}: the checker has no cases for this exercise, so it cannot grade it. "
            "This is a bug in llmbook's exercise, not in your answer; please report it."
        )
        return CheckResult(ex.name, False, 0, msg, "error")
    for label, case in cases:
        failure, elapsed, actual = _grade_case(ex, fn, label, case, budget, time_limit, watch)
        if failure:
            return CheckResult(ex.name, False, n, *failure)
        budget -= elapsed
    if ex.takes_value:
        return CheckResult(
            ex.name, True, n, f"{PASS_MARK} {ex.name}: {_agreement(ex, cases[0][1], actual)}", "pass"
        )
    shown = len(ex.cases())
    detail = (
        f"all {n} cases pass" if n == shown else f"all {n} cases pass ({shown} shown, {n - shown} hidden)"
    )
    return CheckResult(ex.name, True, n, f"{PASS_MARK} {ex.name}: {detail}", "pass")


def _agreement(ex: Exercise, case: Case, answer: Any) -> str:
    def number(value: Any) -> str:
        return f"{value:.6g}" if isinstance(value, float) else show(value, 60)

    rtol = case.rtol if case.rtol is not None else ex.rtol
    within = "" if isinstance(case.expected, int) or rtol < 1e-6 else f" (within {rtol * 100:g}%)"
    return f"your answer {number(answer)} agrees with the measured value {number(case.expected)}{within}"


def run_check(
    name: str,
    answer: Any,
    *,
    seed: int | None = None,
    time_limit: float | None = None,
    watch_calls: bool = True,
) -> CheckResult:
    """Grade `answer` (a function, or a value for predict/experiment) on exercise `name`; never raises for
    a wrong answer. `seed` pins the hidden cases; `watch_calls=False` lets the package's own reference
    (which may call the functions a reader must not) be graded in tests."""
    ex = get_exercise(name)
    if ex.takes_value:
        if answer is Ellipsis or answer is None:
            return _not_answered(ex, 1)
        value = answer
        answer = lambda: value  # noqa: E731 - a value is graded as the function that returns it
    elif not callable(answer):
        msg = (
            f'{FAIL_MARK} {name}: check expects your function here, e.g. check("{name}", my_function); '
            f"got {show(answer, 80)}.\n{_hint_line(ex)}"
        )
        return CheckResult(name, False, 0, msg, "fail")
    limit = ex.time_limit if time_limit is None else time_limit
    return _grade(ex, answer, _seed(seed), limit, watch_calls)


_ATTEMPTS: dict[str, int] = {}
_GRADE_NOTE = (
    "   (this check is feedback while you work; a course's grade comes from `python -m llmbook grade`, "
    "which runs your notebook again)"
)
_grade_note_shown = False


def attempts() -> dict[str, int]:
    """How many answers `check` has graded in this session, per exercise (not counting `...`)."""
    return dict(_ATTEMPTS)


def check(name: str, answer: Any) -> None:
    """Grade the reader's `answer` on exercise `name` and print the verdict (a pass, or the first failure)."""
    global _grade_note_shown
    result = run_check(name, answer)
    message = result.message
    if answer is not Ellipsis and answer is not None:
        _ATTEMPTS[name] = _ATTEMPTS.get(name, 0) + 1
        if not result.passed and get_exercise(name).takes_value:
            first, _, rest = message.partition("\n")
            message = f"{first} (attempt {_ATTEMPTS[name]})" + (f"\n{rest}" if rest else "")
    if not _grade_note_shown:
        _grade_note_shown = True
        message += "\n" + _GRADE_NOTE
    print(message)

"""The grading machinery behind every exercise notebook: cases, comparison, and readable verdicts."""

from __future__ import annotations

import importlib
import math
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

PASS_MARK = "✅"
FAIL_MARK = "❌"


@dataclass
class Case:
    """One input to an exercise: positional/keyword arguments and the output a correct answer gives."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    expected: Any = None
    note: str = ""
    atol: float | None = None
    rtol: float | None = None
    # Optional custom judge: (expected, actual) -> None if fine, else a sentence saying what differs.
    compare: Callable[[Any, Any], str | None] | None = None


@dataclass
class Exercise:
    """A registered exercise: how to make its cases, a reference solution, and a hint for the stuck."""

    name: str
    make_cases: Callable[[], Iterable[Case]]
    reference: Callable[..., Any]
    hint: str
    atol: float = 1e-5
    rtol: float = 1e-4

    def cases(self) -> list[Case]:
        return list(self.make_cases())


@dataclass
class CheckResult:
    """The verdict of one `run_check`: whether every case passed, and the message shown to the reader."""

    name: str
    passed: bool
    n_cases: int
    message: str

    def __bool__(self) -> bool:
        return self.passed


_REGISTRY: dict[str, Exercise] = {}


def exercise(name: str, *, reference: Callable[..., Any], hint: str, atol: float = 1e-5, rtol: float = 1e-4):
    """Decorator: register a case generator under `name` ("NN.short_name"), with its reference and hint."""

    def decorate(make_cases: Callable[[], Iterable[Case]]) -> Callable[[], Iterable[Case]]:
        if name in _REGISTRY:
            raise ValueError(f"exercise {name!r} is registered twice")
        _REGISTRY[name] = Exercise(name, make_cases, reference, hint, atol, rtol)
        return make_cases

    return decorate


def _chapter_module(name: str) -> str:
    chapter, _, rest = name.partition(".")
    if not (chapter.isdigit() and len(chapter) == 2 and rest):
        raise ValueError(
            f"exercise names look like '03.masked_softmax' (chapter number, dot, name); got {name!r}"
        )
    return f"llmbook.exercises.ch{chapter}"


def get_exercise(name: str) -> Exercise:
    """Look up a registered exercise by name, importing its chapter's module on first use."""
    if name not in _REGISTRY:
        module = _chapter_module(name)
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            raise ValueError(
                f"no exercises are defined for chapter {name[:2]} (no module {module})"
            ) from None
    if name not in _REGISTRY:
        known = sorted(n for n in _REGISTRY if n.startswith(name[:3]))
        raise ValueError(f"unknown exercise {name!r}; this chapter has: {', '.join(known) or 'none'}")
    return _REGISTRY[name]


def all_exercises() -> list[Exercise]:
    """Every exercise of every chapter (imports each chapter's exercise module)."""
    import pkgutil

    import llmbook.exercises as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("ch") and info.name[2:].isdigit():
            importlib.import_module(f"llmbook.exercises.{info.name}")
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


# ----------------------------------------------------------------------------------------------
# Comparison: returns None when equal enough, else one sentence describing the first difference.


def compare(expected: Any, actual: Any, atol: float = 1e-5, rtol: float = 1e-4) -> str | None:
    """Compare an answer with the expected value; None if they agree, else what differs."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            return f"expected a torch.Tensor, got {type(actual).__name__}"
        if tuple(actual.shape) != tuple(expected.shape):
            return f"shape differs: expected {tuple(expected.shape)}, got {tuple(actual.shape)}"
        if expected.dtype == torch.bool or not (expected.is_floating_point() or expected.is_complex()):
            if actual.is_floating_point() or (expected.dtype == torch.bool) != (actual.dtype == torch.bool):
                return f"dtype differs: expected {expected.dtype}, got {actual.dtype}"
            if not torch.equal(actual.to(expected.dtype).cpu(), expected.cpu()):
                where = (actual.to(expected.dtype).cpu() != expected.cpu()).nonzero()[0].tolist()
                return f"values differ, first at index {tuple(where)}"
            return None
        if not actual.is_floating_point():
            return f"expected a floating-point tensor ({expected.dtype}), got {actual.dtype}"
        a, e = actual.detach().cpu().to(torch.float64), expected.detach().cpu().to(torch.float64)
        same_nonfinite = (a.isnan() & e.isnan()) | (a == e)
        close = torch.isclose(a, e, atol=atol, rtol=rtol) | same_nonfinite
        if not bool(close.all()):
            idx = tuple((~close).nonzero()[0].tolist())
            return (
                f"values differ, first at index {idx}: expected {e[idx].item():.6g}, got {a[idx].item():.6g} "
                f"(max abs difference {(a - e).abs().nan_to_num(math.inf).max().item():.3g})"
            )
        return None
    if isinstance(expected, bool) or expected is None or isinstance(expected, (str, bytes)):
        return None if actual == expected and type(actual) is type(expected) else "values differ"
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        if not isinstance(actual, (int, float)) or isinstance(actual, bool):
            if isinstance(actual, torch.Tensor) and actual.numel() == 1:
                actual = actual.item()
            else:
                return f"expected a number, got {type(actual).__name__}"
        if isinstance(expected, int) and isinstance(actual, int):
            return None if actual == expected else "values differ"
        if math.isclose(float(actual), float(expected), rel_tol=rtol, abs_tol=atol):
            return None
        if math.isnan(float(expected)) and math.isnan(float(actual)):
            return None
        return "values differ"
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"expected a dict, got {type(actual).__name__}"
        if set(actual) != set(expected):
            missing, extra = set(expected) - set(actual), set(actual) - set(expected)
            missing_keys, extra_keys = sorted(map(repr, missing))[:5], sorted(map(repr, extra))[:5]
            return f"keys differ (missing {missing_keys}, unexpected {extra_keys})"
        for key in expected:
            problem = compare(expected[key], actual[key], atol, rtol)
            if problem:
                return f"at key {key!r}: {problem}"
        return None
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)):
            return f"expected a {type(expected).__name__}, got {type(actual).__name__}"
        if len(actual) != len(expected):
            return f"length differs: expected {len(expected)}, got {len(actual)}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            problem = compare(e, a, atol, rtol)
            if problem:
                return f"at position {i}: {problem}"
        return None
    return None if actual == expected else "values differ"


def _show(value: Any, limit: int = 300) -> str:
    if isinstance(value, torch.Tensor):
        with torch.no_grad():
            body = repr(value.detach().cpu())
        shape = f"  # shape {tuple(value.shape)}, {value.dtype}"
        text = body if len(body) <= limit else body[: limit - 3] + "..."
        return text + shape
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_inputs(case: Case) -> str:
    parts = [_show(a, 160) for a in case.args] + [f"{k}={_show(v, 160)}" for k, v in case.kwargs.items()]
    return ", ".join(parts)


def _clone(value: Any) -> Any:
    # Give the reader's function its own copies so an in-place edit cannot spoil later cases.
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def run_check(name: str, fn: Callable[..., Any]) -> CheckResult:
    """Run `fn` on every case of exercise `name`; never raises for a wrong answer, returns the verdict."""
    ex = get_exercise(name)
    cases = ex.cases()
    n = len(cases)
    for i, case in enumerate(cases, start=1):
        label = f"case {i} of {n}" + (f" ({case.note})" if case.note else "")
        try:
            actual = fn(*_clone(case.args), **_clone(case.kwargs))
        except NotImplementedError:
            msg = (
                f"{FAIL_MARK} {name}: not implemented yet — replace `raise NotImplementedError` "
                f"with your code, then run this cell again.\n   hint: {ex.hint}"
            )
            return CheckResult(name, False, n, msg)
        except Exception as err:  # the reader's code failed: report it, with where, instead of crashing
            frame = traceback.extract_tb(err.__traceback__)[-1]
            msg = (
                f"{FAIL_MARK} {name}: {label} raised {type(err).__name__}: {err}\n"
                f"   (at line {frame.lineno}: {frame.line})\n"
                f"   input:    {_describe_inputs(case)}\n"
                f"   hint: {ex.hint}"
            )
            return CheckResult(name, False, n, msg)
        atol = case.atol if case.atol is not None else ex.atol
        rtol = case.rtol if case.rtol is not None else ex.rtol
        problem = (
            case.compare(case.expected, actual)
            if case.compare
            else compare(case.expected, actual, atol, rtol)
        )
        if problem:
            msg = (
                f"{FAIL_MARK} {name}: {label} failed — {problem}\n"
                f"   input:    {_describe_inputs(case)}\n"
                f"   expected: {_show(case.expected)}\n"
                f"   got:      {_show(actual)}\n"
                f"   hint: {ex.hint}"
            )
            return CheckResult(name, False, n, msg)
    return CheckResult(name, True, n, f"{PASS_MARK} {name}: all {n} cases pass")


def check(name: str, fn: Callable[..., Any]) -> None:
    """Grade the reader's `fn` on exercise `name` and print the verdict (a pass, or the first failure)."""
    print(run_check(name, fn).message)


def iter_case_names(name: str) -> Iterator[str]:
    """The notes of an exercise's cases, for documentation and tests."""
    for case in get_exercise(name).cases():
        yield case.note

"""The exercise registry: what an exercise is, how a chapter module declares one, and progressive hints.

A chapter module `llmbook/exercises/chNN.py` declares each exercise with the `exercise` decorator on a
generator of the cases a reader's answer is graded on:

    @exercise("03.masked_softmax", reference=masked_softmax_reference,
              hint=("first, gentle hint", "a stronger one", "nearly the answer"),
              kind="implement", forbid=("llmbook.attention.scaled_dot_product_attention",))
    def _cases():
        yield Case((scores, mask), expected=masked_softmax_reference(scores, mask), note="a 4 x 4 pattern")

Arguments of `exercise` (all but name, reference and hint are optional):
- `reference`: the correct function (or, for predict/experiment, a function of no arguments giving the
  measured value); the tests check it passes, and hidden cases take their expected values from it.
- `hint`: one string or a sequence of ever stronger ones; `hint(name)` reveals them one call at a time.
  A debug exercise's strongest hint points at the broken lines ("look at line 4, `...`"), quoting only the
  code the notebook shows, never the fixed code (tests/test_exercises.py checks this).
- `kind`: "implement" (write a function), "debug" (fix the plausible broken function in `broken`),
  "derive" (a function whose result checks a derivation numerically), "predict" (a number computed by
  hand, compared with the value measured from the package) or "experiment" (a number read off a small run).
  Predict and experiment answers are values, `check(name, 0.25)`; the other kinds are functions.
- `hidden`: a function of a seeded `torch.Generator` yielding extra cases that are graded but never shown
  (expected values from `reference`). By default each shown case with float tensors gets a variant with
  those tensors' entries shuffled along the last axis; `hidden=None` turns hidden cases off.
- `forbid`: dotted names of functions the reader is asked to write; calling them is reported.
- `mutates`: True when the exercise's contract is to change its inputs in place (otherwise an answer that
  changes its inputs fails). `time_limit`: seconds for all of the reader's calls together.
- `broken`: for a debug exercise, the broken function the notebook shows (the tests check it fails).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

PASS_MARK = "✅"
FAIL_MARK = "❌"
KINDS = ("implement", "debug", "derive", "predict", "experiment")
VALUE_KINDS = ("predict", "experiment")
DEFAULT_TIME_LIMIT = 20.0


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


def draw(generator: torch.Generator, low: int, high: int) -> int:
    """A Python int in [low, high) from `generator`: hidden cases draw their sizes with it."""
    return int(torch.randint(low, high, (1,), generator=generator))


def shuffled_variants(cases: list[Case], generator: torch.Generator) -> Iterable[Case]:
    """Hidden cases: each shown case with its float tensors' entries shuffled along the last axis."""

    def shuffle(value: Any, changed: list[bool]) -> Any:
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and value.dim()
            and value.shape[-1] > 1
        ):
            order = torch.rand(value.shape, generator=generator).argsort(dim=-1)
            shuffled = value.gather(-1, order)
            if torch.equal(shuffled, value):  # so whether a variant differs depends on the data, not the seed
                shuffled = value.roll(1, dims=-1)
            changed.append(not torch.equal(shuffled, value))
            return shuffled
        if isinstance(value, (list, tuple)):
            return type(value)(shuffle(v, changed) for v in value)
        return value

    for case in cases:
        changed: list[bool] = []
        args, kwargs = shuffle(case.args, changed), {k: shuffle(v, changed) for k, v in case.kwargs.items()}
        if any(changed):  # a variant equal to the shown case would test nothing new
            yield Case(args, kwargs, note=case.note, atol=case.atol, rtol=case.rtol, compare=case.compare)


@dataclass
class Exercise:
    """A registered exercise: its cases, reference solution, hints, kind, and what the checker guards."""

    name: str
    make_cases: Callable[[], Iterable[Case]]
    reference: Callable[..., Any]
    hints: tuple[str, ...]
    kind: str = "implement"
    atol: float = 1e-5
    rtol: float = 1e-4
    hidden: Callable[[torch.Generator], Iterable[Case]] | str | None = "shuffle"
    forbid: tuple[str, ...] = ()
    mutates: bool = False
    time_limit: float = DEFAULT_TIME_LIMIT
    broken: Callable[..., Any] | None = None

    @property
    def hint(self) -> str:
        """The first (gentlest) hint, printed with every failure."""
        return self.hints[0]

    @property
    def takes_value(self) -> bool:
        """Whether the answer is a value (predict, experiment) rather than a function."""
        return self.kind in VALUE_KINDS

    def cases(self) -> list[Case]:
        """The cases shown in the documentation: fixed inputs, fixed seeds."""
        return list(self.make_cases())

    def hidden_cases(self, seed: int) -> list[Case]:
        """Extra graded cases drawn from `seed`, with expected values computed by the reference."""
        if self.hidden is None or self.takes_value:
            return []
        generator = torch.Generator().manual_seed(seed)
        drawn = (
            shuffled_variants(self.cases(), generator) if self.hidden == "shuffle" else self.hidden(generator)
        )
        cases = list(drawn)
        for case in cases:
            if case.expected is None:
                case.expected = self.reference(*case.args, **case.kwargs)
        return cases


_REGISTRY: dict[str, Exercise] = {}


def exercise(
    name: str,
    *,
    reference: Callable[..., Any],
    hint: str | Sequence[str],
    kind: str = "implement",
    atol: float = 1e-5,
    rtol: float = 1e-4,
    hidden: Callable[[torch.Generator], Iterable[Case]] | str | None = "shuffle",
    forbid: Sequence[str] = (),
    mutates: bool = False,
    time_limit: float = DEFAULT_TIME_LIMIT,
    broken: Callable[..., Any] | None = None,
):
    """Decorator: register a case generator under `name` ("NN.short_name"); see the module docstring."""
    _chapter_module(name)
    if kind not in KINDS:
        raise ValueError(f"exercise {name!r}: kind must be one of {KINDS}, got {kind!r}")
    hints = (hint,) if isinstance(hint, str) else tuple(hint)
    if not hints or not all(isinstance(h, str) and h for h in hints):
        raise ValueError(f"exercise {name!r}: hint must be a non-empty string or a sequence of them")
    if kind == "debug" and broken is None:
        raise ValueError(f"debug exercise {name!r} needs the broken function it shows (broken=...)")

    def decorate(make_cases: Callable[[], Iterable[Case]]) -> Callable[[], Iterable[Case]]:
        if name in _REGISTRY:
            raise ValueError(f"exercise {name!r} is registered twice")
        _REGISTRY[name] = Exercise(
            name,
            make_cases,
            reference,
            hints,
            kind,
            atol,
            rtol,
            hidden,
            tuple(forbid),
            mutates,
            time_limit,
            broken,
        )
        return make_cases

    return decorate


def _chapter_module(name: str) -> str:
    chapter, _, rest = name.partition(".") if isinstance(name, str) else ("", "", "")
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
    import llmbook.exercises as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("ch") and info.name[2:].isdigit():
            importlib.import_module(f"llmbook.exercises.{info.name}")
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


_HINTS_SHOWN: dict[str, int] = {}


def next_hint(name: str) -> str:
    """The next hint of exercise `name`: the first on the first call, a stronger one on each call after."""
    ex = get_exercise(name)
    shown = _HINTS_SHOWN.get(name, 0)
    level = min(shown, len(ex.hints) - 1)
    _HINTS_SHOWN[name] = shown + 1
    text = f"hint {level + 1} of {len(ex.hints)} for {name}: {ex.hints[level]}"
    if level == len(ex.hints) - 1 and shown >= len(ex.hints) - 1:
        text += "\n   (that is the strongest hint; the solution notebook has a worked answer)"
    elif level < len(ex.hints) - 1:
        text += f'\n   (call hint("{name}") again for a stronger one)'
    return text


def hint(name: str) -> None:
    """Print the next hint for exercise `name`; each call gives a stronger one than the last."""
    print(next_hint(name))

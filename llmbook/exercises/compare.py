"""Strict comparison of an answer with the expected value, and safe display of whatever a reader returns.

`compare` returns None when the answer agrees, else one sentence naming the first difference. It is
strict where a loose check would let a wrong answer through: an integer question needs an integer
(numpy integers are fine, 13825.0 is not 13824), tensors must have the expected dtype (so unsigned
wrap-around and complex-against-real never compare equal), and a real number is never a complex one.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch


def _describe_type(value: Any) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _compare_tensors(expected: torch.Tensor, actual: Any, atol: float, rtol: float) -> str | None:
    if not isinstance(actual, torch.Tensor):
        return f"expected a torch.Tensor, got {_describe_type(actual)}"
    actual = actual.as_subclass(torch.Tensor)  # a subclass's overridden operators must not judge themselves
    if tuple(actual.shape) != tuple(expected.shape):
        return f"shape differs: expected {tuple(expected.shape)}, got {tuple(actual.shape)}"
    if actual.dtype != expected.dtype:
        return f"dtype differs: expected {expected.dtype}, got {actual.dtype}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if not (e.is_floating_point() or e.is_complex()):
        if not torch.equal(a, e):
            where = (a != e).nonzero()[0].tolist()
            return (
                f"values differ, first at index {tuple(where)}: expected {e[tuple(where)].item()}, "
                f"got {a[tuple(where)].item()}"
            )
        return None
    wide = torch.complex128 if e.is_complex() else torch.float64
    a, e = a.to(wide), e.to(wide)
    same_nonfinite = (a.isnan() & e.isnan()) | (a == e)
    close = torch.isclose(a, e, atol=atol, rtol=rtol) | same_nonfinite
    if bool(close.all()):
        return None
    idx = tuple((~close).nonzero()[0].tolist())
    return (
        f"values differ, first at index {idx}: expected {e[idx].item():.6g}, got {a[idx].item():.6g} "
        f"(max abs difference {(a - e).abs().nan_to_num(math.inf).max().item():.3g})"
    )


def as_number(actual: Any) -> Any:
    # A one-element tensor is a fine way to hand back a number; its dtype still decides int or float.
    if isinstance(actual, torch.Tensor) and actual.numel() == 1:
        if actual.is_complex():
            return complex(actual.item())
        return actual.item()
    return actual


def _compare_numbers(expected: int | float, actual: Any, atol: float, rtol: float) -> str | None:
    actual = as_number(actual)
    if isinstance(actual, bool) or not isinstance(actual, numbers.Number):
        return f"expected a number, got {_describe_type(actual)}"
    if not isinstance(actual, numbers.Real):
        return f"expected a real number, got the complex number {actual!r}"
    if isinstance(expected, int):
        if not isinstance(actual, numbers.Integral):
            return (
                f"expected an integer, got {_describe_type(actual)} {actual!r}: this question has an exact "
                "whole-number answer (use int(...) only if you are sure it is whole)"
            )
        return None if int(actual) == expected else f"values differ: expected {expected}, got {int(actual)}"
    value = float(actual)
    if math.isnan(expected) and math.isnan(value):
        return None
    if math.isclose(value, expected, rel_tol=rtol, abs_tol=atol):
        return None
    return f"values differ: expected {expected:.6g}, got {value:.6g}"


def _compare_sequences(expected: list | tuple, actual: Any, atol: float, rtol: float) -> str | None:
    if not isinstance(actual, (list, tuple)):
        return f"expected a {type(expected).__name__}, got {_describe_type(actual)}"
    if len(actual) != len(expected):
        return f"length differs: expected {len(expected)}, got {len(actual)}"
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        problem = compare(e, a, atol, rtol)
        if problem:
            return f"at position {i}: {problem}"
    return None


def _compare_dicts(expected: dict, actual: Any, atol: float, rtol: float) -> str | None:
    if not isinstance(actual, dict):
        return f"expected a dict, got {_describe_type(actual)}"
    if set(actual) != set(expected):
        missing, extra = set(expected) - set(actual), set(actual) - set(expected)
        missing_keys, extra_keys = sorted(map(repr, missing))[:5], sorted(map(repr, extra))[:5]
        return f"keys differ (missing {missing_keys}, unexpected {extra_keys})"
    for key in expected:
        problem = compare(expected[key], actual[key], atol, rtol)
        if problem:
            return f"at key {key!r}: {problem}"
    return None


def compare(expected: Any, actual: Any, atol: float = 1e-5, rtol: float = 1e-4) -> str | None:
    """Compare an answer with the expected value; None if they agree, else what differs."""
    if isinstance(expected, torch.Tensor):
        return _compare_tensors(expected, actual, atol, rtol)
    if isinstance(expected, bool) or expected is None or isinstance(expected, (str, bytes)):
        if type(actual) is not type(expected):
            return f"expected a {type(expected).__name__}, got {_describe_type(actual)}"
        return None if actual == expected else "values differ"
    if isinstance(expected, (int, float)):
        return _compare_numbers(expected, actual, atol, rtol)
    if isinstance(expected, dict):
        return _compare_dicts(expected, actual, atol, rtol)
    if isinstance(expected, (list, tuple)):
        return _compare_sequences(expected, actual, atol, rtol)
    if type(actual) is not type(expected):
        return f"expected a {_describe_type(expected)}, got {_describe_type(actual)}"
    return None if bool(actual == expected) else "values differ"


def describe_miss(expected: float, actual: float) -> str:
    """How far `actual` is from `expected`, in words that do not give `expected` away ("too high by
    about 3 times"): the direction and a rough factor (or orders of magnitude)."""
    if math.isnan(actual) or math.isinf(actual):
        return "not a finite number"
    if expected == 0 or actual == 0:
        return "too high" if actual > expected else "too low"
    if (actual > 0) != (expected > 0):
        return "of the wrong sign"
    ratio = actual / expected
    direction = "too high" if ratio > 1 else "too low"
    factor = max(ratio, 1 / ratio)
    if factor < 1.1:
        return f"slightly {direction} (off by less than 10%)"
    if factor < 2:
        return f"{direction}, by less than a factor of 2"
    if factor < 10:
        return f"{direction}, by a factor of about {round(factor)}"
    orders = round(math.log10(factor))
    if orders == 1:
        return f"{direction}, by about 10 times"
    return f"{direction}, by about 10^{orders} times ({orders} orders of magnitude)"


def show_number(value: float) -> str:
    """A number as a reader typed it: integers in full, others to 6 significant digits."""
    return str(int(value)) if isinstance(value, numbers.Integral) else f"{float(value):.6g}"


def show(value: Any, limit: int = 300) -> str:
    """A short printable form of any value; never raises, even when the value's own repr does."""
    try:
        if isinstance(value, torch.Tensor):
            with torch.no_grad():
                body = repr(value.detach().cpu().as_subclass(torch.Tensor))
            suffix = f"  # shape {tuple(value.shape)}, {value.dtype}"
        else:
            body, suffix = repr(value), ""
        if not isinstance(body, str):
            raise TypeError(f"__repr__ returned {type(body).__name__}, not str")
    except Exception as err:  # the reader's object failed to describe itself: say so instead of crashing
        return f"<a {_describe_type(value)} whose repr raised {type(err).__name__}: {safe_str(err)}>"
    text = body if len(body) <= limit else body[: limit - 3] + "..."
    return text + suffix


def safe_str(value: Any) -> str:
    """str(value), or a note that it failed: an exception's own message may be the reader's broken code."""
    try:
        text = str(value)
        return text if isinstance(text, str) else repr(type(value))
    except Exception as err:
        return f"<str() raised {type(err).__name__}>"

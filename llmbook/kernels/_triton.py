"""Triton plumbing shared by the kernels: optional import, interpreter detection, lazy `jit`, launch sizes.

Kernels are built lazily, on their first launch, once per mode (compiled / interpreted). Importing
`llmbook.model` does not import Triton; importing `llmbook.kernels` does, and Triton itself fixes the
mode of its own library (tl.sum, tl.sigmoid ...) when *it* is imported, so on a CPU machine
`TRITON_INTERPRET=1` must be set before anything imports `triton` — `interpreter_ready()` tells whether
that happened.
"""

import os
import types
from collections.abc import Callable
from typing import Any

try:  # Triton is optional: without it every entry point falls back to (or insists on) the reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    # A stand-in so that `BLOCK: tl.constexpr` annotations still evaluate; the kernels never run.
    tl = types.SimpleNamespace(constexpr=object)
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON", "LazyKernel", "interpreter_on", "interpreter_ready", "jit", "next_power_of_2",
    "num_warps_for", "require_triton", "tl", "triton",
]


def interpreter_on() -> bool:
    """True when Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    if HAS_TRITON:
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def interpreter_ready() -> bool:
    """True when the interpreter is on AND Triton's own library (tl.sum, tl.sigmoid ...) was loaded under it.

    Triton decides at *its* import time whether its library functions are compiled or interpreted, so
    `TRITON_INTERPRET=1` must be set before anything in the process imports `triton`.
    """
    if not (HAS_TRITON and interpreter_on()):
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def require_triton(*tensors: Any) -> None:
    """Raise a clear error when a Triton kernel cannot run on these tensors here."""
    if not HAS_TRITON:
        raise RuntimeError(
            "Triton is not installed: `pip install triton` (Linux), or use the PyTorch reference instead"
        )
    for tensor in tensors:
        if tensor is None or tensor.is_cuda:
            continue
        if not interpreter_on():
            raise RuntimeError(
                "this Triton kernel got a CPU tensor but Triton's interpreter is off; move the tensors to a "
                "CUDA device, or set the environment variable TRITON_INTERPRET=1 before importing triton"
            )
        if not interpreter_ready():
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after this process had imported triton, so Triton's library is "
                "in compiled mode; set it before anything imports triton (first line of the script or "
                "notebook), or restart the process"
            )


class LazyKernel:
    """A `@triton.jit` kernel built on first launch, once per mode (compiled or interpreted)."""

    def __init__(self, fn: Callable[..., None]):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._built: dict[bool, Any] = {}

    def __getitem__(self, grid: Any) -> Any:
        mode = interpreter_on()
        if mode not in self._built:
            self._built[mode] = triton.jit(self.fn)  # triton.jit reads TRITON_INTERPRET right now
        return self._built[mode][grid]


def jit(fn: Callable[..., None]) -> LazyKernel:
    """Decorator used instead of `@triton.jit` by every kernel in this package."""
    return LazyKernel(fn)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (block sizes in Triton must be powers of two)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def num_warps_for(block_size: int) -> int:
    """A launch width that keeps each thread busy with a handful of elements of a row of `block_size`."""
    if block_size >= 32768:
        return 32
    if block_size >= 8192:
        return 16
    if block_size >= 2048:
        return 8
    return 4

"""Fused Triton kernels for the model's hot spots, each beside a plain PyTorch reference.

One file per op: `rmsnorm`, `rope`, `swiglu`, `cross_entropy`, `flash_attention`. Each holds the
`@triton.jit` kernels, a thin launcher, a `torch.autograd.Function` and a `*_reference` function.

Two ways to call them:

* the direct entry points (`rms_norm`, `rope`, `swiglu`, `cross_entropy`, `linear_cross_entropy`,
  `flash_attention`) always run the Triton kernels (on a CUDA tensor, or on a CPU tensor under Triton's
  interpreter, `TRITON_INTERPRET=1`), and raise a clear error where they cannot;
* the model dispatches through `active(tensor)`: when kernels are switched on — `ModelConfig(kernels=True)`
  or the `use_kernels()` context manager — AND Triton is importable AND the tensor is on a CUDA device (or
  the interpreter is on), the kernel runs; otherwise the PyTorch reference runs, with the same result.

Where a file and its entry point share a name, the package attribute is the function:
`llmbook.kernels.flash_attention(q, k, v)`; reach the file's internals with
`from llmbook.kernels.flash_attention import FlashAttentionFunction`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import sys
import types
from collections.abc import Iterator
from typing import Any

from torch import Tensor

# Entry points, loaded on first use (PEP 562) so `import llmbook.model` does not pay for importing Triton.
_LAZY = {
    "HAS_TRITON": "_triton",
    "interpreter_on": "_triton",
    "interpreter_ready": "_triton",
    "cross_entropy": "cross_entropy",
    "cross_entropy_reference": "cross_entropy",
    "linear_cross_entropy": "cross_entropy",
    "linear_cross_entropy_reference": "cross_entropy",
    "flash_attention": "flash_attention",
    "flash_attention_reference": "flash_attention",
    "rms_norm": "rmsnorm",
    "rms_norm_reference": "rmsnorm",
    "rope": "rope",
    "rope_qk": "rope",
    "rope_reference": "rope",
    "swiglu": "swiglu",
    "swiglu_reference": "swiglu",
}


def _bind_entry_points(file: str, module: types.ModuleType) -> None:
    for name, source in _LAZY.items():
        if source == file:
            globals()[name] = getattr(module, name)


class _KernelsPackage(types.ModuleType):
    """This package's module type: a submodule import must not shadow the entry point of the same name."""

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing llmbook.kernels.flash_attention makes Python set the package attribute `flash_attention`
        # to the *file's module*; keep (bind) the function of that name instead.
        if isinstance(value, types.ModuleType) and name in _LAZY and _LAZY[name] == name:
            _bind_entry_points(name, value)
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _KernelsPackage


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        _bind_entry_points(_LAZY[name], importlib.import_module(f"llmbook.kernels.{_LAZY[name]}"))
        return globals()[name]
    raise AttributeError(f"module 'llmbook.kernels' has no attribute {name!r}")


__all__ = [
    "HAS_TRITON",
    "active",
    "available",
    "cross_entropy",
    "cross_entropy_reference",
    "enabled",
    "flash_attention",
    "flash_attention_reference",
    "interpreter_on",
    "interpreter_ready",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_qk",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
    "use_kernels",
]

# A context variable rather than a module global: it is per thread / per asyncio task, and restored exactly.
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("llmbook_kernels_enabled", default=False)


@contextlib.contextmanager
def use_kernels(enabled: bool = True) -> Iterator[None]:
    """Within this block, model code dispatches to the Triton kernels where they can run (see `active`)."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    """True inside `use_kernels()` (or a `TransformerLM` built with `ModelConfig(kernels=True)`)."""
    return _ENABLED.get()


def available(tensor: Tensor) -> bool:
    """True when a Triton kernel can run on `tensor` here: Triton imports, and CUDA tensor or interpreter."""
    from llmbook.kernels import _triton

    return _triton.HAS_TRITON and (tensor.is_cuda or _triton.interpreter_ready())


def active(tensor: Tensor) -> bool:
    """True when model code should take the kernel path for `tensor`: kernels enabled and available."""
    return enabled() and available(tensor)

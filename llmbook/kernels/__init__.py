"""Fused Triton kernels for the model's hot spots (chapter 7), and the one switch that puts them in a model.

One file per op: `rmsnorm`, `rope`, `swiglu`, `cross_entropy`, `flash_attention`. Each holds the
`@triton.jit` kernels, a thin launcher, a `torch.autograd.Function` and the entry point (`rms_norm`,
`rope`, `swiglu`, `cross_entropy`, `linear_cross_entropy`, `flash_attention`), which always runs the
Triton kernels (on a CUDA tensor, or on a CPU tensor under Triton's interpreter, `TRITON_INTERPRET=1`)
and raises a clear error where it cannot.

Each kernel's reference is the package's own function, the one the chapters derive: `rms_norm_reference`
is `llmbook.norms.rms_norm`, `rope_reference` is `llmbook.position.rotate`, `swiglu_reference` is
`llmbook.ffn.swiglu`, `cross_entropy_reference` is `llmbook.loss.cross_entropy` (and
`linear_cross_entropy_reference` is `llmbook.loss.linear_cross_entropy`), and
`flash_attention_reference` is `llmbook.attention.grouped_attention`. Kernel and reference
follow the same dtype rule (stated in those modules): compute in float32, return the input's dtype.

The switch: `patch(model)` (what `ModelConfig(kernels=True)` does when the model is built) swaps the
model's RMSNorm, RoPE, attention and SwiGLU modules, and its LM head + loss, for kernel-backed ones, as
Liger-Kernel does; each runs its kernel where `available(tensor)` and the package code elsewhere. The
teaching modules themselves know nothing about kernels.

Importing this package imports Triton, and Triton fixes its mode (compiled or interpreted) when it is
first imported: on a CPU machine set `TRITON_INTERPRET=1` before importing `llmbook.kernels`.
"""

from llmbook.kernels._triton import HAS_TRITON, interpreter_on, interpreter_ready
from llmbook.kernels.cross_entropy import (
    cross_entropy,
    cross_entropy_reference,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from llmbook.kernels.flash_attention import flash_attention, flash_attention_reference
from llmbook.kernels.patch import available, patch  # noqa: I001 (after the entry points it dispatches to)
from llmbook.kernels.rmsnorm import rms_norm, rms_norm_reference
from llmbook.kernels.rope import rope, rope_qk, rope_reference
from llmbook.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "HAS_TRITON",
    "available",
    "cross_entropy",
    "cross_entropy_reference",
    "flash_attention",
    "flash_attention_reference",
    "interpreter_on",
    "interpreter_ready",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "patch",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_qk",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
]

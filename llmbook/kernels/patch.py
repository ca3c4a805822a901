"""`patch(model)`: swap a model's modules for kernel-backed ones, in place (the Liger-Kernel way).

Each kernel-backed class is a subclass of the teaching module it replaces, with the same parameters and
state dict; only `forward` (or `attend`) changes: it calls the Triton entry point of `llmbook.kernels`
where `available(tensor)` says the kernel can run, and the teaching module's own code everywhere else,
so a patched model gives the same results on any machine.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

import llmbook.kernels as K  # looked up at call time, so a test can count (or stand in for) the calls
from llmbook.attention import MultiHeadSelfAttention
from llmbook.ffn import SwiGLU
from llmbook.loss import linear_cross_entropy as package_linear_cross_entropy
from llmbook.norms import RMSNorm
from llmbook.position import RotaryAngles, RotaryEmbedding

__all__ = ["available", "patch", "kernel_linear_cross_entropy"]


def available(tensor: Tensor) -> bool:
    """True when a Triton kernel can run on `tensor` here: Triton imports, and CUDA tensor or interpreter."""
    from llmbook.kernels import _triton

    return _triton.HAS_TRITON and (tensor.is_cuda or _triton.interpreter_ready())


class KernelRMSNorm(RMSNorm):
    """RMSNorm through the fused Triton kernel where it can run."""

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """As `RMSNorm.forward`."""
        if K.available(x):
            return K.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class KernelSwiGLU(SwiGLU):
    """SwiGLU whose silu(gate) * value is the fused Triton kernel where it can run."""

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """As `SwiGLU.forward`."""
        if K.available(x):
            return self.down_proj(K.swiglu(self.gate_proj(x), self.up_proj(x)))
        return super().forward(x)


class KernelRotaryAngles(RotaryAngles):
    """RotaryAngles applied by the Triton RoPE kernel where it can run (half-split layout only)."""

    def __call__(
        self, x: Float[Tensor, "... seq head_dim"], positions: Tensor | None = None
    ) -> Float[Tensor, "... seq head_dim"]:
        """As `RotaryAngles.__call__`."""
        if not self.interleaved and K.available(x):
            return K.rope(x, self.cos, self.sin)
        return super().__call__(x, positions)


class KernelRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding whose angles rotate through the Triton kernel."""

    def angles(self, positions: Int[Tensor, "*batch seq"]) -> RotaryAngles:
        """As `RotaryEmbedding.angles`."""
        plain = super().angles(positions)
        return KernelRotaryAngles(plain.cos, plain.sin, plain.interleaved)


class KernelAttention(MultiHeadSelfAttention):
    """Attention through Triton flash attention where it can run and no extra mask is given."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool = True, mask: Tensor | None = None):
        """As `MultiHeadSelfAttention.attend`; the kernel reads the grouped k/v heads directly."""
        if mask is None and K.available(q):
            return K.flash_attention(q, k, v, causal=causal)
        return super().attend(q, k, v, causal, mask)


def kernel_linear_cross_entropy(
    hidden: Float[Tensor, "*rows d_model"],
    weight: Float[Tensor, "vocab d_model"],
    targets: Int[Tensor, "*rows"],
    ignore_index: int = -100,
    softcap: float | None = None,
) -> Float[Tensor, ""]:
    """`llmbook.loss.linear_cross_entropy` through the fused, chunked Triton LM head + loss where it can
    run; the package function where it cannot, or where the logits are soft-capped (the kernel does not)."""
    if softcap is None and K.available(hidden):
        device = hidden.device.type
        if torch.is_autocast_enabled(device):
            # As autocast runs the unfused head: the matmul in the autocast dtype (the loss is float32 in
            # the kernel). Autocast is switched off inside, where the kernel writes into float32 buffers.
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return K.linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, ignore_index)
        if hidden.dtype == weight.dtype:
            return K.linear_cross_entropy(hidden, weight, targets, ignore_index)
    return package_linear_cross_entropy(hidden, weight, targets, ignore_index, softcap)


# Exact classes only: a subclass someone wrote on purpose is left alone.
_REPLACEMENTS: dict[type, type] = {
    RMSNorm: KernelRMSNorm,
    SwiGLU: KernelSwiGLU,
    RotaryEmbedding: KernelRotaryEmbedding,
    MultiHeadSelfAttention: KernelAttention,
}


def patch(model: nn.Module) -> nn.Module:
    """Swap `model`'s RMSNorm, SwiGLU, RotaryEmbedding and attention modules (and its `head_loss`, the LM
    head + loss) for the kernel-backed ones, in place; parameters, buffers and state-dict keys stay."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        replacement = _REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
    if hasattr(model, "head_loss"):
        model.head_loss = kernel_linear_cross_entropy
    return model

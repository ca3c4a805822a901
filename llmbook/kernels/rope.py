"""Rotary position embedding (half-split layout) as a Triton kernel, beside its PyTorch reference.

One program handles one (batch, position): it loads that position's cos/sin row once and rotates every
head's pairs (dimension i with i + head_dim/2) in registers. The backward pass is the same kernel rotating
the other way (sin -> -sin), because a rotation's transpose is its inverse.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from llmbook.kernels._triton import jit, next_power_of_2, require_triton, tl
from llmbook.position import rotate as rope_reference  # the reference is the package's RoPE

__all__ = ["RoPEFunction", "rope", "rope_qk", "rope_reference"]


@jit
def _rope_kernel(
    x_ptr, out_ptr, cos_ptr, sin_ptr,
    x_stride_batch, x_stride_head, x_stride_seq,
    out_stride_batch, out_stride_head, out_stride_seq,
    cos_stride_batch, cos_stride_seq,
    seq_len, n_heads, half,
    INVERSE: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    batch = program // seq_len
    position = program % seq_len
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dim_mask = dims < half
    mask = (heads < n_heads) & dim_mask
    # One cos/sin row serves every head at this position: loaded once, broadcast over heads.
    angle_offset = batch * cos_stride_batch + position * cos_stride_seq + dims
    cos = tl.load(cos_ptr + angle_offset, mask=dim_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + angle_offset, mask=dim_mask, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    x_row = x_ptr + batch * x_stride_batch + position * x_stride_seq + heads * x_stride_head
    first = tl.load(x_row + dims, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(x_row + half + dims, mask=mask, other=0.0).to(tl.float32)
    out_row = out_ptr + batch * out_stride_batch + position * out_stride_seq + heads * out_stride_head
    tl.store(out_row + dims, (first * cos - second * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + half + dims, (second * cos + first * sin).to(out_ptr.dtype.element_ty), mask=mask)


def _as_4d(x: Tensor) -> Tensor:
    if x.dim() == 2:  # (seq, head_dim)
        return x[None, None]
    if x.dim() == 3:  # (batch, seq, head_dim)
        return x[:, None]
    if x.dim() == 4:  # (batch, heads, seq, head_dim)
        return x
    raise ValueError(
        f"rope expects x shaped (seq, d), (batch, seq, d) or (batch, heads, seq, d); got {tuple(x.shape)}"
    )


def _launch(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    x4 = _as_4d(x)
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    batch, n_heads, seq_len, head_dim = x4.shape
    half = head_dim // 2
    out = torch.empty((batch, n_heads, seq_len, head_dim), dtype=x.dtype, device=x.device)
    # cos/sin are (seq, half) shared by the batch (batch stride 0) or (batch, seq, half).
    cos_stride_batch = cos.stride(0) if cos.dim() == 3 else 0
    if out.numel() > 0:
        _rope_kernel[(batch * seq_len,)](
            x4, out, cos, sin,
            x4.stride(0), x4.stride(1), x4.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            cos_stride_batch, cos.stride(-2),
            seq_len, n_heads, half,
            INVERSE=inverse, BLOCK_HEADS=next_power_of_2(n_heads), BLOCK_HALF=next_power_of_2(half),
            num_warps=4,
        )
    return out.view(x.shape)


class RoPEFunction(torch.autograd.Function):
    """autograd.Function for half-split RoPE; cos/sin are constants (no gradient flows to them)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        cos, sin = ctx.saved_tensors
        return _launch(grad_out, cos, sin, inverse=True), None, None


def _check(x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"RoPE needs an even head_dim, got {x.shape[-1]}")
    half = x.shape[-1] // 2
    fits = cos.dim() in (2, 3) and cos.shape[-1] == half and cos.shape[-2] == x.shape[-2]
    if cos.shape != sin.shape or not fits:
        raise ValueError(
            f"cos and sin must be (seq, half) or (batch, seq, half) with seq={x.shape[-2]}, half={half}; "
            f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    if cos.dim() == 3 and (x.dim() < 3 or cos.shape[0] != x.shape[0]):
        raise ValueError(
            f"per-batch cos/sin {tuple(cos.shape)} need x's first axis to be the batch; x is {tuple(x.shape)}"
        )
    return cos.contiguous(), sin.contiguous()


def rope(
    x: Float[Tensor, "... seq head_dim"],
    cos: Float[Tensor, "*batch seq half"],
    sin: Float[Tensor, "*batch seq half"],
) -> Float[Tensor, "... seq head_dim"]:
    """Half-split RoPE through the Triton kernel (differentiable in x); as `llmbook.position.rotate`."""
    cos, sin = _check(x, cos, sin)
    require_triton(x, cos)
    return RoPEFunction.apply(x, cos, sin)


def rope_qk(
    q: Float[Tensor, "batch n_heads seq head_dim"],
    k: Float[Tensor, "batch n_kv_heads seq head_dim"],
    cos: Float[Tensor, "*batch seq half"],
    sin: Float[Tensor, "*batch seq half"],
) -> tuple[Float[Tensor, "batch n_heads seq head_dim"], Float[Tensor, "batch n_kv_heads seq head_dim"]]:
    """Rotate queries and keys (any head counts, e.g. grouped-query) at the same positions."""
    return rope(q, cos, sin), rope(k, cos, sin)

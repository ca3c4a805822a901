"""SwiGLU's elementwise core, silu(gate) * value, as a fused Triton kernel beside its PyTorch reference.

Unfused, PyTorch reads gate, writes silu(gate), reads it back with value and writes the product; the
backward pass does the same dance. The kernel reads each input once and writes each output once, and the
backward recomputes the sigmoid instead of storing it, trading a few flops for a whole tensor of memory.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from llmbook.ffn import swiglu as swiglu_reference  # the reference is the package's SwiGLU gate
from llmbook.kernels._triton import jit, require_triton, tl

__all__ = ["SwiGLUFunction", "swiglu", "swiglu_reference"]

# Elements per program along a row: wide enough for 128-bit loads, small enough to stay in registers.
BLOCK_SIZE = 1024


@jit
def _swiglu_forward_kernel(
    gate_ptr, value_ptr, out_ptr,
    gate_row_stride, value_row_stride, out_row_stride, n_cols,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    value = tl.load(value_ptr + row * value_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * value
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _swiglu_backward_kernel(
    grad_out_ptr, gate_ptr, value_ptr, grad_gate_ptr, grad_value_ptr,
    grad_out_row_stride, gate_row_stride, value_row_stride, grad_row_stride, n_cols,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    grad_out = tl.load(grad_out_ptr + row * grad_out_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    value = tl.load(value_ptr + row * value_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # silu'(g) = sig(g) * (1 + g * (1 - sig(g)))
    grad_gate = grad_out * value * sig * (1.0 + gate * (1.0 - sig))
    grad_value = grad_out * silu
    offsets = row * grad_row_stride + cols
    tl.store(grad_gate_ptr + offsets, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_value_ptr + offsets, grad_value.to(grad_value_ptr.dtype.element_ty), mask=mask)


def _as_rows(x: Tensor) -> Tensor:
    # Row views with unit column stride are used in place (e.g. the two halves of a fused up-projection).
    if x.dim() >= 2 and x.stride(-1) == 1:
        try:
            return x.view(-1, x.shape[-1])
        except RuntimeError:
            pass
    return x.reshape(-1, x.shape[-1]).contiguous()


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    return (n_rows, -(-n_cols // BLOCK_SIZE))


class SwiGLUFunction(torch.autograd.Function):
    """autograd.Function running the fused SwiGLU kernels; saves only gate and value."""

    @staticmethod
    def forward(ctx, gate: Tensor, value: Tensor) -> Tensor:
        shape = gate.shape
        gate_rows, value_rows = _as_rows(gate), _as_rows(value)
        n_rows, n_cols = gate_rows.shape
        out = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
        if out.numel() > 0:
            _swiglu_forward_kernel[_grid(n_rows, n_cols)](
                gate_rows, value_rows, out, gate_rows.stride(0), value_rows.stride(0), out.stride(0), n_cols,
                BLOCK_SIZE=BLOCK_SIZE, num_warps=4,
            )
        ctx.save_for_backward(gate_rows, value_rows)
        ctx.shape = shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        gate_rows, value_rows = ctx.saved_tensors
        n_rows, n_cols = gate_rows.shape
        grad_rows = _as_rows(grad_out)
        grad_gate = torch.empty((n_rows, n_cols), dtype=gate_rows.dtype, device=gate_rows.device)
        grad_value = torch.empty_like(grad_gate)
        if grad_gate.numel() > 0:
            _swiglu_backward_kernel[_grid(n_rows, n_cols)](
                grad_rows, gate_rows, value_rows, grad_gate, grad_value,
                grad_rows.stride(0), gate_rows.stride(0), value_rows.stride(0), grad_gate.stride(0), n_cols,
                BLOCK_SIZE=BLOCK_SIZE, num_warps=4,
            )
        return grad_gate.view(ctx.shape), grad_value.view(ctx.shape)


def swiglu(gate: Float[Tensor, "... d_ff"], value: Float[Tensor, "... d_ff"]) -> Float[Tensor, "... d_ff"]:
    """silu(gate) * value through the fused Triton kernels (differentiable); as `llmbook.ffn.swiglu`."""
    if gate.shape != value.shape:
        raise ValueError(
            f"gate and value must have the same shape; got {tuple(gate.shape)} and {tuple(value.shape)}"
        )
    if gate.dtype != value.dtype:
        raise TypeError(f"gate and value must share a dtype; got {gate.dtype} and {value.dtype}")
    if gate.dim() == 0:
        raise ValueError("swiglu needs at least one dimension (the hidden features)")
    require_triton(gate, value)
    return SwiGLUFunction.apply(gate, value)

"""RMSNorm as a fused Triton kernel (forward and backward), beside its plain PyTorch reference.

Forward: one program per row reads the row once, computes 1/rms in fp32 and writes y = x / rms * weight.
Backward: each program walks a contiguous slab of rows, writes dx row by row and keeps its own running
sum of the gain's gradient in registers; the per-program partial sums are added up at the end, so dW
costs no second pass over the (rows, d) activations.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from llmbook.kernels._triton import jit, next_power_of_2, num_warps_for, require_triton, tl
from llmbook.norms import rms_norm as rms_norm_reference  # the reference is the package's RMSNorm

__all__ = ["RMSNormFunction", "rms_norm", "rms_norm_reference"]


@jit
def _rms_norm_forward_kernel(
    x_ptr, weight_ptr, y_ptr, inv_rms_ptr,
    x_row_stride, y_row_stride, n_cols, eps,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2**31 on big activations
    cols = tl.arange(0, BLOCK_SIZE)  # the whole row fits in one block (BLOCK_SIZE >= n_cols)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # Masked lanes hold 0, so they add nothing to the sum; divide by the true width.
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(inv_rms_ptr + row, inv_rms)  # 4 bytes per row, saved for the backward pass
    # The package's dtype rule (llmbook.norms): round the normalised row to x's dtype, then apply the gain.
    normed = (x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    y = normed * weight
    tl.store(y_ptr + row * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _rms_norm_backward_kernel(
    grad_y_ptr, x_ptr, weight_ptr, inv_rms_ptr, grad_x_ptr, grad_weight_partial_ptr,
    grad_y_row_stride, x_row_stride, grad_x_row_stride,
    n_rows, n_cols, rows_per_program,
    BLOCK_SIZE: tl.constexpr,
):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    grad_weight_acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    row_start = program.to(tl.int64) * rows_per_program
    for offset in range(0, rows_per_program):
        row = row_start + offset
        row_mask = mask & (row < n_rows)  # the last program's slab may run past the final row
        grad_y = tl.load(grad_y_ptr + row * grad_y_row_stride + cols, mask=row_mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=row_mask, other=0.0).to(tl.float32)
        inv_rms = tl.load(inv_rms_ptr + row, mask=row < n_rows, other=0.0)
        x_hat = x * inv_rms
        grad_x_hat = grad_y * weight
        # d/dx of x * inv_rms(x): the direct term minus the projection onto x_hat (through the mean).
        projection = tl.sum(grad_x_hat * x_hat, axis=0) / n_cols
        grad_x = (grad_x_hat - x_hat * projection) * inv_rms
        grad_x_row = grad_x_ptr + row * grad_x_row_stride
        tl.store(grad_x_row + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=row_mask)
        grad_weight_acc += grad_y * x_hat
    tl.store(grad_weight_partial_ptr + program * n_cols + cols, grad_weight_acc, mask=mask)


def _as_rows(x: Tensor) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _backward_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        # A few programs per SM: enough to fill the GPU, few enough that the partial sums stay tiny.
        return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 4))  # the interpreter runs programs one after another


class RMSNormFunction(torch.autograd.Function):
    """autograd.Function running the Triton RMSNorm kernels; saves x and 1/rms (one fp32 per row)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        n_cols = x.shape[-1]
        x_rows = _as_rows(x)
        n_rows = x_rows.shape[0]
        out_dtype = torch.promote_types(x.dtype, weight.dtype)  # x's dtype, or the gain's if wider
        y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
        inv_rms = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = next_power_of_2(n_cols)
        weight_c = weight.contiguous()
        if n_rows > 0:
            _rms_norm_forward_kernel[(n_rows,)](
                x_rows, weight_c, y, inv_rms, x_rows.stride(0), y.stride(0), n_cols, eps,
                BLOCK_SIZE=block, num_warps=num_warps_for(block),
            )
        ctx.save_for_backward(x_rows, weight_c, inv_rms)
        ctx.x_shape = x.shape
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x_rows, weight, inv_rms = ctx.saved_tensors
        n_rows, n_cols = x_rows.shape
        grad_y_rows = _as_rows(grad_y)
        grad_x = torch.empty_like(x_rows)
        programs = _backward_programs(n_rows, x_rows.device)
        rows_per_program = -(-n_rows // programs) if n_rows else 0
        grad_weight_partial = torch.zeros((programs, n_cols), dtype=torch.float32, device=x_rows.device)
        block = next_power_of_2(n_cols)
        if n_rows > 0:
            _rms_norm_backward_kernel[(programs,)](
                grad_y_rows, x_rows, weight, inv_rms, grad_x, grad_weight_partial,
                grad_y_rows.stride(0), x_rows.stride(0), grad_x.stride(0),
                n_rows, n_cols, rows_per_program,
                BLOCK_SIZE=block, num_warps=num_warps_for(block),
            )
        grad_weight = grad_weight_partial.sum(dim=0).to(weight.dtype)
        return grad_x.reshape(ctx.x_shape), grad_weight, None


def rms_norm(
    x: Float[Tensor, "... d_model"], weight: Float[Tensor, " d_model"], eps: float = 1e-5
) -> Float[Tensor, "... d_model"]:
    """RMSNorm through the Triton kernels (differentiable); same result as `llmbook.norms.rms_norm`."""
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(
            f"weight must have shape ({x.shape[-1]},) to match x's last dim; got {tuple(weight.shape)}"
        )
    require_triton(x, weight)
    return RMSNormFunction.apply(x, weight, eps)

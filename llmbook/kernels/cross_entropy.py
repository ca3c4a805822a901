"""Cross-entropy from logits as Triton kernels that never store the softmax, plus a chunked fused LM head.

`cross_entropy`: one program per token row walks the vocabulary in blocks, keeping a running maximum and a
running sum of exponentials (an online log-sum-exp), so it reads the logits once and stores one float per
row (the log-sum-exp) for the backward pass, which recomputes each probability as exp(logit - lse).

`linear_cross_entropy`: the LM-head matmul fused with the loss, chunk of tokens by chunk. Each chunk's
logits are computed, turned *in place* into their gradient by the same kernel, and immediately folded into
the gradients of the hidden states and of the head weight, so the (tokens, vocab) logits never exist at once.
"""

import torch
from jaxtyping import Float, Int
from torch import Tensor

from llmbook.kernels._triton import jit, next_power_of_2, require_triton, tl

# The references are the package's own losses (the fused head's: materialise all logits, then the mean).
from llmbook.loss import cross_entropy as cross_entropy_reference
from llmbook.loss import linear_cross_entropy as linear_cross_entropy_reference

__all__ = [
    "CrossEntropyFunction",
    "LinearCrossEntropyFunction",
    "cross_entropy",
    "cross_entropy_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
]

MAX_BLOCK = 4096  # vocabulary entries per step of the online log-sum-exp


@jit
def _cross_entropy_forward_kernel(
    logits_ptr, targets_ptr, loss_ptr, lse_ptr, grad_scale_ptr,
    logits_row_stride, vocab_size, ignore_index,
    WRITE_GRAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(targets_ptr + row)
    is_ignored = target == ignore_index

    # Pass 1: online log-sum-exp. After each block, `running_sum` = sum(exp(seen - running_max)).
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, vocab_size, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        block = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(block, axis=0))
        # Rescale the old sum to the new maximum before adding this block's terms.
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(block - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)

    target_logit = tl.load(row_ptr + target, mask=target != ignore_index, other=0.0).to(tl.float32)
    loss = tl.where(is_ignored, 0.0, lse - target_logit)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)

    if WRITE_GRAD:
        # Pass 2 (fused LM head only): overwrite the logits with d(mean loss)/d(logits),
        # i.e. (softmax - onehot) * scale.
        scale = tl.where(is_ignored, 0.0, tl.load(grad_scale_ptr))
        for start in range(0, vocab_size, BLOCK_SIZE):
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < vocab_size
            block = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            grad = (tl.exp(block - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


@jit
def _cross_entropy_backward_kernel(
    logits_ptr, targets_ptr, lse_ptr, grad_scale_ptr, grad_logits_ptr,
    logits_row_stride, grad_row_stride, vocab_size, ignore_index,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    col_block = tl.program_id(1)
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    scale = tl.where(target == ignore_index, 0.0, tl.load(grad_scale_ptr))
    cols = col_block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < vocab_size
    logits = tl.load(logits_ptr + row * logits_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    # The probability is recomputed from the saved log-sum-exp: nothing of size (rows, vocab) was stored.
    grad = (tl.exp(logits - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
    grad_row_ptr = grad_logits_ptr + row * grad_row_stride
    tl.store(grad_row_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _block_size(vocab_size: int) -> int:
    return min(MAX_BLOCK, next_power_of_2(vocab_size))


def _check_targets(targets: Tensor, vocab_size: int, ignore_index: int) -> None:
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be integer token ids (torch.long), got {targets.dtype}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        raise ValueError(f"targets must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}")


def _forward_rows(
    logits_rows: Tensor, targets: Tensor, ignore_index: int, grad_scale: Tensor | None
) -> tuple[Tensor, Tensor]:
    n_rows, vocab_size = logits_rows.shape
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=logits_rows.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits_rows.device)
    write_grad = grad_scale is not None
    if n_rows > 0:
        block = _block_size(vocab_size)
        _cross_entropy_forward_kernel[(n_rows,)](
            logits_rows, targets, loss_rows, lse, grad_scale if write_grad else loss_rows,
            logits_rows.stride(0), vocab_size, ignore_index,
            WRITE_GRAD=write_grad, BLOCK_SIZE=block, num_warps=8 if block >= 2048 else 4,
        )
    return loss_rows, lse


class CrossEntropyFunction(torch.autograd.Function):
    """autograd.Function for mean cross-entropy via Triton; saves logits, targets and one lse per row."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        vocab_size = logits.shape[-1]
        logits_rows = logits.reshape(-1, vocab_size)
        if logits_rows.stride(-1) != 1:
            logits_rows = logits_rows.contiguous()
        targets_flat = targets.reshape(-1).contiguous()
        loss_rows, lse = _forward_rows(logits_rows, targets_flat, ignore_index, None)
        n_valid = (targets_flat != ignore_index).sum()
        ctx.save_for_backward(logits_rows, targets_flat, lse, n_valid)
        ctx.ignore_index = ignore_index
        ctx.logits_shape = logits.shape
        # Like F.cross_entropy: the mean over non-ignored tokens (nan when every token is ignored).
        return loss_rows.sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits_rows, targets, lse, n_valid = ctx.saved_tensors
        n_rows, vocab_size = logits_rows.shape
        grad_logits = torch.empty_like(logits_rows)
        # A 0-dim device tensor, read by the kernel: no host synchronisation for the scale.
        grad_scale = (grad_loss.float() / n_valid).reshape(1)
        if n_rows > 0:
            block = _block_size(vocab_size)
            _cross_entropy_backward_kernel[(n_rows, -(-vocab_size // block))](
                logits_rows, targets, lse, grad_scale, grad_logits,
                logits_rows.stride(0), grad_logits.stride(0), vocab_size, ctx.ignore_index,
                BLOCK_SIZE=block, num_warps=8 if block >= 2048 else 4,
            )
        return grad_logits.view(ctx.logits_shape), None, None


def cross_entropy(
    logits: Float[Tensor, "... vocab"], targets: Int[Tensor, "*rows"], ignore_index: int = -100
) -> Float[Tensor, ""]:
    """Mean cross-entropy (nats per non-ignored token) through the Triton kernels; fp32 result."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    _check_targets(targets, logits.shape[-1], ignore_index)
    require_triton(logits)
    return CrossEntropyFunction.apply(logits, targets, ignore_index)


def default_chunk_size(n_tokens: int, vocab_size: int, d_model: int) -> int:
    """Tokens per chunk so that one chunk of logits is about as large as the hidden states themselves."""
    chunks = max(1, -(-vocab_size // d_model))
    return max(1, -(-n_tokens // chunks))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Fused LM head + mean cross-entropy, chunked over tokens; gradients are computed during the forward."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_size: int
    ) -> Tensor:
        d_model = hidden.shape[-1]
        hidden_rows = hidden.reshape(-1, d_model)
        targets_flat = targets.reshape(-1).contiguous()
        n_rows = hidden_rows.shape[0]
        n_valid = (targets_flat != ignore_index).sum()
        need_grad_hidden, need_grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        write_grad = need_grad_hidden or need_grad_weight
        grad_scale = (1.0 / n_valid.float()).reshape(1)
        grad_hidden = torch.empty_like(hidden_rows) if need_grad_hidden else None
        # Accumulated chunk by chunk with addmm_ (each product is summed in fp32 inside the matmul; only the
        # running total is rounded to the weight's dtype), so no (vocab, d_model) temporary per chunk.
        grad_weight = torch.zeros_like(weight) if need_grad_weight else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            hidden_chunk = hidden_rows[start:end]
            logits_chunk = hidden_chunk @ weight.T  # (chunk, vocab): the only logits alive at any time
            loss_rows, _ = _forward_rows(
                logits_chunk, targets_flat[start:end], ignore_index, grad_scale if write_grad else None
            )
            loss_sum += loss_rows.sum()
            if need_grad_hidden:  # logits_chunk now holds d loss / d logits
                torch.mm(logits_chunk, weight, out=grad_hidden[start:end])
            if need_grad_weight:
                grad_weight.addmm_(logits_chunk.T, hidden_chunk)
            del logits_chunk
        ctx.save_for_backward(
            grad_hidden if need_grad_hidden else None, grad_weight if need_grad_weight else None
        )
        ctx.hidden_shape = hidden.shape
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_loss).view(ctx.hidden_shape)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: Float[Tensor, "... d_model"],
    weight: Float[Tensor, "vocab d_model"],
    targets: Int[Tensor, "*rows"],
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> Float[Tensor, ""]:
    """Mean cross-entropy of logits = hidden @ weight.T, chunk by chunk of tokens (never all at once)."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (vocab, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a dtype; got {hidden.dtype} and {weight.dtype}")
    _check_targets(targets, weight.shape[0], ignore_index)
    require_triton(hidden, weight)
    n_tokens = targets.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(n_tokens, weight.shape[0], weight.shape[1])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, chunk_size)

"""Causal flash attention (forward and backward) in Triton, with grouped-query heads, beside its reference.

Attention's textbook form builds a (seq, seq) score matrix, softmaxes it and multiplies by V: O(seq^2)
memory traffic. Flash attention never writes that matrix. Each program owns a tile of BLOCK_M queries,
streams the keys and values past it BLOCK_N at a time, and keeps a running row maximum `m`, running
softmax denominator `l` and running output `acc` in registers (the online softmax). It stores the output
and one log-sum-exp per query row; the backward pass recomputes each score tile from Q, K and that
log-sum-exp instead of reading a stored probability matrix. It does so in both of its kernels: the dK/dV
kernel (a key tile, walking the query tiles) and the dQ kernel (a query tile, walking the key tiles) each
rebuild S = QK^T, P and dP = dO V^T, so that neither needs atomic additions.

Scores are kept in base-2 units (scaled by log2(e)) so the kernels can use the cheaper exp2.
Grouped-query attention: query head h reads key/value head h // (n_heads // n_kv_heads); the dK/dV kernel
for one key/value head loops over the query heads of its group, so no key/value tensor is ever repeated.
Causal masking is aligned bottom-right: with q_len queries and k_len >= q_len keys (a KV cache), query i
may see keys j <= i + (k_len - q_len).
"""

import math

import torch
from jaxtyping import Float
from torch import Tensor

from llmbook.attention import grouped_attention as flash_attention_reference  # the package's attention
from llmbook.kernels._triton import interpreter_on, jit, next_power_of_2, require_triton, tl

__all__ = ["FlashAttentionFunction", "flash_attention", "flash_attention_reference"]

LOG2_E = 1.4426950408889634


@jit
def _flash_forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    q_stride_b, q_stride_h, q_stride_s,
    k_stride_b, k_stride_h, k_stride_s,
    v_stride_b, v_stride_h, v_stride_s,
    o_stride_b, o_stride_h, o_stride_s,
    n_heads, group_size, q_len, k_len, head_dim, scale_log2,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    kv_head = head // group_size

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_in_block = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < q_len
    dim_mask = dims < head_dim

    q_base = q_ptr + batch * q_stride_b + head * q_stride_h
    k_base = k_ptr + batch * k_stride_b + kv_head * k_stride_h
    v_base = v_ptr + batch * v_stride_b + kv_head * v_stride_h
    q = tl.load(q_base + rows[:, None] * q_stride_s + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)

    # Online-softmax state per query row: running max, running denominator, running (unnormalised) output.
    row_max = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    causal_offset = k_len - q_len
    if CAUSAL:
        # Keys past the last row's diagonal are invisible to the whole tile: skip those blocks entirely.
        key_end = tl.minimum(k_len, (block_m + 1) * BLOCK_M + causal_offset)
    else:
        key_end = k_len
    for key_start in range(0, key_end, BLOCK_N):
        cols = key_start + cols_in_block
        col_mask = cols < k_len
        kv_mask = col_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_base + cols[:, None] * k_stride_s + dims[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = col_mask[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
        scores = tl.where(visible, scores, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        correction = tl.exp2(row_max - new_max)  # rescales what was accumulated under the old max
        probs = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(probs, axis=1)
        v = tl.load(v_base + cols[:, None] * v_stride_s + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    out = acc / row_sum[:, None]
    o_base = o_ptr + batch * o_stride_b + head * o_stride_h
    tl.store(o_base + rows[:, None] * o_stride_s + dims[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_mask[:, None] & dim_mask[None, :])
    # log2 of the softmax denominator, in the same base-2 units as the scores: all the backward needs.
    tl.store(lse_ptr + batch_head.to(tl.int64) * q_len + rows, row_max + tl.log2(row_sum), mask=row_mask)


@jit
def _flash_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, grad_o_ptr, lse_ptr, delta_ptr, grad_k_ptr, grad_v_ptr,
    q_stride_b, q_stride_h, q_stride_s,
    k_stride_b, k_stride_h, k_stride_s,
    v_stride_b, v_stride_h, v_stride_s,
    do_stride_b, do_stride_h, do_stride_s,
    dk_stride_b, dk_stride_h, dk_stride_s,
    dv_stride_b, dv_stride_h, dv_stride_s,
    n_heads, n_kv_heads, group_size, q_len, k_len, head_dim, scale, scale_log2,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block_n = tl.program_id(0)
    batch_kv_head = tl.program_id(1)
    batch = (batch_kv_head // n_kv_heads).to(tl.int64)
    kv_head = (batch_kv_head % n_kv_heads).to(tl.int64)

    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in_block = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    col_mask = cols < k_len
    dim_mask = dims < head_dim
    kv_mask = col_mask[:, None] & dim_mask[None, :]
    k_tile = k_ptr + batch * k_stride_b + kv_head * k_stride_h + cols[:, None] * k_stride_s + dims[None, :]
    v_tile = v_ptr + batch * v_stride_b + kv_head * v_stride_h + cols[:, None] * v_stride_s + dims[None, :]
    k = tl.load(k_tile, mask=kv_mask, other=0.0)
    v = tl.load(v_tile, mask=kv_mask, other=0.0)
    grad_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    causal_offset = k_len - q_len
    if CAUSAL:
        # The first query row that can see this block's first key is row (first_key - offset).
        first_row = tl.maximum(block_n * BLOCK_N - causal_offset, 0)
        row_start = (first_row // BLOCK_M) * BLOCK_M
    else:
        row_start = 0
    for group_member in range(0, group_size):  # every query head that shares this key/value head
        head = kv_head * group_size + group_member
        q_base = q_ptr + batch * q_stride_b + head * q_stride_h
        do_base = grad_o_ptr + batch * do_stride_b + head * do_stride_h
        stats_base = (batch * n_heads + head) * q_len
        for block_start in range(row_start, q_len, BLOCK_M):
            rows = block_start + rows_in_block
            row_mask = rows < q_len
            q_mask = row_mask[:, None] & dim_mask[None, :]
            q = tl.load(q_base + rows[:, None] * q_stride_s + dims[None, :], mask=q_mask, other=0.0)
            grad_o = tl.load(do_base + rows[:, None] * do_stride_s + dims[None, :], mask=q_mask, other=0.0)
            lse = tl.load(lse_ptr + stats_base + rows, mask=row_mask, other=0.0)
            delta = tl.load(delta_ptr + stats_base + rows, mask=row_mask, other=0.0)

            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            visible = row_mask[:, None] & col_mask[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
            probs = tl.where(visible, tl.exp2(scores - lse[:, None]), 0.0)  # the softmax, recomputed
            grad_v += tl.dot(tl.trans(probs.to(grad_o.dtype)), grad_o, input_precision=DOT_PRECISION)
            grad_probs = tl.dot(grad_o, tl.trans(v), input_precision=DOT_PRECISION)
            # Softmax backward: dS = P * (dP - rowsum(dO * O)).
            grad_scores = probs * (grad_probs - delta[:, None])
            grad_k += tl.dot(tl.trans(grad_scores.to(q.dtype)), q, input_precision=DOT_PRECISION)

    grad_k = grad_k * scale
    dk_tile = grad_k_ptr + batch * dk_stride_b + kv_head * dk_stride_h + cols[:, None] * dk_stride_s
    dv_tile = grad_v_ptr + batch * dv_stride_b + kv_head * dv_stride_h + cols[:, None] * dv_stride_s
    dk_tile += dims[None, :]
    dv_tile += dims[None, :]
    tl.store(dk_tile, grad_k.to(grad_k_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_tile, grad_v.to(grad_v_ptr.dtype.element_ty), mask=kv_mask)


@jit
def _flash_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, grad_o_ptr, lse_ptr, delta_ptr, grad_q_ptr,
    q_stride_b, q_stride_h, q_stride_s,
    k_stride_b, k_stride_h, k_stride_s,
    v_stride_b, v_stride_h, v_stride_s,
    do_stride_b, do_stride_h, do_stride_s,
    dq_stride_b, dq_stride_h, dq_stride_s,
    n_heads, group_size, q_len, k_len, head_dim, scale, scale_log2,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    kv_head = head // group_size

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_in_block = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < q_len
    dim_mask = dims < head_dim
    q_mask = row_mask[:, None] & dim_mask[None, :]
    q = tl.load(q_ptr + batch * q_stride_b + head * q_stride_h + rows[:, None] * q_stride_s + dims[None, :],
                mask=q_mask, other=0.0)
    grad_o = tl.load(grad_o_ptr + batch * do_stride_b + head * do_stride_h + rows[:, None] * do_stride_s
                     + dims[None, :], mask=q_mask, other=0.0)
    stats_base = batch_head.to(tl.int64) * q_len
    lse = tl.load(lse_ptr + stats_base + rows, mask=row_mask, other=0.0)
    delta = tl.load(delta_ptr + stats_base + rows, mask=row_mask, other=0.0)
    grad_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = k_ptr + batch * k_stride_b + kv_head * k_stride_h
    v_base = v_ptr + batch * v_stride_b + kv_head * v_stride_h
    causal_offset = k_len - q_len
    if CAUSAL:
        key_end = tl.minimum(k_len, (block_m + 1) * BLOCK_M + causal_offset)
    else:
        key_end = k_len
    for key_start in range(0, key_end, BLOCK_N):
        cols = key_start + cols_in_block
        col_mask = cols < k_len
        kv_mask = col_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_base + cols[:, None] * k_stride_s + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * v_stride_s + dims[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = row_mask[:, None] & col_mask[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
        probs = tl.where(visible, tl.exp2(scores - lse[:, None]), 0.0)
        grad_probs = tl.dot(grad_o, tl.trans(v), input_precision=DOT_PRECISION)
        grad_scores = probs * (grad_probs - delta[:, None])
        grad_q += tl.dot(grad_scores.to(k.dtype), k, input_precision=DOT_PRECISION)

    grad_q = grad_q * scale
    dq_tile = grad_q_ptr + batch * dq_stride_b + head * dq_stride_h + rows[:, None] * dq_stride_s
    dq_tile += dims[None, :]
    tl.store(dq_tile, grad_q.to(grad_q_ptr.dtype.element_ty), mask=q_mask)


def _unit_last_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_config(
    head_dim: int, dtype: torch.dtype, backward: bool, interpreted: bool | None = None
) -> dict:
    """Tile sizes (fixed, not autotuned). The interpreter gets small tiles: it runs programs one by one."""
    block_d = max(16, next_power_of_2(head_dim))  # tl.dot needs every tile side >= 16
    if interpreter_on() if interpreted is None else interpreted:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": block_d, "num_warps": 4}
    wide = block_d > 64 or dtype == torch.float32  # 4-byte elements or wide heads: smaller tiles fit on chip
    if backward:
        return {"BLOCK_M": 32 if wide else 64, "BLOCK_N": 64, "BLOCK_D": block_d,
                "num_warps": 8 if block_d > 64 else 4, "num_stages": 2}
    return {"BLOCK_M": 64 if dtype == torch.float32 else 128, "BLOCK_N": 64, "BLOCK_D": block_d,
            "num_warps": 8 if block_d > 64 else 4, "num_stages": 2 if wide else 3}


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


class FlashAttentionFunction(torch.autograd.Function):
    """autograd.Function for flash attention; saves q, k, v, the output and one fp32 log-sum-exp per query."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
        q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
        batch, n_heads, q_len, head_dim = q.shape
        n_kv_heads, k_len = k.shape[1], k.shape[2]
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((batch, n_heads, q_len), dtype=torch.float32, device=q.device)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"  # exact fp32 products for fp32 inputs
        config = _launch_config(head_dim, q.dtype, backward=False)
        if out.numel() > 0:
            grid = (-(-q_len // config["BLOCK_M"]), batch * n_heads)
            _flash_forward_kernel[grid](
                q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                n_heads, n_heads // n_kv_heads, q_len, k_len, head_dim, scale * LOG2_E,
                CAUSAL=causal, DOT_PRECISION=precision, **config,
            )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.precision = causal, scale, precision
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = _unit_last_stride(grad_out)
        batch, n_heads, q_len, head_dim = q.shape
        n_kv_heads, k_len = k.shape[1], k.shape[2]
        # delta_i = sum_d dO_id * O_id: the row term of the softmax backward, one fp32 per query row.
        delta = (grad_out.float() * out.float()).sum(dim=-1).contiguous()
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        config = _launch_config(head_dim, q.dtype, backward=True)
        common = dict(CAUSAL=ctx.causal, DOT_PRECISION=ctx.precision, **config)
        if q.numel() > 0:
            _flash_backward_dkdv_kernel[(-(-k_len // config["BLOCK_N"]), batch * n_kv_heads)](
                q, k, v, grad_out, lse, delta, grad_k, grad_v,
                *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
                *_strides(grad_k), *_strides(grad_v),
                n_heads, n_kv_heads, n_heads // n_kv_heads, q_len, k_len, head_dim,
                ctx.scale, ctx.scale * LOG2_E,
                **common,
            )
            _flash_backward_dq_kernel[(-(-q_len // config["BLOCK_M"]), batch * n_heads)](
                q, k, v, grad_out, lse, delta, grad_q,
                *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(grad_q),
                n_heads, n_heads // n_kv_heads, q_len, k_len, head_dim, ctx.scale, ctx.scale * LOG2_E,
                **common,
            )
        return grad_q, grad_k, grad_v, None, None


def flash_attention(
    q: Float[Tensor, "batch n_heads q_len head_dim"],
    k: Float[Tensor, "batch n_kv_heads k_len head_dim"],
    v: Float[Tensor, "batch n_kv_heads k_len head_dim"],
    causal: bool = True,
    scale: float | None = None,
) -> Float[Tensor, "batch n_heads q_len head_dim"]:
    """Attention through the Triton flash kernels (differentiable); as `attention.grouped_attention`."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-d (batch, heads, seq, head_dim); got {q.dim()}, {k.dim()}, {v.dim()} dims"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"n_heads ({q.shape[1]}) must be a multiple of n_kv_heads ({k.shape[1]})")
    if causal and k.shape[2] < q.shape[2]:
        raise ValueError(f"causal attention needs k_len >= q_len; got q_len {q.shape[2]}, k_len {k.shape[2]}")
    if k.shape[2] == 0:
        raise ValueError("attention needs at least one key")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    require_triton(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return FlashAttentionFunction.apply(q, k, v, causal, scale)

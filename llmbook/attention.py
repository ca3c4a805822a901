"""Causal multi-head self-attention: the plain formula, the fast PyTorch path, and a KV cache for generation.

``scaled_dot_product_attention`` is the formula written out: scores = q·kᵀ/√d_k, hide the forbidden keys,
softmax over keys, weighted sum of values. ``MultiHeadSelfAttention`` projects its input to queries, keys
and values, splits them into heads, optionally rotates q and k (RoPE), attends causally and projects back.
By default it calls ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels on GPU), which the
tests pin to the plain formula.

Masks are boolean with **True = may attend**. A query whose row is entirely False has no key to average
over; both paths return **zeros** for such a row rather than NaN (a padded position then contributes
nothing, and no NaN can leak into later layers or gradients).
"""

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange, repeat
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from llmbook.errors import check_int

__all__ = [
    "scaled_dot_product_attention",
    "grouped_attention",
    "causal_mask",
    "KVCache",
    "MultiHeadSelfAttention",
]


def causal_mask(
    q_len: int, k_len: int, device: torch.device | str | None = None
) -> Bool[Tensor, "q_len k_len"]:
    """True where query i may see key j: queries are the *last* q_len of k_len positions, so j <= i + offset.

    With q_len == k_len this is the lower triangle; with a KV cache (k_len = cached + new) the new queries
    see every cached key and the new keys up to themselves.
    """
    check_int("causal_mask", "q_len", q_len, minimum=0)
    check_int("causal_mask", "k_len", k_len, minimum=0)
    if k_len < q_len:
        raise ValueError(f"causal_mask needs 0 <= q_len <= k_len, got q_len={q_len}, k_len={k_len}")
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(
            "q, k, v must have the same number of dimensions, each (..., seq, dim); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the last axis d_k, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[-1] == 0:  # scores would be 0 / sqrt(0)
        raise ValueError(f"q and k need a last axis d_k of at least 1, got q {tuple(q.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must hold as many keys, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
        if mask.ndim < 2 or mask.shape[-1] != k.shape[-2] or mask.shape[-2] not in (1, q.shape[-2]):
            raise ValueError(
                f"mask must end in (q_len or 1, k_len) = ({q.shape[-2]}, {k.shape[-2]}), "
                f"got {tuple(mask.shape)}"
            )


def scaled_dot_product_attention(
    q: Float[Tensor, "... q_len d_k"],
    k: Float[Tensor, "... k_len d_k"],
    v: Float[Tensor, "... k_len d_v"],
    mask: Bool[Tensor, "... q_len k_len"] | None = None,
) -> Float[Tensor, "... q_len d_v"]:
    """softmax(q kᵀ / √d_k, masked) v, written plainly; rows with no visible key return zeros.

    Computed in float32 (float64 stays float64), returned in q's dtype: in float16 a score q·k of a few
    hundred squared already overflows to inf, and the softmax of inf is NaN.
    """
    _check_qkv(q, k, v, mask)
    out_dtype = q.dtype
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scores = einsum(q, k, "... q_len d_k, ... k_len d_k -> ... q_len k_len") / math.sqrt(q.shape[-1])
    if mask is not None:
        # The most negative finite number rather than -inf: a fully masked row then softmaxes to a finite
        # uniform row (no NaN in forward or backward), which the `where` below turns into zeros.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        weights = torch.where(mask, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
    return einsum(weights, v, "... q_len k_len, ... k_len d_v -> ... q_len d_v").to(out_dtype)


def _check_heads(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "q, k, v must be (batch, heads, seq, head_dim); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[1] < 1 or k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"the query heads ({q.shape[1]}) must be a multiple of the key/value heads (k {k.shape[1]}, "
            f"v {v.shape[1]}, at least 1 and equal)"
        )


def grouped_attention(
    q: Float[Tensor, "batch heads q_len head_dim"],
    k: Float[Tensor, "batch kv_heads k_len head_dim"],
    v: Float[Tensor, "batch kv_heads k_len head_dim"],
    causal: bool = True,
    mask: Bool[Tensor, "#batch #heads #q_len k_len"] | None = None,
) -> Float[Tensor, "batch heads q_len head_dim"]:
    """Attention per head, written plainly, for grouped key/value heads: query head h reads key/value
    head h // (heads // kv_heads), the order of transformers' ``repeat_kv``.

    ``causal`` lets each query see the keys up to its own position, queries being the *last* q_len of
    the k_len positions (a KV cache); ``mask`` is AND-ed with that. The dtype rule (the same in
    `llmbook.kernels`' flash attention): computed in float32 (float64 stays), returned in q's dtype.
    """
    _check_heads(q, k, v)
    group = q.shape[1] // k.shape[1]
    k = repeat(k, "batch kv_heads seq head_dim -> batch (kv_heads group) seq head_dim", group=group)
    v = repeat(v, "batch kv_heads seq head_dim -> batch (kv_heads group) seq head_dim", group=group)
    if causal and q.shape[-2] > 1:  # a single new query may see every key: no mask needed
        causal_part = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
        mask = causal_part if mask is None else mask & causal_part
    return scaled_dot_product_attention(q, k, v, mask)


class KVCache:
    """Keys/values of past tokens for every layer, preallocated as (batch, n_kv_heads, max_length, head_dim).

    ``length`` counts the positions already stored (the same for all layers). Each attention layer writes its
    new keys/values at ``[length, length + seq)`` with `update`; the model calls `advance` once all layers
    have written. ``reset()`` empties the cache for a new prompt. Generate under ``torch.no_grad()``: the
    cache is meant for inference, and with autograd on it would keep every step's graph alive.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_length: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        sizes = {"n_layers": n_layers, "batch_size": batch_size, "n_kv_heads": n_kv_heads,
                 "max_length": max_length, "head_dim": head_dim}  # fmt: skip
        for name, size in sizes.items():
            check_int("KVCache", name, size)
        shape = (batch_size, n_kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0

    @property
    def n_layers(self) -> int:
        """Number of layers the cache holds keys/values for."""
        return len(self.keys)

    def reset(self) -> None:
        """Forget every stored position (the buffers are reused, not reallocated)."""
        self.length = 0

    def check_room(self, n_new: int) -> None:
        """Raise a ValueError if ``n_new`` more positions would not fit."""
        check_int("KVCache", "n_new", n_new, minimum=0)
        if self.length + n_new > self.max_length:
            raise ValueError(
                f"KV cache overflow: {self.length} positions stored + {n_new} new > "
                f"max_length={self.max_length}; "
                "make a larger cache or reset() it"
            )

    def update(
        self,
        layer: int,
        k: Float[Tensor, "batch n_kv_heads seq head_dim"],
        v: Float[Tensor, "batch n_kv_heads seq head_dim"],
    ) -> tuple[
        Float[Tensor, "batch n_kv_heads total head_dim"], Float[Tensor, "batch n_kv_heads total head_dim"]
    ]:
        """Store this layer's new keys/values after the cached ones; return all (total = length + seq)."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer index {layer} out of range for a cache of {self.n_layers} layers")
        cache_k, cache_v = self.keys[layer], self.values[layer]
        if k.shape != v.shape or k.shape[:2] != cache_k.shape[:2] or k.shape[-1] != cache_k.shape[-1]:
            raise ValueError(
                f"new keys/values must be (batch, n_kv_heads, seq, head_dim) = "
                f"({cache_k.shape[0]}, {cache_k.shape[1]}, seq, {cache_k.shape[3]}), "
                f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        seq = k.shape[2]
        self.check_room(seq)
        end = self.length + seq
        cache_k[:, :, self.length : end] = k
        cache_v[:, :, self.length : end] = v
        return cache_k[:, :, :end], cache_v[:, :, :end]

    def advance(self, n_new: int) -> None:
        """Mark ``n_new`` more positions as stored (called by the model after every layer has written)."""
        self.check_room(n_new)
        self.length += n_new


class MultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention with optional RoPE, grouped-query heads and a KV cache.

    forward(x (batch, seq, d_model)) -> (batch, seq, d_model). ``n_kv_heads`` < ``n_heads`` shares each
    key/value head among ``n_heads // n_kv_heads`` query heads (grouped-query attention); ``use_sdpa``
    chooses PyTorch's fused kernel (default) or the plain formula above — they agree to float rounding.
    ``layer_idx`` says which slot of a model-wide `KVCache` this layer uses. ``q_norm``/``k_norm`` (QK-norm,
    e.g. an RMSNorm over head_dim) normalise each head's queries and keys before any rotation.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        bias: bool = False,
        use_sdpa: bool = True,
        layer_idx: int = 0,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ):
        super().__init__()
        check_int("MultiHeadSelfAttention", "d_model", d_model)
        check_int("MultiHeadSelfAttention", "n_heads", n_heads, minimum=None)
        check_int("MultiHeadSelfAttention", "n_kv_heads", n_kv_heads, minimum=None, optional=True)
        check_int("MultiHeadSelfAttention", "layer_idx", layer_idx, minimum=0)
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_kv_heads < 1 or n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.use_sdpa = use_sdpa
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.q_norm, self.k_norm = q_norm, k_norm

    def _normalise(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """QK-norm, where the layer has it: each head's query and key vectors normalised."""
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return q, k

    def attend(self, q: Tensor, k: Tensor, v: Tensor, causal: bool = True, mask: Tensor | None = None):
        """`grouped_attention` (same shapes), through PyTorch's fused kernel unless ``use_sdpa`` is off."""
        q_len, k_len = q.shape[-2], k.shape[-2]
        group = q.shape[1] // k.shape[1]
        # A single new query (decoding) may see every key, so it needs no causal mask.
        needs_causal = causal and q_len > 1
        if mask is None and needs_causal and q_len == k_len and self.use_sdpa:
            # is_causal lets PyTorch skip masked blocks; enable_gqa reads shared k/v heads without copies.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
        if not self.use_sdpa:
            return grouped_attention(q, k, v, causal, mask)
        if needs_causal:
            causal_part = causal_mask(q_len, k_len, device=q.device)
            mask = causal_part if mask is None else mask & causal_part
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group > 1)
        if mask is not None:
            # Some fused kernels return NaN for a query that sees no key; pin the documented zeros.
            out = out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
        return out

    def attention_weights(
        self,
        x: Float[Tensor, "batch seq d_model"],
        rotary: nn.Module | None = None,
        positions: Int[Tensor, "*batch seq"] | None = None,
        causal: bool = True,
    ) -> Float[Tensor, "batch heads seq seq"]:
        """The softmax weights each query head puts on each key (rows sum to 1), for inspection and plots."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected x shaped (batch, seq, d_model={self.d_model}), got {tuple(x.shape)}")
        positions = torch.arange(x.shape[1], device=x.device) if positions is None else positions
        split_heads = "batch seq (heads head_dim) -> batch heads seq head_dim"
        q = rearrange(self.q_proj(x), split_heads, heads=self.n_heads)
        k = rearrange(self.k_proj(x), split_heads, heads=self.n_kv_heads)
        q, k = self._normalise(q, k)
        if rotary is not None:
            q, k = rotary(q, positions), rotary(k, positions)
        k = repeat(
            k,
            "batch kv_heads seq head_dim -> batch (kv_heads group) seq head_dim",
            group=self.n_heads // self.n_kv_heads,
        )
        scores = einsum(q, k, "batch heads q_len d, batch heads k_len d -> batch heads q_len k_len")
        scores = scores / math.sqrt(self.head_dim)
        if causal:
            scores = scores.masked_fill(~causal_mask(x.shape[1], x.shape[1], device=x.device), float("-inf"))
        return torch.softmax(scores, dim=-1)

    def forward(
        self,
        x: Float[Tensor, "batch seq d_model"],
        rotary: nn.Module | None = None,
        positions: Int[Tensor, "*batch seq"] | None = None,
        kv_cache: KVCache | None = None,
        causal: bool = True,
        mask: Bool[Tensor, "#batch #heads #seq k_len"] | None = None,
    ) -> Float[Tensor, "batch seq d_model"]:
        """Self-attention over x; ``rotary(t, positions)`` rotates q and k when given (a `RotaryEmbedding`,
        or the `RotaryAngles` a model computed once for all its layers).

        ``positions`` defaults to ``kv_cache.length + arange(seq)`` (or ``arange(seq)`` without a cache).
        With a cache, this layer's keys/values are appended to it; the caller advances ``kv_cache.length``.
        ``mask`` (True = may attend; k_len counts cached keys too, e.g. a padding mask shaped
        (batch, 1, 1, k_len)) is combined with the causal mask; a query that sees no key outputs zeros
        before ``o_proj``.
        """
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected x shaped (batch, seq, d_model={self.d_model}), got {tuple(x.shape)}")
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
        offset = kv_cache.length if kv_cache is not None else 0
        if positions is None:
            positions = torch.arange(offset, offset + x.shape[1], device=x.device)

        split_heads = "batch seq (heads head_dim) -> batch heads seq head_dim"
        q = rearrange(self.q_proj(x), split_heads, heads=self.n_heads)
        k = rearrange(self.k_proj(x), split_heads, heads=self.n_kv_heads)
        v = rearrange(self.v_proj(x), split_heads, heads=self.n_kv_heads)
        q, k = self._normalise(q, k)
        if rotary is not None:
            q, k = rotary(q, positions), rotary(k, positions)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        out = self.attend(q, k, v, causal, mask)
        return self.o_proj(rearrange(out, "batch heads seq head_dim -> batch seq (heads head_dim)"))

"""What `python -m llmbook.bench kernels` measures: one case per kernel at LLM-sized shapes, on CUDA.

A case is a dict: `kernel` (name), `shape` (text for the table), `inputs`, `impls` (name -> function of
the inputs: the Triton kernel, its eager reference, and for attention SDPA's flash backend), `grad_out`
(the gradient fed to backward), and either `bytes_fwd`/`bytes_fwd_bwd` (the least a memory-bound op must
move) or `flops_fwd`/`flops_fwd_bwd` (for the matmul-bound ops).
Inputs are made on `device`: CUDA for timing, "meta" for the shapes only.
"""

import torch

D_MODEL, D_FF, VOCAB = 4096, 11008, 32768  # Llama-7B's widths and a 32k vocabulary


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def rms_norm_case(tokens: int, dtype: torch.dtype, device: str = "cuda") -> dict:
    """RMSNorm over (tokens, D_MODEL)."""
    import llmbook.kernels as K

    x = torch.randn(tokens, D_MODEL, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(D_MODEL, device=device, dtype=dtype, requires_grad=True)
    size = _element_size(dtype)
    return dict(
        kernel="rms_norm",
        shape=f"({tokens}, {D_MODEL})",
        inputs=(x, w, 1e-5),
        impls={"triton": K.rms_norm, "eager": K.rms_norm_reference},
        grad_out=torch.randn_like(x),
        # forward reads x, writes y; backward reads x, dy and writes dx (weight and 1/rms are negligible)
        bytes_fwd=2 * x.numel() * size,
        bytes_fwd_bwd=5 * x.numel() * size,
    )


def swiglu_case(tokens: int, dtype: torch.dtype, device: str = "cuda") -> dict:
    """SwiGLU's gating product over (tokens, D_FF)."""
    import llmbook.kernels as K

    gate, value = (torch.randn(tokens, D_FF, device=device, dtype=dtype, requires_grad=True) for _ in "gv")
    size = _element_size(dtype)
    return dict(
        kernel="swiglu",
        shape=f"({tokens}, {D_FF})",
        inputs=(gate, value),
        impls={"triton": K.swiglu, "eager": K.swiglu_reference},
        grad_out=torch.randn_like(gate),
        bytes_fwd=3 * gate.numel() * size,
        bytes_fwd_bwd=8 * gate.numel() * size,
    )


def rope_case(tokens: int, dtype: torch.dtype, device: str = "cuda") -> dict:
    """RoPE on queries of 32 heads of 128, sequences of 2048."""
    import llmbook.kernels as K

    batch, n_heads, seq, head_dim = tokens // 2048, 32, 2048, 128
    q = torch.randn(batch, n_heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
    angles = torch.arange(seq, device=device)[:, None] * torch.rand(head_dim // 2, device=device)
    size = _element_size(dtype)
    return dict(
        kernel="rope",
        shape=f"({batch}, {n_heads}, {seq}, {head_dim})",
        inputs=(q, angles.cos(), angles.sin()),
        impls={"triton": K.rope, "eager": K.rope_reference},
        grad_out=torch.randn_like(q),
        bytes_fwd=2 * q.numel() * size,
        bytes_fwd_bwd=4 * q.numel() * size,
    )


def cross_entropy_case(tokens: int, dtype: torch.dtype, device: str = "cuda") -> dict:
    """Cross-entropy of (tokens, VOCAB) logits."""
    import llmbook.kernels as K

    logits = torch.randn(tokens, VOCAB, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, VOCAB, (tokens,), device=device)
    size = _element_size(dtype)
    return dict(
        kernel="cross_entropy",
        shape=f"({tokens}, {VOCAB})",
        inputs=(logits, targets),
        impls={"triton": K.cross_entropy, "eager": K.cross_entropy_reference},
        grad_out=torch.tensor(1.0, device=device),
        bytes_fwd=logits.numel() * size,
        bytes_fwd_bwd=3 * logits.numel() * size,
    )


def linear_cross_entropy_case(
    tokens: int, dtype: torch.dtype, device: str = "cuda", d_hidden: int = 2048
) -> dict:
    """The LM head fused with cross-entropy: (tokens, d_hidden) @ (VOCAB, d_hidden).T, never stored."""
    import llmbook.kernels as K

    hidden = torch.randn(tokens, d_hidden, device=device, dtype=dtype, requires_grad=True)
    head = (torch.randn(VOCAB, d_hidden, device=device, dtype=dtype) * 0.02).requires_grad_()
    targets = torch.randint(0, VOCAB, (tokens,), device=device)
    return dict(
        kernel="linear_cross_entropy",
        shape=f"({tokens}, {d_hidden}) @ ({VOCAB}, {d_hidden})",
        inputs=(hidden, head, targets),
        impls={"triton": K.linear_cross_entropy, "eager": K.linear_cross_entropy_reference},
        grad_out=torch.tensor(1.0, device=device),
        flops_fwd=2 * tokens * d_hidden * VOCAB,
        flops_fwd_bwd=6 * tokens * d_hidden * VOCAB,
    )


def _sdpa_flash(q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def flash_attention_case(
    batch: int, head_dim: int, dtype: torch.dtype, device: str = "cuda", seq: int = 2048
) -> dict:
    """Causal attention at width 2048 split into heads of `head_dim`, against SDPA's flash backend."""
    import llmbook.kernels as K

    n_heads = 2048 // head_dim
    shape = (batch, n_heads, seq, head_dim)
    qkv = tuple(torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in "qkv")
    flops = 4 * batch * n_heads * seq * seq * head_dim / 2  # causal: half the score matrix
    return dict(
        kernel=f"flash_attention_d{head_dim}",
        shape=f"({batch}, {n_heads}, {seq}, {head_dim}) causal",
        inputs=qkv,
        impls={"triton": K.flash_attention, "eager": K.flash_attention_reference, "sdpa_flash": _sdpa_flash},
        grad_out=torch.randn_like(qkv[0]),
        flops_fwd=flops,
        flops_fwd_bwd=3.5 * flops,  # backward = 5 matmuls vs forward's 2
    )


def all_cases(quick: bool, dtype: torch.dtype, device: str = "cuda") -> list[dict]:
    """Every case, smaller with `quick`; cross-entropy runs on half the tokens (its logits are wide)."""
    tokens = 4096 if quick else 16384
    cases = [case(tokens, dtype, device) for case in (rms_norm_case, swiglu_case, rope_case)]
    cases += [case(tokens // 2, dtype, device) for case in (cross_entropy_case, linear_cross_entropy_case)]
    batch = 4 if quick else 8
    return cases + [flash_attention_case(batch, head_dim, dtype, device) for head_dim in (64, 128)]

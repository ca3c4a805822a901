"""Next-token loss and the units it is reported in: nats per token, bits per byte, perplexity."""

import math
import numbers

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["cross_entropy", "linear_cross_entropy", "soft_cap", "bits_per_byte", "perplexity"]


def cross_entropy(
    logits: Float[Tensor, "*rows vocab"], targets: Int[Tensor, "*rows"], ignore_index: int = -100
) -> Float[Tensor, ""]:
    """Mean of -log softmax(logits)[target] in nats over targets != ignore_index.

    ``logits`` is (batch, seq, vocab) or (N, vocab) with ``targets`` (batch, seq) or (N,). Computed in
    float32 with the log-sum-exp trick. If every target is ignored the mean is 0/0 = NaN, as in PyTorch.
    """
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', logits)}")
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of ids, got {getattr(targets, 'dtype', targets)}")
    if logits.ndim < 2 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            "expected logits (..., vocab) and targets (...) with matching leading shape, got "
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"logits need a vocabulary axis of at least one entry, got {tuple(logits.shape)}")
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1).long()  # uint8/int16/int32 ids widen losslessly; gather needs int64
    keep = targets != ignore_index
    vocab = logits.shape[-1]
    kept = targets[keep]
    low, high = torch.stack(torch.aminmax(kept)).tolist() if kept.numel() else (0, 0)  # one GPU sync
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"target id {bad} is outside the vocabulary [0, {vocab}) (and not ignore_index)")
    safe_targets = torch.where(keep, targets, 0)  # any valid index; these rows are dropped below
    # log_softmax = logits - logsumexp(logits): the same number as subtracting the log-normalizer from the
    # target logit, but its backward is one fused pass (about 2-3x faster than logsumexp + gather on CPU).
    log_probs = torch.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(-1, safe_targets[:, None]).squeeze(-1) * keep
    return nll.sum() / keep.sum()


def soft_cap(logits: Float[Tensor, "*rows vocab"], cap: float | None) -> Float[Tensor, "*rows vocab"]:
    """cap · tanh(logits / cap): smooth, about the identity for |logits| << cap; ``cap=None`` leaves them."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


def linear_cross_entropy(
    hidden: Float[Tensor, "*rows d_model"],
    weight: Float[Tensor, "vocab d_model"],
    targets: Int[Tensor, "*rows"],
    ignore_index: int = -100,
    softcap: float | None = None,
) -> Float[Tensor, ""]:
    """`cross_entropy` of the LM head's logits = soft_cap(hidden @ weight.T): the model's loss from its final
    hidden states (the fused kernel `llmbook.kernels.linear_cross_entropy` computes it chunk by chunk)."""
    return cross_entropy(soft_cap(torch.nn.functional.linear(hidden, weight), softcap), targets, ignore_index)


def bits_per_byte(nats_per_token: float | Tensor, n_tokens: int, n_bytes: int) -> float | Tensor:
    """Convert a mean loss in nats/token to bits per byte of text: total nats / ln 2 / bytes.

    ``n_tokens`` and ``n_bytes`` are counts, or the same ratio in both (1 token per ``n_bytes`` bytes).

    Unlike loss per token it does not depend on the tokenizer, so models with different vocabularies compare.
    """
    if not all(isinstance(n, numbers.Real) and not isinstance(n, bool) for n in (n_tokens, n_bytes)):
        raise TypeError(f"n_tokens and n_bytes must be numbers, got {n_tokens!r} and {n_bytes!r}")
    if not (0 <= n_tokens < math.inf and 0 < n_bytes < math.inf):
        raise ValueError(
            f"need finite n_tokens >= 0 and n_bytes > 0, got n_tokens={n_tokens}, n_bytes={n_bytes}"
        )
    return nats_per_token * n_tokens / (n_bytes * math.log(2))


def perplexity(nats: float | Tensor) -> float | Tensor:
    """exp(mean nats per token): the size of a uniform choice that would be as surprised as the model.

    Above about 709 nats the perplexity exceeds the largest float and is inf, as for a tensor."""
    if isinstance(nats, Tensor):
        return torch.exp(nats)
    try:
        return math.exp(nats)
    except OverflowError:
        return math.inf

"""Static token embeddings from co-occurrence statistics (counts -> PPMI -> truncated SVD) and geometry tools.

This is the count-based route to word vectors (Levy & Goldberg, 2014, showed that skip-gram with negative
sampling implicitly factorises a shifted PMI matrix; here we factorise it explicitly). Chapter 2 uses it to
show why a trained embedding table has meaningful geometry; `nearest_neighbours` and `pca` work on any
(vocab, d) table, including a trained language model's `tok_embeddings.weight`.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from llmbook.errors import check_float, check_int


def cooccurrence_counts(
    ids: Int[Tensor, " n_tokens"], vocab_size: int, window: int, harmonic: bool = True
) -> Float[Tensor, "vocab vocab"]:
    """Symmetric (vocab, vocab) matrix of how often two ids occur within `window` positions of each other.

    With `harmonic=True` a pair at distance r adds 1/r instead of 1 (nearer words say more about each other).
    """
    if ids.ndim != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be a 1-D integer tensor, got shape {tuple(ids.shape)}, dtype {ids.dtype}")
    check_int("cooccurrence_counts", "window", window)
    check_int("cooccurrence_counts", "vocab_size", vocab_size, minimum=0)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"ids must lie in [0, {vocab_size}), found {int(ids.min())}..{int(ids.max())}")
    ids = ids.long()
    cells, weights = [], []
    for distance in range(1, min(window, ids.numel() - 1) + 1):
        # The pair (a, b) at this distance lands in cell a * vocab + b of the flattened matrix.
        cells.append(ids[:-distance] * vocab_size + ids[distance:])
        weights.append(torch.full((ids.numel() - distance,), 1.0 / distance if harmonic else 1.0))
    if not cells:
        return torch.zeros(vocab_size, vocab_size)
    flat = torch.bincount(torch.cat(cells), torch.cat(weights).double(), minlength=vocab_size * vocab_size)
    counts = flat.view(vocab_size, vocab_size)
    return (counts + counts.T).float()


def ppmi(
    counts: Float[Tensor, "vocab vocab"], context_smoothing: float = 0.75
) -> Float[Tensor, "vocab vocab"]:
    """Positive pointwise mutual information max(0, log p(w, c) / (p(w) p(c))); 0 where a pair never occurs.

    `context_smoothing` raises context counts to a power < 1 before normalising (as word2vec does for its
    negative samples), which stops rare contexts from getting huge PMI values.
    """
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"counts must be a square (vocab, vocab) matrix, got shape {tuple(counts.shape)}")
    check_float("ppmi", "context_smoothing", context_smoothing, minimum=0, above=None)
    if context_smoothing > 1:
        raise ValueError(
            f"ppmi.context_smoothing must be in [0, 1] (a power that flattens), got {context_smoothing}"
        )
    if not bool(((counts >= 0) & (counts < torch.inf)).all()):  # also refuses NaN
        raise ValueError("counts must be finite and non-negative")
    counts = counts.double()
    total = counts.sum()
    if total == 0:
        return torch.zeros_like(counts, dtype=torch.float32)
    p_joint = counts / total
    p_word = counts.sum(dim=1) / total
    context = counts.sum(dim=0) ** context_smoothing
    p_context = context / context.sum()
    with torch.no_grad():
        pmi = torch.log(p_joint) - torch.log(p_word)[:, None] - torch.log(p_context)[None, :]
    # log(0) = -inf for pairs never seen (and nan for empty rows): both mean "no evidence", i.e. 0.
    return torch.where(counts > 0, pmi.clamp(min=0), torch.zeros_like(pmi)).float()


def randomized_svd(
    matrix: Float[Tensor, "m n"],
    rank: int,
    generator: torch.Generator,
    n_oversamples: int = 10,
    n_iter: int = 4,
) -> tuple[Float[Tensor, "m rank"], Float[Tensor, " rank"], Float[Tensor, "rank n"]]:
    """Top-`rank` singular triplets (U, S, Vh) by randomized range finding (Halko et al. 2011)."""
    if matrix.ndim != 2:
        raise ValueError(f"randomized_svd needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    check_int("randomized_svd", "n_oversamples", n_oversamples, minimum=0)
    check_int("randomized_svd", "n_iter", n_iter, minimum=0)
    m, n = matrix.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be between 1 and min(matrix.shape) = {min(m, n)}, got {rank}")
    sketch_size = min(rank + n_oversamples, min(m, n))
    probe = torch.randn(n, sketch_size, generator=generator, dtype=matrix.dtype)
    basis, _ = torch.linalg.qr(matrix @ probe)
    for _ in range(n_iter):  # power iterations sharpen the gap between kept and dropped singular values
        basis, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ basis)
    u_small, singular_values, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ u_small)[:, :rank], singular_values[:rank], vh[:rank]


def svd_embeddings(
    matrix: Float[Tensor, "vocab vocab"], dim: int, generator: torch.Generator, singular_power: float = 0.5
) -> Float[Tensor, "vocab dim"]:
    """Embedding table U_d * S_d**singular_power from the top-`dim` SVD of a (PPMI) matrix."""
    check_float("svd_embeddings", "singular_power", singular_power, minimum=0)  # 0**negative would be inf
    u, s, _ = randomized_svd(matrix.float(), dim, generator)
    # Singular vectors are defined up to sign; fix each so its largest-magnitude entry is positive.
    signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True)))
    return u * signs * s**singular_power


def cosine_similarity_matrix(
    a: Float[Tensor, "n d"], b: Float[Tensor, "m d"], eps: float = 1e-8
) -> Float[Tensor, "n m"]:
    """Cosine similarity between every row of `a` and every row of `b`."""
    check_float("cosine_similarity_matrix", "eps", eps, above=0)  # a zero row would divide 0 by 0
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must be (n, d) and (m, d) with the same d, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    a_unit = a / a.norm(dim=-1, keepdim=True).clamp(min=eps)
    b_unit = b / b.norm(dim=-1, keepdim=True).clamp(min=eps)
    return a_unit @ b_unit.T


def nearest_neighbours(
    embeddings: Float[Tensor, "vocab d"], query_id: int, k: int = 5
) -> tuple[Int[Tensor, " k"], Float[Tensor, " k"]]:
    """The `k` ids whose embeddings have the highest cosine similarity to `query_id`'s (itself excluded)."""
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a (vocab, d) table, got shape {tuple(embeddings.shape)}")
    check_int("nearest_neighbours", "query_id", query_id, minimum=None)
    check_int("nearest_neighbours", "k", k, minimum=None)
    vocab_size = embeddings.shape[0]
    if not 0 <= query_id < vocab_size:
        raise ValueError(f"query_id must lie in [0, {vocab_size}), got {query_id}")
    if not 1 <= k < vocab_size:
        raise ValueError(f"k must be between 1 and vocab_size - 1 = {vocab_size - 1}, got {k}")
    sims = cosine_similarity_matrix(embeddings[query_id : query_id + 1], embeddings)[0]
    sims[query_id] = -float("inf")
    top = torch.topk(sims, k)
    return top.indices, top.values


def pca(x: Float[Tensor, "n d"], n_components: int = 2) -> Float[Tensor, "n n_components"]:
    """Project rows onto their top principal components (centred, exact SVD, signs made canonical)."""
    if x.ndim != 2:
        raise ValueError(f"pca needs rows of vectors (n, d), got shape {tuple(x.shape)}")
    check_int("pca", "n_components", n_components, minimum=None)
    if not 1 <= n_components <= min(x.shape):
        raise ValueError(f"n_components must be between 1 and {min(x.shape)}, got {n_components}")
    centred = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    components = vh[:n_components]
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    return centred @ (components * signs).T

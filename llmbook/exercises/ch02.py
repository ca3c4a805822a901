"""Chapter 2 exercises: the look-up's backward pass, co-occurrence counts, PPMI, nearest neighbours to
debug, and the spread of random cosines to predict.
"""

import torch

from llmbook.embeddings import cooccurrence_counts, nearest_neighbours, ppmi
from llmbook.exercises.core import Case, draw, exercise


def _embedding_backward(ids: torch.Tensor, grad_output: torch.Tensor, vocab_size: int) -> torch.Tensor:
    # The reference is autograd itself: differentiate an actual look-up.
    table = torch.zeros(vocab_size, grad_output.shape[-1], dtype=grad_output.dtype, requires_grad=True)
    table[ids].backward(grad_output)
    return table.grad


@exercise(
    "02.embedding_backward",
    reference=_embedding_backward,
    hint=(
        "A look-up copies rows, so the gradient flows back to the rows it copied; a row used twice collects "
        "two gradients.",
        "Row r of the gradient is the sum of grad_output over every position whose id is r; rows never "
        "looked up get zeros. Flatten ids to (n,) and grad_output to (n, d), then add each gradient row into "
        "its id's row (a loop, or index_add_). Plain assignment loses repeated ids.",
    ),
)
def _embedding_backward_cases():
    g = torch.Generator().manual_seed(0)
    for ids, grad_output, vocab_size, note in [
        (torch.tensor([2]), torch.randn(1, 3, generator=g), 5, "one id"),
        (torch.tensor([1, 4, 1, 1]), torch.randn(4, 3, generator=g), 6, "a repeated id must accumulate"),
        (torch.randint(0, 8, (2, 5), generator=g), torch.randn(2, 5, 4, generator=g), 8, "(batch, seq)"),
        (torch.tensor([], dtype=torch.long), torch.zeros(0, 3), 4, "no ids at all: an all-zero gradient"),
    ]:
        expected = _embedding_backward(ids, grad_output, vocab_size)
        yield Case((ids, grad_output, vocab_size), expected=expected, note=note)


def _cooccurrence(ids: torch.Tensor, vocab_size: int, window: int) -> torch.Tensor:
    return cooccurrence_counts(ids, vocab_size, window, harmonic=False)


def _cooccurrence_hidden(g):
    for _ in range(3):
        vocab_size = draw(g, 2, 8)
        ids = torch.randint(0, vocab_size, (draw(g, 1, 25),), generator=g)
        yield Case((ids, vocab_size, draw(g, 1, 5)), note="random ids and window")


@exercise(
    "02.cooccurrence",
    reference=_cooccurrence,
    forbid=("llmbook.embeddings.cooccurrence_counts",),
    hidden=_cooccurrence_hidden,
    hint=(
        "Visit every pair of positions at most `window` apart and count it in both directions.",
        "For every pair of positions i < j with j - i <= window, add 1 to counts[ids[i], ids[j]] AND to "
        "counts[ids[j], ids[i]] (the matrix is symmetric). A token is not its own neighbour at distance 0.",
    ),
)
def _cooccurrence_cases():
    g = torch.Generator().manual_seed(2)
    for ids, vocab_size, window, note in [
        (torch.tensor([0, 1, 2]), 3, 1, "three tokens, window 1"),
        (torch.tensor([3]), 4, 2, "a single token has no neighbours"),
        (torch.tensor([1, 1, 1, 1]), 2, 2, "the same id repeated lands on the diagonal"),
        (torch.tensor([0, 1]), 3, 5, "a window longer than the sequence"),
        (torch.randint(0, 6, (30,), generator=g), 6, 3, "30 random ids, window 3"),
    ]:
        yield Case((ids, vocab_size, window), expected=_cooccurrence(ids, vocab_size, window), note=note)


def _ppmi(counts: torch.Tensor) -> torch.Tensor:
    return ppmi(counts, context_smoothing=1.0)


@exercise(
    "02.ppmi",
    reference=_ppmi,
    forbid=("llmbook.embeddings.ppmi",),
    hint=(
        "PMI compares how often w and c occur together with how often they would by chance: log p(w, c) / "
        "(p(w) p(c)).",
        "With N = counts.sum(): p(w, c) = counts / N, p(w) = row sums / N, p(c) = column sums / N. "
        "PMI = log p(w, c) - log p(w) - log p(c); clamp negatives to 0 and put 0 wherever counts == 0.",
    ),
)
def _ppmi_cases():
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 5, (6, 6), generator=g).float()
    for counts, note in [
        (torch.tensor([[0.0, 3.0], [3.0, 2.0]]), "2 x 2"),
        (torch.outer(torch.arange(1.0, 4.0), torch.arange(1.0, 4.0)), "independent words: all 0"),
        (raw + raw.T, "random symmetric counts with zeros"),
        (torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 4.0], [0.0, 4.0, 0.0]]), "a word that never occurs"),
    ]:
        yield Case((counts,), expected=_ppmi(counts), note=note)


def _nearest(embeddings: torch.Tensor, query_id: int, k: int) -> torch.Tensor:
    return nearest_neighbours(embeddings, query_id, k)[0]


def _broken_nearest(embeddings, query_id, k):
    """The ids of the k rows most similar (by cosine) to row query_id, most similar first, itself excluded."""
    scores = embeddings @ embeddings[query_id]
    return torch.topk(scores, k).indices


@exercise(
    "02.nearest_neighbours",
    reference=_nearest,
    kind="debug",
    broken=_broken_nearest,
    forbid=("llmbook.embeddings.nearest_neighbours",),
    hint=(
        "Two bugs: one about what 'similar' means here, one about which word can never be its own neighbour.",
        "A dot product grows with a vector's length; cosine similarity divides it out. And the query is "
        "always most similar to itself, so it must be excluded before taking the top k.",
        "Look at line 3, `embeddings @ embeddings[query_id]`: these are dot products, not cosines (a "
        "long row wins whatever its direction), and the query's own row is among them, so line 4's "
        "`torch.topk` can pick the query itself.",
    ),
)
def _nearest_cases():
    g = torch.Generator().manual_seed(4)
    small = torch.tensor([[1.0, 0.0], [3.0, 0.2], [0.0, 1.0], [-1.0, 0.1]])
    yield Case((small, 0, 1), expected=_nearest(small, 0, 1), note="k = 1")
    long_row = torch.tensor([[1.0, 0.0], [100.0, 30.0], [0.5, 0.05], [0.0, 1.0]])
    yield Case((long_row, 0, 3), expected=_nearest(long_row, 0, 3), note="cosine, not dot product")
    table = torch.randn(50, 8, generator=g)
    yield Case((table, 17, 5), expected=_nearest(table, 17, 5), note="50 random vectors")
    yield Case((table, 49, 49), expected=_nearest(table, 49, 49), note="k = vocab - 1: all the rest")


# ---------------------------------------------------------------------------------------------
# Predict: how far from 0 the cosine similarity of two random vectors strays in d dimensions.

COSINE_WIDTH = 256


def measured_cosine_spread(n_pairs: int = 20000) -> float:
    """Standard deviation of the cosine similarity of random Gaussian vector pairs in COSINE_WIDTH dims."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n_pairs, COSINE_WIDTH, generator=g, dtype=torch.float64)
    b = torch.randn(n_pairs, COSINE_WIDTH, generator=g, dtype=torch.float64)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).std().item()


@exercise(
    "02.predict_cosine_spread",
    reference=measured_cosine_spread,
    kind="predict",
    rtol=0.05,
    hint=(
        "The cosine similarity is a dot product of two unit vectors; its mean is 0 by symmetry.",
        "For random unit vectors a, b in d dimensions, a·b is a sum of d products each of variance 1/d², so "
        "its variance is 1/d.",
        "The standard deviation is 1/sqrt(d) = 1/sqrt(256).",
    ),
)
def _predict_cosine_spread_cases():
    yield Case((), expected=measured_cosine_spread(), note=f"d = {COSINE_WIDTH}, within 5%")

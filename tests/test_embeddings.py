import math

import pytest
import torch

from llmbook.embeddings import (
    cooccurrence_counts,
    cosine_similarity_matrix,
    nearest_neighbours,
    pca,
    ppmi,
    randomized_svd,
    svd_embeddings,
)


def _naive_counts(ids: list[int], vocab_size: int, window: int, harmonic: bool) -> torch.Tensor:
    counts = torch.zeros(vocab_size, vocab_size)
    for i, a in enumerate(ids):
        for j in range(i + 1, min(i + window + 1, len(ids))):
            weight = 1.0 / (j - i) if harmonic else 1.0
            counts[a, ids[j]] += weight
            counts[ids[j], a] += weight
    return counts


@pytest.mark.parametrize("harmonic", [True, False])
@pytest.mark.parametrize("window", [1, 3])
def test_cooccurrence_counts_match_a_double_loop(window, harmonic):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (40,), generator=g)
    expected = _naive_counts(ids.tolist(), 7, window, harmonic)
    torch.testing.assert_close(cooccurrence_counts(ids, 7, window, harmonic=harmonic), expected)


def test_cooccurrence_counts_of_a_single_token_are_zero():
    assert cooccurrence_counts(torch.tensor([2]), 4, window=2).abs().sum() == 0


def test_cooccurrence_counts_reject_out_of_range_ids():
    with pytest.raises(ValueError, match="ids must lie"):
        cooccurrence_counts(torch.tensor([0, 5]), 5, window=1)
    with pytest.raises(TypeError, match="1-D integer"):
        cooccurrence_counts(torch.tensor([0.0, 1.0]), 5, window=1)


def test_ppmi_matches_its_definition_and_zeroes_unseen_pairs():
    counts = torch.tensor([[0.0, 2.0, 1.0], [2.0, 0.0, 0.0], [1.0, 0.0, 4.0]])
    total = counts.sum()
    got = ppmi(counts, context_smoothing=1.0)
    for w in range(3):
        for c in range(3):
            if counts[w, c] == 0:
                assert got[w, c] == 0
            else:
                pmi = math.log(counts[w, c] / total / (counts[w].sum() / total * counts[:, c].sum() / total))
                assert got[w, c].item() == pytest.approx(max(pmi, 0.0), rel=1e-5)


def test_ppmi_of_independent_words_is_zero():
    # An outer product of marginals is exactly independent: PMI is 0 everywhere.
    p = torch.tensor([1.0, 2.0, 3.0])
    assert ppmi(torch.outer(p, p), context_smoothing=1.0).abs().max() < 1e-6


def test_randomized_svd_recovers_the_top_singular_values_of_a_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    left = torch.randn(60, 5, generator=g, dtype=torch.float64)
    a = left @ torch.randn(5, 40, generator=g, dtype=torch.float64)
    u, s, vh = randomized_svd(a, 5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(s, torch.linalg.svdvals(a)[:5])
    torch.testing.assert_close(u @ torch.diag(s) @ vh, a)


def test_svd_embeddings_are_deterministic_given_the_generator():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(30, 30, generator=g)
    m = m + m.T
    first = svd_embeddings(m, 4, torch.Generator().manual_seed(3))
    second = svd_embeddings(m, 4, torch.Generator().manual_seed(3))
    assert first.shape == (30, 4)
    torch.testing.assert_close(first, second)


def test_nearest_neighbours_excludes_the_query_and_orders_by_cosine():
    table = torch.tensor([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    ids, sims = nearest_neighbours(table, 0, k=3)
    assert ids.tolist() == [1, 2, 3]
    torch.testing.assert_close(sims, torch.tensor([10 / math.sqrt(101), 0.0, -1.0]))


def test_cosine_similarity_of_a_zero_vector_is_zero_not_nan():
    sims = cosine_similarity_matrix(torch.zeros(1, 3), torch.ones(2, 3))
    assert torch.equal(sims, torch.zeros(1, 2))


def test_pca_keeps_the_direction_of_largest_variance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g) * torch.tensor([5.0, 1.0, 0.1])
    projected = pca(x, 2)
    assert projected.shape == (200, 2)
    assert projected[:, 0].var() > 20 * projected[:, 1].var() / 2
    torch.testing.assert_close(projected.mean(dim=0), torch.zeros(2), atol=1e-5, rtol=0)


def test_bad_arguments_raise_value_errors_that_name_them():
    with pytest.raises(ValueError, match="query_id"):
        nearest_neighbours(torch.zeros(3, 2), 3)
    with pytest.raises(ValueError, match="rank"):
        randomized_svd(torch.zeros(3, 2), 3, torch.Generator())
    with pytest.raises(ValueError, match="square"):
        ppmi(torch.zeros(2, 3))

"""Chapter 3 exercises: masked softmax, causal mask, attention, multi-head attention to debug, kernel
regression; the variance of q·k to predict, a causal attention to debug, a bandwidth experiment.
"""

import math

import torch

from llmbook.attention import MultiHeadSelfAttention, causal_mask, scaled_dot_product_attention
from llmbook.exercises.core import Case, draw, exercise


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # The package's convention: True = may attend; a row with nothing visible becomes all zeros.
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.where(mask, torch.softmax(filled, dim=-1), torch.zeros((), dtype=scores.dtype))


@exercise(
    "03.masked_softmax",
    reference=_masked_softmax,
    hint=(
        "Hidden entries must end with weight exactly 0, whatever their score: make their score -inf before "
        "the softmax.",
        "Replace the hidden scores by -inf (scores.masked_fill(~mask, float('-inf'))), subtract each row's "
        "maximum before exp so large scores cannot overflow, normalise by the row sum, and return 0 for rows "
        "where nothing is visible (torch.nan_to_num or torch.where).",
    ),
)
def _masked_softmax_cases():
    g = torch.Generator().manual_seed(0)
    lower = torch.ones(4, 4, dtype=torch.bool).tril()
    scores = torch.randn(4, 4, generator=g)
    cases = [
        (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, True, True]), "nothing hidden: a plain softmax"),
        (torch.tensor([0.5]), torch.tensor([True]), "a single key"),
        (scores, lower, "a 4 x 4 causal pattern"),
        (torch.tensor([[5.0, 1e4, 2.0]]), torch.tensor([[True, False, True]]), "a huge hidden score"),
        (torch.tensor([[1000.0, 999.0, -1000.0]]), torch.ones(1, 3, dtype=torch.bool), "large scores"),
        (torch.randn(2, 3, 5, generator=g), torch.rand(2, 3, 5, generator=g) > 0.3, "batch dimensions"),
        (
            torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
            torch.tensor([[False, False], [True, False]]),
            "an empty row",
        ),
    ]
    for s, m, note in cases:
        m = m | torch.zeros_like(s, dtype=torch.bool)  # same shape as the scores
        yield Case((s, m), expected=_masked_softmax(s, m), note=note)


def _causal_mask_hidden(g):
    for _ in range(3):
        k_len = draw(g, 1, 12)
        yield Case((draw(g, 0, k_len + 1), k_len), note="random lengths")


@exercise(
    "03.causal_mask",
    reference=causal_mask,
    forbid=("llmbook.attention.causal_mask",),
    hidden=_causal_mask_hidden,
    hint=(
        "Query i may see key j when j is not in its future. With a cache, the queries are the last q_len "
        "positions.",
        "Query i sits at absolute position i + (k_len - q_len) (the queries are the last q_len positions); "
        "it may see key j when j <= i + (k_len - q_len). "
        "torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=...) builds that in one line.",
    ),
)
def _causal_mask_cases():
    for q_len, k_len, note in [
        (1, 1, "one position"),
        (4, 4, "square: the lower triangle"),
        (2, 5, "2 new queries after 3 cached keys"),
        (1, 6, "one new query sees every key"),
        (0, 3, "no queries at all"),
    ]:
        yield Case((q_len, k_len), expected=causal_mask(q_len, k_len), note=note)


@exercise(
    "03.scaled_dot_product",
    reference=scaled_dot_product_attention,
    forbid=(
        "llmbook.attention.scaled_dot_product_attention",
        "torch.nn.functional.scaled_dot_product_attention",
    ),
    hint=(
        "Scores, scale, mask, softmax over the keys, weighted sum of the values: in that order.",
        "scores = q @ k.transpose(-2, -1) / sqrt(q.shape[-1]); where mask is given, use a masked softmax "
        "over the last axis (exercise 1); then weights @ v. Use transpose(-2, -1), not .T, so batch axes "
        "stay "
        "put.",
    ),
)
def _sdpa_cases():
    g = torch.Generator().manual_seed(1)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    cases = [
        ((r(3, 4), r(3, 4), r(3, 4)), None, "3 positions, no mask"),
        ((r(1, 8), r(1, 8), r(1, 2)), None, "one query, one key"),
        ((r(2, 4), r(5, 4), r(5, 3)), None, "2 queries, 5 keys, d_v = 3"),
        ((r(2, 3, 6, 8), r(2, 3, 6, 8), r(2, 3, 6, 8)), causal_mask(6, 6), "(batch, heads, seq, d), causal"),
        ((r(4, 16, scale=30.0), r(4, 16, scale=30.0), r(4, 16)), causal_mask(4, 4), "large scores"),
        ((r(2, 4), r(3, 4), r(3, 4)), torch.tensor([[False] * 3, [True, False, True]]), "a fully hidden row"),
    ]
    for (q, k, v), mask, note in cases:
        kwargs = {} if mask is None else {"mask": mask}
        yield Case((q, k, v), kwargs, expected=scaled_dot_product_attention(q, k, v, mask), note=note)


def _multi_head(x, w_q, w_k, w_v, w_o, n_heads):
    layer = MultiHeadSelfAttention(x.shape[-1], n_heads, use_sdpa=False)
    with torch.no_grad():
        projections = [layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj]
        for proj, weight in zip(projections, [w_q, w_k, w_v, w_o], strict=True):
            proj.weight.copy_(weight)
        return layer(x)


def _broken_multi_head(x, w_q, w_k, w_v, w_o, n_heads):
    """Causal multi-head self-attention: (batch, seq, d_model) -> (batch, seq, d_model)."""
    batch, seq, d_model = x.shape
    head_dim = d_model // n_heads
    q, k, v = (t.reshape(batch, n_heads, seq, head_dim) for t in (x @ w_q.T, x @ w_k.T, x @ w_v.T))
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    merged = (weights @ v).reshape(batch, seq, d_model)
    return merged @ w_o.T


@exercise(
    "03.multi_head",
    reference=_multi_head,
    kind="debug",
    broken=_broken_multi_head,
    forbid=(
        "llmbook.attention.MultiHeadSelfAttention",
        "torch.nn.MultiheadAttention",
    ),
    hint=(
        "It passes with one head, and with one position. What does reshape do to a (batch, seq, "
        "n_heads * head_dim) tensor when you ask for (batch, n_heads, seq, head_dim)?",
        "reshape keeps the memory order, so it hands consecutive numbers of one position to different "
        "positions of a head. Split the last axis first, (batch, seq, heads, head_dim), then move the head "
        "axis forward; merge back the same way, reversed.",
        "Look at lines 5 and 9. Line 5's `t.reshape(batch, n_heads, seq, head_dim)` keeps the memory "
        "order of a (batch, seq, d_model) tensor, so one head's rows mix numbers of different "
        "positions; line 9's `reshape(batch, seq, d_model)` merges the heads back the same wrong way."
        " Split the last axis first, then move the head axis.",
    ),
)
def _multi_head_cases():
    g = torch.Generator().manual_seed(3)
    for batch, seq, d_model, n_heads, note in [
        (1, 4, 8, 1, "one head"),
        (1, 1, 8, 4, "a single position"),
        (2, 6, 12, 3, "3 heads of size 4"),
        (1, 5, 16, 8, "8 heads of size 2"),
    ]:
        x = torch.randn(batch, seq, d_model, generator=g)
        weights = [torch.randn(d_model, d_model, generator=g) / d_model**0.5 for _ in range(4)]
        yield Case((x, *weights, n_heads), expected=_multi_head(x, *weights, n_heads), note=note)


def _nadaraya_watson(x_query, x_train, y_train, bandwidth):
    scores = -((x_query[:, None] - x_train[None, :]) ** 2) / (2 * bandwidth**2)
    return torch.softmax(scores, dim=1) @ y_train


@exercise(
    "03.nadaraya_watson",
    reference=_nadaraya_watson,
    hint=(
        "Each prediction is a weighted average of y_train, with weights from a softmax of negative squared "
        "distances.",
        "Scores -(x - x_i)^2 / (2 h^2) for every (query, training point) pair via broadcasting "
        "(x_query[:, None] - x_train[None, :]); softmax over the training points (dim=1) — not exp / sum, "
        "which "
        "gives 0/0 for a query far from every point — then weights @ y_train.",
    ),
)
def _nw_cases():
    g = torch.Generator().manual_seed(4)
    x_train = torch.sort(torch.rand(20, generator=g) * 5).values
    y_train = torch.sin(x_train) + 0.1 * torch.randn(20, generator=g)
    cases = [
        (torch.tensor([0.3, 2.0]), torch.tensor([1.0]), torch.tensor([7.0]), 0.5, "one training point"),
        (torch.linspace(0, 5, 11), x_train, y_train, 0.3, "11 queries, 20 points"),
        (torch.tensor([1.0, 4.0]), x_train, y_train, 100.0, "a huge bandwidth: the mean of y"),
        (torch.tensor([50.0]), x_train, y_train, 0.1, "a query far from every point"),
    ]
    for xq, xt, yt, h, note in cases:
        yield Case((xq, xt, yt, h), expected=_nadaraya_watson(xq, xt, yt, h), note=note)


# ---------------------------------------------------------------------------------------------
# Predict: the variance of q·k at width d, the reason for the 1/sqrt(d) in attention.

QK_WIDTH = 64


def measured_qk_variance(n_pairs: int = 20000) -> float:
    """Variance of q·k for q, k with independent N(0, 1) entries in QK_WIDTH dimensions, by sampling."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n_pairs, QK_WIDTH, generator=g, dtype=torch.float64)
    k = torch.randn(n_pairs, QK_WIDTH, generator=g, dtype=torch.float64)
    return (q * k).sum(dim=-1).var().item()


@exercise(
    "03.predict_qk_variance",
    reference=measured_qk_variance,
    kind="predict",
    rtol=0.05,
    hint=(
        "q·k is a sum of d products q_i k_i. What are the mean and variance of one product?",
        "Each product of two independent N(0, 1) numbers has mean 0 and variance E[q²]E[k²] = 1; variances "
        "of "
        "independent terms add.",
        "Var(q·k) = d, so the scores' standard deviation is sqrt(d): dividing by sqrt(d) brings it back to "
        "1.",
    ),
)
def _predict_qk_variance_cases():
    yield Case((), expected=measured_qk_variance(), note=f"d = {QK_WIDTH}, within 5%")


# ---------------------------------------------------------------------------------------------
# Debug: a causal attention with two classic mistakes.


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    seq = q.shape[-2]
    return scaled_dot_product_attention(q, k, v, causal_mask(seq, seq))


def _broken_causal_attention(q, k, v):
    """Causal self-attention: position i attends to positions 0..i. q, k, v: (..., seq, d)."""
    seq = q.shape[-2]
    scores = q @ k.transpose(-2, -1)
    future = torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@exercise(
    "03.fix_causal_attention",
    reference=_causal_attention,
    kind="debug",
    broken=_broken_causal_attention,
    forbid=(
        "llmbook.attention.scaled_dot_product_attention",
        "torch.nn.functional.scaled_dot_product_attention",
    ),
    hint=(
        "Two bugs. Print the weights for seq = 3: which entries are hidden, and how large are the scores?",
        "tril() is True on and below the diagonal, the keys a query MAY see, so masking it hides the past "
        "and "
        "keeps the future (the last row is all -inf: NaN). And the scores are never divided by sqrt(d).",
        "Look at lines 4 to 6. Line 4's scores are never scaled by the key width; line 5's `tril()` "
        "is True on and below the diagonal, the keys a query may see, and line 6 hides exactly the "
        "entries where `future` is True. Which entries should line 6 hide?",
    ),
)
def _fix_causal_attention_cases():
    g = torch.Generator().manual_seed(5)
    for shape, note in [
        ((1, 4), "a single position"),
        ((3, 4), "3 positions"),
        ((2, 5, 8), "a batch of 2"),
        ((2, 2, 6, 16), "(batch, heads, seq, d)"),
    ]:
        q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
        yield Case((q, k, v), expected=_causal_attention(q, k, v), note=note)
    q, k, v = (torch.randn(5, 64, generator=g) * 3 for _ in range(3))
    yield Case((q, k, v), expected=_causal_attention(q, k, v), note="width 64, where the scale matters most")


# ---------------------------------------------------------------------------------------------
# Experiment: the bandwidth at which Nadaraya-Watson regression predicts held-out points best.

BANDWIDTHS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
# The names the exercise notebook imports from this module; the audit flags an import of any other one.
NOTEBOOK_API = ("BANDWIDTHS", "bandwidth_experiment_data")


def bandwidth_experiment_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): noisy samples of sin(x) on [0, 5], seeded, for the experiment."""
    g = torch.Generator().manual_seed(30)
    x_train = torch.sort(torch.rand(60, generator=g) * 5).values
    y_train = torch.sin(x_train) + 0.3 * torch.randn(60, generator=g)
    x_test = torch.rand(200, generator=g) * 5
    y_test = torch.sin(x_test) + 0.3 * torch.randn(200, generator=g)
    return x_train, y_train, x_test, y_test


def measured_best_bandwidth() -> float:
    """The bandwidth in BANDWIDTHS with the lowest held-out mean squared error on the experiment's data."""
    x_train, y_train, x_test, y_test = bandwidth_experiment_data()
    errors = [
        ((_nadaraya_watson(x_test, x_train, y_train, h) - y_test) ** 2).mean().item() for h in BANDWIDTHS
    ]
    return BANDWIDTHS[min(range(len(errors)), key=errors.__getitem__)]


@exercise(
    "03.experiment_bandwidth",
    reference=measured_best_bandwidth,
    kind="experiment",
    rtol=1e-9,
    hint=(
        "Run your nadaraya_watson from exercise 6 on x_test for each bandwidth in BANDWIDTHS, and score it.",
        "The score is the mean squared error against y_test: ((prediction - y_test) ** 2).mean(). Tiny "
        "bandwidths chase the noise (one neighbour decides); huge ones flatten the curve to the mean.",
        "min(BANDWIDTHS, key=lambda h: ((nadaraya_watson(x_test, x_train, y_train, h) - y_test) ** "
        "2).mean()).",
    ),
)
def _experiment_bandwidth_cases():
    yield Case((), expected=measured_best_bandwidth(), note="the bandwidth with the lowest held-out error")

"""Chapter 3 exercises: masked softmax, causal mask, attention, heads, kernel regression."""

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
    hint="Replace the hidden scores by -inf (scores.masked_fill(~mask, float('-inf'))), subtract each row's "
    "maximum before exp so large scores cannot overflow, normalise by the row sum, and return 0 for rows "
    "where nothing is visible (torch.nan_to_num or torch.where).",
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
    hint="Query i sits at absolute position i + (k_len - q_len) (the queries are the last q_len positions); "
    "it may see key j when j <= i + (k_len - q_len). "
    "torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=...) builds that in one line.",
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
    hint="scores = q @ k.transpose(-2, -1) / sqrt(q.shape[-1]); where mask is given, use a masked softmax "
    "over the last axis (exercise 1); then weights @ v. Use transpose(-2, -1), not .T, so batch axes stay "
    "put.",
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


def _causal_head(x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    seq = x.shape[-2]
    return scaled_dot_product_attention(x @ w_q.T, x @ w_k.T, x @ w_v.T, causal_mask(seq, seq))


@exercise(
    "03.causal_head",
    reference=_causal_head,
    forbid=(
        "llmbook.attention.scaled_dot_product_attention",
        "torch.nn.functional.scaled_dot_product_attention",
    ),
    hint="q = x @ w_q.T (and likewise k, v) has shape (batch, seq, d_head); scores are "
    "q @ k.transpose(-2, -1) divided by sqrt(d_head), the size of the queries, not d_model; hide keys j > i; "
    "softmax; multiply by v.",
)
def _causal_head_cases():
    g = torch.Generator().manual_seed(2)
    for batch, seq, d_model, d_head, note in [
        (1, 1, 4, 4, "a single position"),
        (1, 5, 8, 8, "5 positions"),
        (2, 7, 8, 3, "d_head smaller than d_model"),
        (3, 4, 6, 6, "a batch of 3"),
    ]:
        x = torch.randn(batch, seq, d_model, generator=g)
        w_q, w_k, w_v = (torch.randn(d_head, d_model, generator=g) for _ in range(3))
        yield Case((x, w_q, w_k, w_v), expected=_causal_head(x, w_q, w_k, w_v), note=note)


def _multi_head(x, w_q, w_k, w_v, w_o, n_heads):
    layer = MultiHeadSelfAttention(x.shape[-1], n_heads, use_sdpa=False)
    with torch.no_grad():
        projections = [layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj]
        for proj, weight in zip(projections, [w_q, w_k, w_v, w_o], strict=True):
            proj.weight.copy_(weight)
        return layer(x)


@exercise(
    "03.multi_head",
    reference=_multi_head,
    forbid=(
        "llmbook.attention.MultiHeadSelfAttention",
        "torch.nn.MultiheadAttention",
    ),
    hint="Project with x @ w.T, split the last axis into heads with "
    "rearrange(t, 'b s (h d) -> b h s d', h=n_heads), run a causal head on every (b, h) at once, merge with "
    "rearrange(t, 'b h s d -> b s (h d)'), and finish with @ w_o.T. Head h owns columns h*d .. (h+1)*d - 1.",
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
    hint="Scores -(x - x_i)^2 / (2 h^2) for every (query, training point) pair via broadcasting "
    "(x_query[:, None] - x_train[None, :]); softmax over the training points (dim=1) — not exp / sum, which "
    "gives 0/0 for a query far from every point — then weights @ y_train.",
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

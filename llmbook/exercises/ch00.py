"""Chapter 0 exercises: the forward pass as a pipeline (embedding look-up, a linear layer, shapes), a
broken loss to debug, and the logits' memory to predict.
"""

import torch
import torch.nn.functional as F
from einops import rearrange

from llmbook.exercises.core import Case, draw, exercise


def _embedding_lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return table[ids]


@exercise(
    "00.embedding_lookup",
    reference=_embedding_lookup,
    forbid=("torch.nn.functional.embedding",),
    hint=(
        "Think of the table as a list of rows, one per token id. What does indexing a tensor with a tensor "
        "of ids give?",
        "An embedding is a table: pick row ids[i] for every id, e.g. by indexing table[ids]. The result "
        "has shape ids.shape + (d_model,).",
    ),
)
def _embedding_lookup_cases():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(10, 4, generator=g)
    yield Case((table, torch.tensor([3])), expected=table[[3]], note="one id")
    yield Case((table, torch.tensor([3, 0, 3])), expected=table[[3, 0, 3]], note="a repeated id")
    ids = torch.randint(0, 10, (2, 5), generator=g)
    yield Case((table, ids), expected=table[ids], note="a (batch, seq) grid of ids")
    yield Case((table, torch.tensor([], dtype=torch.long)), expected=table[:0], note="no ids at all")


# ---------------------------------------------------------------------------------------------
# A linear layer written as dot products: output unit i is the weighted sum of the inputs with row i.


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@exercise(
    "00.linear",
    reference=_linear,
    forbid=("torch.nn.functional.linear",),
    hint=(
        "Each output unit is one dot product: a row of the weight with the input vector, plus that unit's "
        "bias.",
        "Output unit i is the dot product of weight[i] (one row, length d_in) with the input vector, plus"
        " bias[i] when a bias is given. All units at once: x @ weight.T (+ bias). Keep x's leading "
        "dimensions: (..., d_in) -> (..., d_out).",
    ),
)
def _linear_cases():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 5, generator=g)
    x = torch.randn(5, generator=g)
    yield Case((x, w), expected=_linear(x, w), note="one vector, no bias")
    b = torch.randn(3, generator=g)
    yield Case((x, w, b), expected=_linear(x, w, b), note="one vector, with bias")
    w1 = torch.randn(1, 5, generator=g)
    yield Case((x, w1), expected=_linear(x, w1), note="a single output unit (d_out = 1)")
    xs = torch.randn(2, 4, 5, generator=g)
    yield Case((xs, w, b), expected=_linear(xs, w, b), note="a (batch, seq, d_in) activation tensor")
    w_tall = torch.randn(7, 5, generator=g)
    yield Case((xs, w_tall), expected=_linear(xs, w_tall), note="d_out > d_in, so the weight is not square")
    big = 1e3 * torch.randn(3, 5, generator=g)
    yield Case((x, big), expected=_linear(x, big), note="large weights")


# ---------------------------------------------------------------------------------------------
# Splitting the model dimension into heads:
# (batch, seq, n_heads * head_dim) -> (batch, n_heads, seq, head_dim).


def _split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    return rearrange(x, "batch seq (heads head_dim) -> batch heads seq head_dim", heads=n_heads)


@exercise(
    "00.split_heads",
    reference=_split_heads,
    hint=(
        "The last axis holds the heads one after another. Which axis do you split first, and which do you "
        "move afterwards?",
        "The last axis holds the heads one after another: [head 0's head_dim numbers, head 1's, ...]. "
        "Split that axis first, (batch, seq, n_heads, head_dim), and only then move the head axis "
        "forward. x.view(batch, n_heads, seq, head_dim) has the right shape but mixes positions and "
        "heads.",
    ),
)
def _split_heads_cases():
    g = torch.Generator().manual_seed(2)
    yield Case(
        (torch.arange(12.0).reshape(1, 2, 6), 3),
        expected=_split_heads(torch.arange(12.0).reshape(1, 2, 6), 3),
        note="counting numbers, 2 positions, 3 heads of size 2",
    )
    for shape, n_heads, note in [
        ((2, 5, 12), 4, "batch 2, seq 5, 4 heads of size 3"),
        ((1, 1, 8), 2, "a single position"),
        ((3, 4, 6), 1, "one head (nothing to split)"),
        ((2, 3, 6), 6, "heads of size 1"),
        ((2, 4, 8), 4, "seq equal to n_heads, where a wrong view keeps the shape"),
    ]:
        x = torch.randn(*shape, generator=g)
        yield Case((x, n_heads), expected=_split_heads(x, n_heads), note=note)


# ---------------------------------------------------------------------------------------------
# Training targets: at every position the model is asked for the token that comes next.


def _next_token_targets(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ids[..., :-1], ids[..., 1:]


def _next_token_targets_hidden(g):
    for _ in range(3):
        ids = torch.randint(0, 1000, (draw(g, 1, 4), draw(g, 2, 12)), generator=g)
        yield Case((ids,), note="random ids")


@exercise(
    "00.next_token_targets",
    reference=_next_token_targets,
    hidden=_next_token_targets_hidden,
    hint=(
        "At every position the model is asked for the token that comes next: the target sequence is the "
        "input moved by one.",
        "From one row of n ids you get n - 1 training examples: the inputs are ids[..., :-1] and the "
        "target at each input position is the id one step to the right, ids[..., 1:]. Return (inputs, "
        "targets).",
    ),
)
def _next_token_targets_cases():
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([[5, 9, 2, 7]])
    yield Case((ids,), expected=_next_token_targets(ids), note="one row of 4 ids")
    ids = torch.tensor([[4, 8]])
    yield Case((ids,), expected=_next_token_targets(ids), note="two ids make a single example")
    ids = torch.randint(0, 50257, (3, 9), generator=g)
    yield Case((ids,), expected=_next_token_targets(ids), note="a (batch, seq) grid of GPT-2 ids")
    ids = torch.tensor([1, 2, 3, 4, 5])
    yield Case((ids,), expected=_next_token_targets(ids), note="a single 1-D row")


# ---------------------------------------------------------------------------------------------
# The training loss: mean cross-entropy of the next token, from logits and the ids they were computed on.


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    from llmbook.loss import cross_entropy

    return cross_entropy(logits[:, :-1], ids[:, 1:])


def _broken_next_token_loss(logits, ids):
    """Mean next-token cross-entropy of (batch, seq, vocab) logits against the (batch, seq) ids."""
    probs = torch.softmax(logits, dim=-1)
    picked = probs.gather(-1, ids[..., None]).squeeze(-1)  # the probability given to each id
    return -torch.log(picked).mean()


@exercise(
    "00.next_token_loss",
    reference=_next_token_loss,
    kind="debug",
    broken=_broken_next_token_loss,
    forbid=(
        "llmbook.loss.cross_entropy",
        "torch.nn.functional.cross_entropy",
    ),
    hint=(
        "Two things are wrong. Ask of position t: which token is its logit row meant to predict?",
        "logits[:, t] is the prediction made after reading ids[:, :t+1], so it is scored against ids[:, "
        "t+1]: "
        "drop the last position's logits and the first id. And log(softmax(z)) is -inf once a probability "
        "underflows to 0; log_softmax never is.",
        "Look at lines 3 to 5. Line 4 (`ids[..., None]`) scores each position's logits against the id"
        " at the same position, not the one after it, so the last position has nothing to predict; "
        "and line 3's `torch.softmax` followed by line 5's `torch.log` gives -inf once a probability "
        "underflows to 0. Which logits and ids belong together, and which torch function takes the "
        "log of a softmax in one step?",
    ),
)
def _next_token_loss_cases():
    g = torch.Generator().manual_seed(4)
    for (batch, seq, vocab), note in [
        ((1, 2, 5), "one example: two ids"),
        ((2, 6, 11), "batch 2, seq 6, vocab 11"),
        ((3, 4, 50), "vocab 50"),
    ]:
        logits = torch.randn(batch, seq, vocab, generator=g)
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        yield Case((logits, ids), expected=_next_token_loss(logits, ids), note=note)
    logits = 200.0 * torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    yield Case(
        (logits, ids), expected=_next_token_loss(logits, ids), note="large logits (softmax would overflow)"
    )
    logits = torch.zeros(1, 3, 50257)
    ids = torch.tensor([[1, 2, 3]])
    yield Case(
        (logits, ids), expected=_next_token_loss(logits, ids), note="uniform logits: the loss is ln(vocab)"
    )


# ---------------------------------------------------------------------------------------------
# Predict: how much memory the logits of one forward pass take.

LOGITS_SETUP = dict(vocab_size=5000, batch=2, seq=64)


def measured_logits_bytes() -> int:
    """Bytes of the float32 logits a TransformerLM returns for LOGITS_SETUP, measured by running it."""
    from llmbook.model import ModelConfig, TransformerLM

    setup = LOGITS_SETUP
    config = ModelConfig(
        vocab_size=setup["vocab_size"], context_length=setup["seq"], d_model=16, n_layers=1, n_heads=2
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # leave the reader's random state alone
        torch.manual_seed(0)
        logits = TransformerLM(config)(torch.zeros(setup["batch"], setup["seq"], dtype=torch.long))
    return logits.nelement() * logits.element_size()


@exercise(
    "00.predict_logits_bytes",
    reference=measured_logits_bytes,
    kind="predict",
    hint=(
        "The logits hold one score per vocabulary entry at every position of every sequence.",
        "The logits tensor has shape (batch, seq, vocab_size); each float32 number takes 4 bytes.",
        "2 * 64 * 5000 numbers, times 4 bytes each.",
    ),
)
def _predict_logits_bytes_cases():
    yield Case((), expected=measured_logits_bytes(), note="batch 2, seq 64, vocab 5000, float32")

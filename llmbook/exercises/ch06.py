"""Chapter 6 exercises: a stable softmax to debug, cross-entropy, KL divergence derived from two
entropies, counting a model's parameters, and the initial loss to predict.
"""

import torch
import torch.nn.functional as F

from llmbook.exercises.core import Case, draw, exercise
from llmbook.loss import cross_entropy
from llmbook.model import ModelConfig, TransformerLM, count_parameters


def _softmax(logits):
    return torch.softmax(logits, dim=-1)


def _kl_divergence(p, q):
    # torch's kl_div takes log q and p, and uses the convention 0 · log 0 = 0 for p = 0.
    return F.kl_div(q.log(), p, reduction="none").sum(dim=-1)


def _parameter_count(vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff, tie_embeddings):
    config = ModelConfig(
        vocab_size=vocab_size,
        context_length=16,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_ff=d_ff,
        tie_embeddings=tie_embeddings,
    )
    with torch.device("meta"):  # shapes only: even a 7-billion-parameter model costs no memory
        model = TransformerLM(config)
    return count_parameters(model)


def _broken_stable_softmax(logits):
    """(..., vocab) -> (..., vocab) probabilities along the last axis, safe for huge logits."""
    shifted = logits - logits.max()  # the largest entry is now 0: nothing overflows
    e = torch.exp(shifted)
    return e / e.sum(dim=-1, keepdim=True)


@exercise(
    "06.stable_softmax",
    reference=_softmax,
    kind="debug",
    broken=_broken_stable_softmax,
    forbid=(
        "torch.softmax",
        "torch.nn.functional.softmax",
        "torch.Tensor.softmax",
    ),
    hint=(
        "It passes one row at a time. What is logits.max() when there are several rows on different scales?",
        "logits.max() is the maximum of the whole tensor, so a row far below it underflows: every exp is 0 "
        "and 0 / 0 is NaN. The shift must be each row's own maximum, taken over the last axis.",
        "Look at line 3: `logits.max()` has no dim, so every row is shifted by the maximum of the "
        "whole tensor and a row far below it underflows to all zeros. Which maximum should each row "
        "subtract?",
    ),
)
def _stable_softmax_cases():
    g = torch.Generator().manual_seed(60)
    yield Case(
        (torch.tensor([1.0, 2.0, 3.0]),), expected=_softmax(torch.tensor([1.0, 2.0, 3.0])), note="a small row"
    )
    x = torch.randn(2, 3, 7, generator=g)
    yield Case((x,), expected=_softmax(x), note="a (batch, seq, vocab) tensor")
    x = torch.tensor([[1000.0, 999.0, 998.0], [0.0, 500.0, -500.0]])
    yield Case((x,), expected=_softmax(x), note="huge logits: exp(1000) overflows float32")
    x = torch.tensor([[-1000.0, -1001.0, -1002.0]])
    yield Case((x,), expected=_softmax(x), note="very negative logits: every exp underflows to 0")
    x = torch.tensor([[2.0, float("-inf"), 0.5, float("-inf")]])
    yield Case((x,), expected=_softmax(x), note="masked entries at -inf get probability 0")
    x = torch.tensor([[7.5]])
    yield Case((x,), expected=_softmax(x), note="a vocabulary of one token")


@exercise(
    "06.cross_entropy",
    reference=cross_entropy,
    forbid=(
        "llmbook.loss.cross_entropy",
        "torch.nn.functional.cross_entropy",
    ),
    hint=(
        "The loss of one row is -log softmax(logits)[target]; compute log softmax stably with logsumexp.",
        "Flatten to (N, vocab) and (N,). Per row, loss = logsumexp(logits) - logits[target], where "
        "logsumexp(z) = max(z) + log(sum(exp(z - max(z)))). Drop rows whose target is -100, and return the "
        "mean over the rest as a 0-dim tensor (nats per token).",
    ),
)
def _cross_entropy_cases():
    g = torch.Generator().manual_seed(61)
    logits = torch.randn(1, 5, generator=g)
    yield Case(
        (logits, torch.tensor([2])), expected=cross_entropy(logits, torch.tensor([2])), note="one token"
    )
    logits, targets = torch.randn(6, 11, generator=g), torch.randint(0, 11, (6,), generator=g)
    yield Case((logits, targets), expected=cross_entropy(logits, targets), note="(N, vocab) logits")
    logits, targets = torch.randn(2, 4, 9, generator=g), torch.randint(0, 9, (2, 4), generator=g)
    yield Case((logits, targets), expected=cross_entropy(logits, targets), note="(batch, seq, vocab) logits")
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [5.0, 800.0, 3.0]])
    targets = torch.tensor([1, 2])
    yield Case(
        (logits, targets), expected=cross_entropy(logits, targets), note="huge logits (need logsumexp)"
    )
    logits, targets = torch.randn(5, 7, generator=g), torch.tensor([3, -100, 0, -100, 6])
    yield Case(
        (logits, targets),
        expected=cross_entropy(logits, targets),
        note="targets of -100 are ignored (padding)",
    )


@exercise(
    "06.kl_divergence",
    reference=_kl_divergence,
    kind="derive",
    forbid=("torch.nn.functional.kl_div",),
    hint=(
        "Start from KL(P‖Q) = Σ p (log p - log q) and split the sum in two: one part is -H(P), the other "
        "H(P, Q).",
        "H(P, Q) = -Σ p log q and H(P) = -Σ p log p, each summed over the last axis. Terms with p = 0 "
        "contribute 0 (the limit of p log p), so compute p log x with torch.xlogy(p, x), never 0 · -inf.",
        "return -torch.xlogy(p, q).sum(-1) - (-torch.xlogy(p, p).sum(-1)).",
    ),
)
def _kl_divergence_cases():
    g = torch.Generator().manual_seed(62)
    p = torch.softmax(torch.randn(5, generator=g), -1)
    yield Case((p, p.clone()), expected=_kl_divergence(p, p), note="P = Q gives 0")
    p, q = (
        torch.softmax(torch.randn(2, 3, 6, generator=g), -1),
        torch.softmax(torch.randn(2, 3, 6, generator=g), -1),
    )
    yield Case((p, q), expected=_kl_divergence(p, q), note="a (batch, seq, vocab) of distributions")
    q = torch.softmax(torch.randn(4, 8, generator=g), -1)
    one_hot = F.one_hot(torch.tensor([0, 3, 7, 3]), 8).float()
    yield Case((one_hot, q), expected=_kl_divergence(one_hot, q), note="one-hot P: KL = cross-entropy")
    p = torch.tensor([[0.5, 0.0, 0.5, 0.0]])
    q = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    yield Case((p, q), expected=_kl_divergence(p, q), note="P has zeros (0 · log 0 counts as 0)")
    yield Case((q, p + 1e-30), expected=_kl_divergence(q, p + 1e-30), note="the other direction is huge")


def _parameter_count_hidden(g):
    n_kv_heads = draw(g, 1, 4)
    n_heads = n_kv_heads * draw(g, 1, 4)
    d_model = n_heads * 2 * draw(g, 1, 8)
    args = (
        draw(g, 10, 500),
        d_model,
        draw(g, 1, 4),
        n_heads,
        n_kv_heads,
        draw(g, 4, 200),
        bool(draw(g, 0, 2)),
    )
    yield Case(args, note="a random small configuration")


@exercise(
    "06.parameter_count",
    reference=_parameter_count,
    forbid=(
        "llmbook.model.count_parameters",
        "llmbook.model.TransformerLM",
    ),
    hidden=_parameter_count_hidden,
    hint=(
        "Count matrix by matrix: embeddings, per block (attention projections, feed-forward, two norms), "
        "final norm, head.",
        "Per block: 2 norm gains of d_model; q and o are d_model × d_model; k and v are d_model × "
        "(n_kv_heads · head_dim) with head_dim = d_model // n_heads; SwiGLU has 3 · d_model · d_ff. Add the "
        "embedding table (vocab × d_model), the final norm (d_model) and lm_head (vocab × d_model) unless "
        "tied.",
    ),
)
def _parameter_count_cases():
    configs = [
        ("a tiny model", (65, 8, 1, 2, 2, 16, False)),
        ("tied embeddings: the LM head is the embedding table", (65, 8, 1, 2, 2, 16, True)),
        ("grouped-query attention (2 key/value heads for 8 query heads)", (100, 64, 3, 8, 2, 172, False)),
        ("Llama-2 7B", (32000, 4096, 32, 32, 32, 11008, False)),
        ("GPT-2-small-sized, tied", (50257, 768, 12, 12, 12, 2048, True)),
    ]
    for note, args in configs:
        yield Case(args, expected=_parameter_count(*args), note=note)


# ---------------------------------------------------------------------------------------------
# Predict: the loss of a model that has learned nothing yet.

INITIAL_LOSS_SETUP = dict(vocab_size=1000, context_length=64, d_model=64, n_layers=2, n_heads=4)


def measured_initial_loss() -> float:
    """Next-token cross-entropy (nats) of a freshly initialised TransformerLM on random ids, seeded."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # leave the reader's random state alone
        torch.manual_seed(0)
        model = TransformerLM(ModelConfig(**INITIAL_LOSS_SETUP))
        ids = torch.randint(0, INITIAL_LOSS_SETUP["vocab_size"], (8, INITIAL_LOSS_SETUP["context_length"]))
        logits = model(ids)
    return cross_entropy(logits[:, :-1], ids[:, 1:]).item()


@exercise(
    "06.predict_initial_loss",
    reference=measured_initial_loss,
    kind="predict",
    rtol=0.01,
    hint=(
        "At initialisation the weights are small, so the logits are nearly equal. What distribution is that?",
        "Nearly equal logits give a nearly uniform softmax: every one of the V tokens gets probability 1/V.",
        "The cross-entropy of a uniform prediction is -log(1/V) = ln V, here ln 1000.",
    ),
)
def _predict_initial_loss_cases():
    yield Case((), expected=measured_initial_loss(), note="vocab 1000, within 1%")

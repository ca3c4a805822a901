"""Chapter 9 exercises: temperature to debug, a sampling experiment, top-p to debug, a KV-cache step, and
a KV cache's memory to predict.
"""

import torch
from einops import rearrange

from llmbook.attention import KVCache, MultiHeadSelfAttention
from llmbook.exercises.core import Case, exercise
from llmbook.sample import sample_next_token, top_p_filter

# ----------------------------------------------------------------------------------------------------
# Debug: temperature in the wrong place.


def _sampling_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # The package's sampler divides the logits by the temperature before the softmax.
    return torch.softmax(logits.float() / temperature, dim=-1)


def _broken_sampling_probs(logits, temperature):
    """The distribution sample_next_token draws from at this temperature (no top-k/top-p)."""
    probs = torch.softmax(logits, dim=-1) / temperature
    return probs / probs.sum(dim=-1, keepdim=True)


@exercise(
    "09.sampling_probs",
    reference=_sampling_probs,
    kind="debug",
    broken=_broken_sampling_probs,
    forbid=("llmbook.sample.sample_next_token",),
    hint=(
        "Try temperatures 0.5 and 2 on the same logits: does the broken version change anything at all?",
        "Dividing probabilities by T and renormalising cancels T exactly. Temperature must act before the "
        "softmax, on the logits: softmax(z / T) sharpens for T < 1 and flattens for T > 1.",
        "Look at line 3: dividing the probabilities by `temperature` is undone by line 4's "
        "renormalisation, whatever the temperature. Where must the temperature act so that the "
        "softmax keeps it?",
    ),
)
def _sampling_probs_cases():
    g = torch.Generator().manual_seed(90)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for t in (1.0, 0.5, 2.0):
        yield Case((logits, t), expected=_sampling_probs(logits, t), note=f"temperature {t}")
    batch = 3 * torch.randn(3, 20, generator=g)
    yield Case((batch, 0.7), expected=_sampling_probs(batch, 0.7), note="a batch of 3 rows, temperature 0.7")
    yield Case((batch, 0.05), expected=_sampling_probs(batch, 0.05), note="temperature 0.05: nearly greedy")


# ----------------------------------------------------------------------------------------------------
# Experiment: how hot must sampling be before the favourite token stops winning most draws?

TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0)
EXPERIMENT_LOGITS = (2.0, 1.0, 0.0, -1.0)


def _top_token_share(temperature: float, n_draws: int = 10000, seed: int = 0) -> float:
    """Fraction of `n_draws` tokens sampled by the package at `temperature` that are token 0."""
    logits = torch.tensor(EXPERIMENT_LOGITS).expand(n_draws, -1)
    draws = sample_next_token(logits, temperature, generator=torch.Generator().manual_seed(seed))
    return (draws == 0).float().mean().item()


def measured_coolest_losing_temperature() -> float:
    """The smallest temperature in TEMPERATURES at which token 0 wins under half of the sampled draws."""
    return next(t for t in TEMPERATURES if _top_token_share(t) < 0.5)


@exercise(
    "09.experiment_temperature",
    reference=measured_coolest_losing_temperature,
    kind="experiment",
    rtol=1e-9,
    hint=(
        "Sample many tokens at each temperature with llmbook.sample.sample_next_token and count token 0.",
        "Give sample_next_token a (n_draws, vocab) batch of the same logits (logits.expand(n, -1)) and a "
        "seeded torch.Generator; (draws == 0).float().mean() is the share. Which is the first temperature "
        "where it falls below 0.5?",
        "next(t for t in TEMPERATURES if share(t) < 0.5), with share(t) measured as above.",
    ),
)
def _experiment_temperature_cases():
    yield Case((), expected=measured_coolest_losing_temperature(), note="logits (2, 1, 0, -1)")


# ----------------------------------------------------------------------------------------------------
# 09.top_p_filter


def _broken_top_p_filter(logits, p):
    """Logits with everything outside each row's nucleus (smallest top set with mass >= p) set to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative >= p  # past the nucleus
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@exercise(
    "09.top_p_filter",
    reference=top_p_filter,
    kind="debug",
    broken=_broken_top_p_filter,
    forbid=("llmbook.sample.top_p_filter",),
    hint=(
        "An off-by-one: look at the token whose probability makes the running total cross p. Is it kept?",
        "cumsum includes each token's own probability, so `cumulative >= p` drops the very token that "
        "reaches p "
        "(and with p below the top token's probability, drops every token). Decide on the mass ranked above.",
        "Look at line 5, `cumulative >= p`: `cumulative` includes each token's own probability, so "
        "the token that brings the total to p is dropped with the ones after it. Compare p with the "
        "mass ranked above each token instead.",
    ),
)
def _top_p_cases():
    logits = torch.log(torch.tensor([0.05, 0.6, 0.1, 0.25]))
    yield Case((logits, 0.7), expected=top_p_filter(logits, 0.7), note="probs .05 .6 .1 .25, p = 0.7")
    yield Case((logits, 0.5), expected=top_p_filter(logits, 0.5), note="p below the top token: keep only it")
    yield Case((logits, 1.0), expected=top_p_filter(logits, 1.0), note="p = 1 keeps everything")
    g = torch.Generator().manual_seed(82)
    batch = 3 * torch.randn(4, 50, generator=g)
    yield Case((batch, 0.9), expected=top_p_filter(batch, 0.9), note="a batch of 4 rows over 50 tokens")
    masked = batch[:2].clone()
    masked[:, ::3] = float("-inf")
    yield Case(
        (masked, 0.8), expected=top_p_filter(masked, 0.8), note="rows already filtered by top-k (-inf)"
    )
    grid = 2 * torch.randn(2, 3, 20, generator=g)
    yield Case((grid, 0.6), expected=top_p_filter(grid, 0.6), note="(batch, seq, vocab) logits")
    peaked = torch.tensor([[50.0, 0.0, 0.0, 0.0]])
    yield Case((peaked, 0.99), expected=top_p_filter(peaked, 0.99), note="one token holds almost all mass")


# ----------------------------------------------------------------------------------------------------
# 09.kv_cache_step


def _attention_with(w_q, w_k, w_v, w_o, n_heads):
    """The package's multi-head attention holding the given (d_model, d_model) projection weights."""
    attn = MultiHeadSelfAttention(w_q.shape[1], n_heads)
    with torch.no_grad():
        for name, w in (("q_proj", w_q), ("k_proj", w_k), ("v_proj", w_v), ("o_proj", w_o)):
            getattr(attn, name).weight.copy_(w)
    return attn


def _full_attention_last_row(x_all, w_q, w_k, w_v, w_o, n_heads):
    """The last position's output of plain causal multi-head attention over x_all (batch, seq, d_model)."""
    with torch.no_grad():
        return _attention_with(w_q, w_k, w_v, w_o, n_heads)(x_all)[:, -1]


def _split_heads(t, n_heads):
    return rearrange(t, "batch seq (heads head_dim) -> batch heads seq head_dim", heads=n_heads)


def _kv_reference(x_new, w_q, w_k, w_v, w_o, k_cache, v_cache, n_heads):
    """Reference via the package's attention module in cached mode."""
    batch, d_model = x_new.shape
    n_past = k_cache.shape[2]
    attn = _attention_with(w_q, w_k, w_v, w_o, n_heads)
    cache = KVCache(1, batch, n_heads, n_past + 1, d_model // n_heads)
    with torch.no_grad():
        if n_past:
            cache.update(0, k_cache, v_cache)
            cache.advance(n_past)
        out = attn(x_new[:, None], kv_cache=cache)[:, 0]
        keys, values = cache.update(
            0, *(_split_heads(p(x_new[:, None]), n_heads) for p in (attn.k_proj, attn.v_proj))
        )
    return out, keys.clone(), values.clone()


@exercise(
    "09.kv_cache_step",
    reference=_kv_reference,
    forbid=(
        "llmbook.attention.MultiHeadSelfAttention",
        "llmbook.attention.KVCache",
    ),
    hint=(
        "Only the new token is projected; its key and value join the cache, and its query attends to all of "
        "it.",
        "Project the new token: q = x_new @ w_q.T (and k, v likewise), split each into (batch, n_heads, 1, "
        "head_dim). Append k and v to the caches along the position axis (dim 2). Scores = q @ keys.T / "
        "sqrt(head_dim) over all n_past + 1 keys (no mask: the newest token may see them all), softmax, "
        "weighted sum of values, merge heads back to (batch, d_model), multiply by w_o.T.",
    ),
    atol=1e-5,
)
def _kv_cases():
    g = torch.Generator().manual_seed(83)
    for batch, n_past, d_model, n_heads, note in [
        (1, 0, 8, 2, "empty cache: the first token attends only to itself"),
        (1, 1, 8, 2, "one cached position"),
        (2, 7, 16, 4, "batch 2, 7 cached positions, 4 heads"),
        (3, 20, 12, 1, "a single head"),
        (1, 64, 32, 8, "64 cached positions, head_dim 4"),
    ]:
        w_q, w_k, w_v, w_o = (torch.randn(d_model, d_model, generator=g) / d_model**0.5 for _ in range(4))
        x_past = torch.randn(batch, n_past, d_model, generator=g)
        x_new = torch.randn(batch, d_model, generator=g)
        k_cache = _split_heads(x_past @ w_k.T, n_heads)
        v_cache = _split_heads(x_past @ w_v.T, n_heads)
        # Expected output from full causal attention over past + new (no cache involved) ...
        x_all = torch.cat([x_past, x_new[:, None]], dim=1)
        out = _full_attention_last_row(x_all, w_q, w_k, w_v, w_o, n_heads)
        # ... and expected caches from projecting every input.
        keys, values = _split_heads(x_all @ w_k.T, n_heads), _split_heads(x_all @ w_v.T, n_heads)
        args = (x_new, w_q, w_k, w_v, w_o, k_cache, v_cache, n_heads)
        yield Case(args, expected=(out, keys, values), note=note)


# ----------------------------------------------------------------------------------------------------
# Predict: the memory a KV cache needs.

KV_SETUP = dict(n_layers=12, batch_size=1, n_kv_heads=4, max_length=2048, head_dim=64)


def measured_kv_cache_bytes() -> int:
    """Bytes of keys and values in the package's float32 KVCache for KV_SETUP (shapes only, on meta)."""
    cache = KVCache(**KV_SETUP, device="meta")
    return sum(t.nelement() * t.element_size() for t in cache.keys + cache.values)


@exercise(
    "09.predict_kv_cache_bytes",
    reference=measured_kv_cache_bytes,
    kind="predict",
    hint=(
        "Every layer stores a key and a value vector per cached position and per key/value head.",
        "Each layer holds keys and values of shape (batch, n_kv_heads, max_length, head_dim), float32: 4 "
        "bytes.",
        "2 (keys and values) · 12 layers · 1 · 4 · 2048 · 64 · 4 bytes.",
    ),
)
def _predict_kv_cache_bytes_cases():
    yield Case((), expected=measured_kv_cache_bytes(), note="12 layers, 4 KV heads, 2048 positions, float32")

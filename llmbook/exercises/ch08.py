"""Chapter 8 exercises: batches, an AdamW step and top-p to debug, the learning-rate schedule, a KV-cache
step, temperature to debug, a KV cache's memory to predict, and a sampling experiment.
"""

import torch
from einops import rearrange

from llmbook.attention import KVCache, MultiHeadSelfAttention
from llmbook.exercises.core import Case, draw, exercise
from llmbook.optim import AdamW, cosine_schedule
from llmbook.sample import top_p_filter

# ----------------------------------------------------------------------------------------------------
# 08.batch_windows


def _batch_windows(tokens: torch.Tensor, starts: torch.Tensor, context_length: int):
    x = torch.stack([tokens[s : s + context_length] for s in starts.tolist()])
    y = torch.stack([tokens[s + 1 : s + 1 + context_length] for s in starts.tolist()])
    return x, y


def _batch_windows_hidden(g):
    tokens = torch.randint(0, 1024, (200,), generator=g)
    context_length = draw(g, 1, 40)
    starts = torch.randint(0, 200 - context_length, (draw(g, 1, 6),), generator=g)
    yield Case((tokens, starts, context_length), note="random starts and context length")


@exercise(
    "08.batch_windows",
    reference=_batch_windows,
    hidden=_batch_windows_hidden,
    hint=(
        "Each start gives one input window and the same window shifted by one token as its targets.",
        "Row i of x is tokens[starts[i] : starts[i] + context_length]; row i of y is the same window moved "
        "one token to the right. Stack the rows with torch.stack; both come out (len(starts), "
        "context_length).",
    ),
)
def _batch_windows_cases():
    tokens = torch.arange(100, 120)
    yield Case(
        (tokens, torch.tensor([0]), 4),
        expected=_batch_windows(tokens, torch.tensor([0]), 4),
        note="one window",
    )
    starts = torch.tensor([3, 0, 3])
    yield Case((tokens, starts, 5), expected=_batch_windows(tokens, starts, 5), note="a repeated start")
    starts = torch.tensor([19 - 6])
    yield Case(
        (tokens, starts, 6), expected=_batch_windows(tokens, starts, 6), note="the last possible window"
    )
    g = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, 1024, (500,), generator=g)
    starts = torch.randint(0, 500 - 33, (8,), generator=g)
    yield Case((tokens, starts, 32), expected=_batch_windows(tokens, starts, 32), note="batch 8, context 32")
    yield Case(
        (tokens, starts[:2], 1), expected=_batch_windows(tokens, starts[:2], 1), note="context length 1"
    )


# ----------------------------------------------------------------------------------------------------
# 08.adamw_step


def _adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    # Run the package's optimizer for one update from the given state.
    p = torch.nn.Parameter(param.clone())
    p.grad = grad.clone()
    optimizer = AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    optimizer.state[p] = {
        "step": torch.tensor(float(step - 1)),
        "exp_avg": exp_avg.clone(),
        "exp_avg_sq": exp_avg_sq.clone(),
    }
    optimizer.step()
    state = optimizer.state[p]
    return p.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()


def _broken_adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """One AdamW update; returns new (param, exp_avg, exp_avg_sq). step counts from 1."""
    beta1, beta2 = betas
    grad = grad + weight_decay * param  # weight decay
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    param = param - lr * exp_avg / (exp_avg_sq.sqrt() + eps)
    return param, exp_avg, exp_avg_sq


@exercise(
    "08.adamw_step",
    reference=_adamw_step,
    kind="debug",
    broken=_broken_adamw_step,
    forbid=(
        "llmbook.optim.AdamW",
        "torch.optim.AdamW",
    ),
    hint=(
        "Two bugs. One is what makes AdamW differ from Adam with L2 regularisation; the other shows on step "
        "1.",
        "Adding weight_decay * param to the gradient is L2 regularisation, which Adam then rescales per "
        "coordinate; AdamW decays the weights directly, p * (1 - lr * weight_decay), outside the moments. "
        "And "
        "m and v start at zero, so they need the bias corrections m / (1 - b1**step), v / (1 - b2**step).",
        "Look at lines 4 and 7. Line 4 folds the decay into the gradient (L2 regularisation, which "
        "the moments then rescale), where AdamW shrinks the parameter itself, outside the moments; "
        "and line 7 divides `exp_avg` by the root of `exp_avg_sq` as they are, without the bias "
        "corrections that undo their start at zero (they depend on `step`).",
    ),
)
def _adamw_step_cases():
    g = torch.Generator().manual_seed(81)

    def case(
        shape,
        step,
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        scale=1.0,
        zero_state=False,
        note="",
    ):
        param = torch.randn(shape, generator=g)
        grad = scale * torch.randn(shape, generator=g)
        if zero_state:
            exp_avg, exp_avg_sq = torch.zeros(shape), torch.zeros(shape)
        else:
            exp_avg = 0.1 * torch.randn(shape, generator=g)
            exp_avg_sq = 0.01 * torch.rand(shape, generator=g)
        args = (param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay)
        return Case(args, expected=_adamw_step(*args), note=note)

    yield case((5,), step=1, zero_state=True, note="the very first step (moments start at zero)")
    yield case((3, 4), step=10, note="step 10 of a (3, 4) weight")
    yield case((1,), step=1, zero_state=True, weight_decay=0.0, note="one number, no weight decay")
    yield case((6,), step=200, lr=3e-4, betas=(0.9, 0.999), note="a late step with beta2 = 0.999")
    yield case((4, 2), step=3, scale=1e3, note="huge gradients (Adam's update size does not care)")
    yield case((2, 3), step=5, scale=0.0, note="zero gradient: only decay and the old moments act")


# ----------------------------------------------------------------------------------------------------
# 08.cosine_schedule


def _cosine_schedule_hidden(g):
    warmup, decay = draw(g, 0, 50), draw(g, 60, 400)
    for _ in range(3):
        kwargs = dict(step=draw(g, 0, 500), max_lr=3e-3, min_lr=2e-4, warmup_steps=warmup, cosine_steps=decay)
        yield Case(kwargs=kwargs, note="a random step of a random schedule", atol=1e-12, rtol=1e-9)


@exercise(
    "08.cosine_schedule",
    reference=cosine_schedule,
    forbid=("llmbook.optim.cosine_schedule",),
    hidden=_cosine_schedule_hidden,
    hint=(
        "Three phases: a linear warm-up, a half cosine from max_lr down to min_lr, then constant min_lr.",
        "Below warmup_steps: max_lr * step / warmup_steps. Between warmup_steps and cosine_steps: "
        "progress = (step - warmup_steps) / (cosine_steps - warmup_steps) and "
        "lr = min_lr + 0.5 * (1 + cos(pi * progress)) * (max_lr - min_lr). After cosine_steps: min_lr.",
    ),
)
def _cosine_schedule_cases():
    base = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=100, cosine_steps=1000)
    for step, note in [
        (0, "step 0: warm-up starts at zero"),
        (30, "in the warm-up"),
        (100, "the end of the warm-up: the peak"),
        (550, "halfway down the cosine: the mean of max_lr and min_lr"),
        (999, "the last step of the decay"),
        (1000, "step cosine_steps: min_lr"),
        (5000, "long after the decay: stays at min_lr"),
    ]:
        kwargs = dict(step=step, **base)
        yield Case(kwargs=kwargs, expected=cosine_schedule(**kwargs), note=note, atol=1e-12, rtol=1e-9)
    for kwargs, note in [
        (
            dict(step=0, max_lr=6e-4, min_lr=6e-5, warmup_steps=0, cosine_steps=50),
            "no warm-up: starts at the peak",
        ),
        (dict(step=25, max_lr=6e-4, min_lr=0.0, warmup_steps=0, cosine_steps=50), "min_lr = 0, halfway"),
        (
            dict(step=7, max_lr=1.0, min_lr=1.0, warmup_steps=10, cosine_steps=10),
            "a constant schedule with warm-up",
        ),
    ]:
        yield Case(kwargs=kwargs, expected=cosine_schedule(**kwargs), note=note, atol=1e-12, rtol=1e-9)


# ----------------------------------------------------------------------------------------------------
# 08.top_p_filter


def _broken_top_p_filter(logits, p):
    """Logits with everything outside each row's nucleus (smallest top set with mass >= p) set to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative >= p  # past the nucleus
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@exercise(
    "08.top_p_filter",
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
# 08.kv_cache_step


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
    "08.kv_cache_step",
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
    "08.predict_kv_cache_bytes",
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
    "08.sampling_probs",
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
    from llmbook.sample import sample_next_token

    logits = torch.tensor(EXPERIMENT_LOGITS).expand(n_draws, -1)
    draws = sample_next_token(logits, temperature, generator=torch.Generator().manual_seed(seed))
    return (draws == 0).float().mean().item()


def measured_coolest_losing_temperature() -> float:
    """The smallest temperature in TEMPERATURES at which token 0 wins under half of the sampled draws."""
    return next(t for t in TEMPERATURES if _top_token_share(t) < 0.5)


@exercise(
    "08.experiment_temperature",
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

"""Generation: run the model on the prompt, turn the last position's logits into a next token, append it,
repeat. The choice of token is greedy (temperature 0) or a draw from softmax(logits / temperature),
which tends to greedy as the temperature shrinks (a temperature too small for float32 is computed in
float64, so every positive one is a valid distribution: the likeliest token, ties drawn among), optionally
restricted to the k most likely tokens (top-k) or to the smallest set of tokens holding
probability p (top-p, "nucleus"). With a KV cache each new token costs one position of work instead of
re-reading the whole prefix.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from llmbook.errors import ConfigValueError, check_fits_in_memory


def _floating(logits: Tensor) -> Tensor:
    """Integer scores as float32 (a filtered-out logit is -inf, which needs a floating dtype)."""
    return logits if logits.is_floating_point() else logits.float()


def top_k_filter(logits: Float[Tensor, "*batch vocab"], k: int) -> Float[Tensor, "*batch vocab"]:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be a positive integer, got {k!r}")
    logits = _floating(logits)
    if k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: Float[Tensor, "*batch vocab"], p: float) -> Float[Tensor, "*batch vocab"]:
    """Keep the most likely tokens whose probabilities first add up to at least p; the rest get -inf.

    The most likely token always survives, so p -> 0 approaches greedy decoding and p = 1 changes nothing.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")
    logits = _floating(logits)
    if p == 1.0:  # keep everything: a float32 running sum can reach 1.0 before the last tokens
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = sorted_logits.float().softmax(dim=-1)
    # Drop a token when the tokens ranked above it already hold probability >= p; the likeliest token
    # is kept explicitly, since a p below float32's range rounds to 0 and 0 >= 0 would drop it too.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: Float[Tensor, "batch vocab"],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " batch"]:
    """One token id per row: argmax when temperature == 0, else a draw from the filtered softmax."""
    _check_sampling_args(temperature, top_k, top_p)
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a vocabulary axis of size >= 1, got shape {tuple(logits.shape)}")
    largest = logits.max(dim=-1).values
    # NaN: argmax would return its position and multinomial fail; +inf or a row of -inf: no distribution.
    if bool(torch.isnan(logits).any()) or not bool(torch.isfinite(largest).all()):
        raise ValueError(
            "the logits contain NaN or +inf, or a row has no finite logit, so no token can be chosen; the "
            "model's weights or inputs are broken (check them with torch.isfinite)"
        )
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = _scale(logits, largest, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)  # a generator only draws for tensors on its own device
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1).to(logits.device)


def _scale(
    logits: Float[Tensor, "batch vocab"], largest: Float[Tensor, " batch"], temperature: float
) -> Float[Tensor, "batch vocab"]:
    """logits / temperature in float32; when that overflows (a tiny temperature), the same distribution
    from the logits minus their row maximum, divided in float64: 0 for the likeliest, -inf for the rest."""
    scaled = logits.float() / temperature
    if bool(torch.isfinite(scaled.max(dim=-1).values).all()):
        return scaled
    shifted = logits.double() - largest.double().unsqueeze(-1)
    return (shifted / temperature).float()


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not _is_number(temperature) or not 0 <= temperature < float("inf"):
        raise ConfigValueError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}", "temperature"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigValueError(f"top_k must be None or a positive integer, got {top_k!r}", "top_k")
    if top_p is not None and not (_is_number(top_p) and 0.0 < top_p <= 1.0):
        raise ConfigValueError(f"top_p must be None or in (0, 1], got {top_p!r}", "top_p")


def _check_generate_args(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop_ids: Sequence[int],
    vocab_size: int,
) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigValueError(
            f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}", "max_new_tokens"
        )
    _check_sampling_args(temperature, top_k, top_p)
    for stop_id in stop_ids:
        if isinstance(stop_id, bool) or not isinstance(stop_id, int) or not 0 <= stop_id < vocab_size:
            raise ConfigValueError(
                f"stop_ids must be token ids in [0, {vocab_size}) (the model's vocabulary), got {stop_id!r}",
                "stop_ids",
            )


def _prompt_tensor(prompt_ids) -> Tensor:
    """The prompt as a long tensor; anything but integer ids (text, floats, bools) is a TypeError."""
    if isinstance(prompt_ids, str | bytes):
        raise TypeError(
            "prompt_ids is text; encode it to token ids first: generate(model, tokenizer.encode(text), ...)"
        )
    if isinstance(prompt_ids, Tensor):
        dtype = prompt_ids.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise TypeError(f"prompt_ids must be an integer tensor of token ids, got dtype {dtype}")
        return prompt_ids.long()  # uint16 (from a token file) and int32 widen losslessly
    ids = list(prompt_ids)
    rows = [list(row) for row in ids] if ids and not isinstance(ids[0], numbers.Number) else [ids]
    for row in rows:
        for position, token_id in enumerate(row):
            if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):
                raise TypeError(
                    f"prompt_ids must hold integer token ids, got {token_id!r} "
                    f"({type(token_id).__name__}) at position {position}"
                )
    return torch.as_tensor(ids, dtype=torch.long)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | Int[Tensor, " seq"] | Int[Tensor, "batch seq"],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Iterable[int] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[int] | Int[Tensor, " seq_out"] | Int[Tensor, "batch seq_out"]:
    """Continue `prompt_ids` by up to `max_new_tokens` tokens; returns prompt + continuation in the
    input's form (list, 1-D or 2-D tensor).

    A row ends at its first token in `stop_ids` (kept in the output); in a batch, rows that ended are
    padded with their stop token until every row has ended. Without the cache each step re-reads the
    last `context_length` tokens; with it each step reads one token, and once the sequence outgrows the
    context the loop falls back to re-reading the window, so both ways give the same tokens.
    """
    stop_ids = tuple(stop_ids)
    vocab_size = model.config.vocab_size
    _check_generate_args(max_new_tokens, temperature, top_k, top_p, stop_ids, vocab_size)
    as_list = not isinstance(prompt_ids, Tensor)
    prompt = _prompt_tensor(prompt_ids)
    if prompt.ndim not in (1, 2) or prompt.shape[-1] == 0 or prompt.shape[0] == 0:
        raise ConfigValueError(
            "prompt_ids must hold at least one token, shaped (seq,) or (batch, seq), "
            f"got {tuple(prompt.shape)}",
            "prompt_ids",
        )
    if int(prompt.min()) < 0 or int(prompt.max()) >= vocab_size:
        raise ConfigValueError(
            f"prompt_ids must be token ids in [0, {vocab_size}) (the model's vocabulary), got ids from "
            f"{int(prompt.min())} to {int(prompt.max())}; was the prompt encoded with another tokenizer?",
            "prompt_ids",
        )
    squeeze = prompt.ndim == 1
    ids = prompt.reshape(-1, prompt.shape[-1]).to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    pick = functools.partial(
        sample_next_token, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
    )
    try:
        tokens = _decode(model, ids, max_new_tokens, pick, stop_ids, use_cache)
    finally:
        model.train(was_training)
    out = tokens.to(prompt.device)
    if squeeze:
        out = out[0]
    return out.tolist() if as_list else out


def _decode(
    model: nn.Module,
    ids: Int[Tensor, "batch prompt_len"],
    max_new_tokens: int,
    pick: Callable[[Tensor], Tensor],
    stop_ids: tuple[int, ...],
    use_cache: bool,
) -> Int[Tensor, "batch seq_out"]:
    """The generation loop on checked ids: prompt + up to max_new_tokens tokens, each chosen by `pick`
    from the last position's logits (batch, vocab)."""
    batch, prompt_len = ids.shape
    context_length = model.config.context_length
    _check_memory(model, batch, prompt_len, max_new_tokens, use_cache)
    # Preallocate the output so appending a token is a write, not a copy of the whole sequence.
    tokens = torch.empty(batch, prompt_len + max_new_tokens, dtype=torch.long, device=ids.device)
    tokens[:, :prompt_len] = ids
    length = prompt_len
    stops = _StopTracker(stop_ids, batch, ids.device)
    kv_cache = None
    if use_cache and max_new_tokens > 0 and prompt_len <= context_length:
        kv_cache = model.make_kv_cache(batch, max_length=min(context_length, prompt_len + max_new_tokens))
    for _ in range(max_new_tokens):
        if kv_cache is not None and length <= kv_cache.max_length:
            # Feed only what the cache has not seen: the whole prompt first, then one token per step.
            logits = model(tokens[:, kv_cache.length : length], kv_cache=kv_cache)
        else:
            kv_cache = None  # past the context: positions shift every step, so the cache can't be reused
            logits = model(tokens[:, max(0, length - context_length) : length])
        tokens[:, length] = stops.update(pick(logits[:, -1, :]))
        length += 1
        if stops.all_finished():
            break
    return tokens[:, :length]


def _check_memory(
    model: nn.Module, batch: int, prompt_len: int, max_new_tokens: int, use_cache: bool
) -> None:
    """Refuse, before allocating, an output (and KV cache) larger than the device's free memory."""
    config, param = model.config, next(model.parameters())
    n_bytes = batch * (prompt_len + max_new_tokens) * 8  # the int64 output, preallocated
    if use_cache:
        cached = min(config.context_length, prompt_len + max_new_tokens)
        n_bytes += (
            2 * config.n_layers * batch * config.kv_heads * cached * config.head_dim * param.element_size()
        )
    check_fits_in_memory(
        n_bytes, param.device, f"generating max_new_tokens={max_new_tokens} for {batch} prompt(s)",
        "max_new_tokens",
    )  # fmt: skip


class _StopTracker:
    """Which rows of a batch have produced a stop token; ended rows repeat their stop token."""

    def __init__(self, stop_ids: tuple[int, ...], batch: int, device: torch.device):
        self.active = bool(stop_ids)
        self.stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
        self.finished_with = torch.full((batch,), -1, dtype=torch.long, device=device)  # -1: still running

    def update(self, next_ids: Int[Tensor, " batch"]) -> Int[Tensor, " batch"]:
        """The tokens to append: next_ids, except the stop token again in rows that already ended."""
        if not self.active:
            return next_ids
        next_ids = torch.where(self.finished_with >= 0, self.finished_with, next_ids)
        newly_stopped = torch.isin(next_ids, self.stop) & (self.finished_with < 0)
        self.finished_with = torch.where(newly_stopped, next_ids, self.finished_with)
        return next_ids

    def all_finished(self) -> bool:
        """True when every row has ended (never, without stop ids)."""
        return self.active and bool((self.finished_with >= 0).all())

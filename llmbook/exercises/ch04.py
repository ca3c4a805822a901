"""Chapter 4 exercises: position signals (sinusoidal tables, RoPE in both layouts, converting weights)."""

import torch

from llmbook.exercises.core import Case, draw, exercise
from llmbook.position import (
    RotaryEmbedding,
    SinusoidalPositions,
    interleaved_to_half_split,
    rope_frequencies,
    rope_permutation,
)


def _sinusoidal_table_halves(n_positions: int, d_model: int) -> torch.Tensor:
    # The package interleaves (sin, cos) per pair; listing even columns then odd ones gives the halves layout.
    table = SinusoidalPositions(n_positions, d_model)(torch.arange(n_positions))
    return table[:, rope_permutation(d_model)]


def _sinusoidal_table_halves_hidden(g):
    for _ in range(2):
        yield Case((draw(g, 1, 60), 2 * draw(g, 1, 24)), note="random sizes")


@exercise(
    "04.sinusoidal_table_halves",
    reference=_sinusoidal_table_halves,
    forbid=("llmbook.position.SinusoidalPositions",),
    hidden=_sinusoidal_table_halves_hidden,
    hint="Pair i (i = 0 .. d_model/2 - 1) turns at angle p * 10000**(-2i / d_model) at position p. Put all"
    " the sines in columns 0 .. d_model/2 - 1 (column i for pair i) and all the cosines in the "
    "columns after them: torch.cat([angles.sin(), angles.cos()], dim=-1) with angles of shape "
    "(n_positions, d_model/2).",
    atol=1e-4,
)
def _sinusoidal_table_halves_cases():
    for n, d, note in [
        (1, 2, "one position, one sin/cos pair"),
        (4, 8, "4 positions, d_model 8"),
        (50, 16, "50 positions, d_model 16"),
        (3, 128, "a wide model: the slowest pairs barely turn"),
    ]:
        yield Case((n, d), expected=_sinusoidal_table_halves(n, d), note=note)
    # Angles up to ~2000 radians: float32 rounding of the angle alone is ~1e-4, so allow for it.
    expected = _sinusoidal_table_halves(2048, 8)
    yield Case((2048, 8), expected=expected, note="2048 positions (large angles)", atol=2e-3)


def _rope_frequencies_hidden(g):
    for theta in (10000.0, float(draw(g, 2, 1_000_000))):
        yield Case((2 * draw(g, 1, 64), theta), note="a random head_dim and theta")


@exercise(
    "04.rope_frequencies",
    reference=rope_frequencies,
    forbid=("llmbook.position.rope_frequencies",),
    hidden=_rope_frequencies_hidden,
    hint="One frequency per pair: theta ** (-2i / head_dim) for i = 0 .. head_dim/2 - 1, so the first pair"
    " turns 1 radian per position and the last is slowest. torch.arange(0, head_dim, 2) gives the 2i "
    "values.",
)
def _rope_frequencies_cases():
    for args, note in [
        ((2, 10000.0), "head_dim 2: a single pair"),
        ((8, 10000.0), "head_dim 8"),
        ((64, 10000.0), "head_dim 64, the common case"),
        ((128, 500000.0), "Llama 3's theta = 500000"),
        ((16, 10.0), "a small theta"),
    ]:
        yield Case(args, expected=rope_frequencies(*args), note=note)


def _apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    return RotaryEmbedding(x.shape[-1], theta=theta)(x, positions)


def _rope_cases(reference):
    g = torch.Generator().manual_seed(40)
    x = torch.randn(1, 8, generator=g)
    yield Case(
        (x, torch.tensor([0])), expected=reference(x, torch.tensor([0])), note="position 0 (no rotation)"
    )
    x = torch.randn(5, 2, generator=g)
    yield Case((x, torch.arange(5)), expected=reference(x, torch.arange(5)), note="head_dim 2: one pair")
    x = torch.randn(6, 16, generator=g)
    yield Case((x, torch.arange(6)), expected=reference(x, torch.arange(6)), note="(seq, head_dim) = (6, 16)")
    pos = torch.arange(10, 14)
    x = torch.randn(4, 8, generator=g)
    yield Case((x, pos), expected=reference(x, pos), note="positions 10..13, as when a KV cache is in use")
    x = torch.randn(2, 3, 5, 8, generator=g)
    yield Case(
        (x, torch.arange(5)), expected=reference(x, torch.arange(5)), note="(batch, heads, seq, head_dim)"
    )
    x = torch.randn(3, 8, generator=g)
    yield Case(
        (x, torch.arange(3), 500000.0), expected=reference(x, torch.arange(3), 500000.0), note="theta 500000"
    )
    pos = torch.tensor([1000, 3000, 4095])
    x = torch.randn(3, 8, generator=g)
    yield Case((x, pos), expected=reference(x, pos), note="large positions", atol=2e-3)


@exercise(
    "04.apply_rope",
    reference=_apply_rope,
    hint="Half-split layout: pair i is (x[..., i], x[..., i + head_dim/2]). The angle of pair i at "
    "position p is p * theta**(-2i/head_dim). Rotate each pair by its angle: (a, b) -> (a cos - b "
    "sin, b cos + a sin), and put the rotated halves back in the same places. positions has shape "
    "(seq,), matching x's axis -2.",
    atol=1e-5,
)
def _apply_rope_cases():
    yield from _rope_cases(_apply_rope)


def _apply_rope_interleaved(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    return RotaryEmbedding(x.shape[-1], theta=theta, interleaved=True)(x, positions)


@exercise(
    "04.apply_rope_interleaved",
    reference=_apply_rope_interleaved,
    hint="Interleaved layout: pair i is (x[..., 2i], x[..., 2i + 1]), with the same angle p * "
    "theta**(-2i/head_dim) as the half-split layout. Take x[..., 0::2] and x[..., 1::2], rotate, and "
    "interleave them back (torch.stack(..., dim=-1).flatten(-2)).",
    atol=1e-5,
)
def _apply_rope_interleaved_cases():
    yield from _rope_cases(_apply_rope_interleaved)


@exercise(
    "04.interleaved_to_half_split",
    reference=interleaved_to_half_split,
    hint="Work head by head: the weight's rows are n_heads blocks of head_dim rows. Inside each block, "
    "list the even rows (0, 2, 4, ...) first and then the odd rows (1, 3, 5, ...). A bias vector is "
    "permuted the same way.",
)
def _interleaved_to_half_split_cases():
    g = torch.Generator().manual_seed(41)
    w = torch.arange(8.0)[:, None].repeat(1, 3)
    yield Case((w, 1), expected=interleaved_to_half_split(w, 1), note="one head, rows numbered 0..7")
    w = torch.arange(8.0)[:, None].repeat(1, 3)
    yield Case(
        (w, 2), expected=interleaved_to_half_split(w, 2), note="two heads of 4 rows, rows numbered 0..7"
    )
    w = torch.randn(4 * 16, 32, generator=g)
    yield Case(
        (w, 4), expected=interleaved_to_half_split(w, 4), note="a q projection: 4 heads of 16, d_model 32"
    )
    w = torch.randn(2, 5, generator=g)
    yield Case((w, 1), expected=interleaved_to_half_split(w, 1), note="head_dim 2: nothing moves")
    b = torch.randn(12, generator=g)
    yield Case((b, 3), expected=interleaved_to_half_split(b, 3), note="a bias vector, 3 heads of 4")

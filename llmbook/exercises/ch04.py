"""Chapter 4 exercises: a sinusoidal table, a RoPE with mixed-up pairs to debug, the relative-position
derivation, and the slowest wavelength to predict.
"""

import math

import torch

from llmbook.exercises.core import Case, draw, exercise
from llmbook.position import (
    RotaryEmbedding,
    SinusoidalPositions,
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
    hint=(
        "Compute one angle per (position, pair) first; the layout question is only where sin and cos go.",
        "Pair i (i = 0 .. d_model/2 - 1) turns at angle p * 10000**(-2i / d_model) at position p. Put all"
        " the sines in columns 0 .. d_model/2 - 1 (column i for pair i) and all the cosines in the "
        "columns after them: torch.cat([angles.sin(), angles.cos()], dim=-1) with angles of shape "
        "(n_positions, d_model/2).",
    ),
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


def _broken_apply_rope(x, positions, theta=10000.0):
    """Rotary embedding, half-split layout: pair i is (x[..., i], x[..., i + head_dim/2])."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(0, half, dtype=torch.float32) * 2 / x.shape[-1])
    angles = positions[:, None].float() * freqs  # (seq, half)
    cos, sin = angles.cos(), angles.sin()
    first, second = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return rotated.flatten(-2)


@exercise(
    "04.apply_rope",
    reference=_apply_rope,
    kind="debug",
    broken=_broken_apply_rope,
    hint=(
        "The angles are right; compare which two numbers this code rotates together with the docstring.",
        "x[..., 0::2] and x[..., 1::2] pair neighbours (2i, 2i + 1): that is the interleaved layout. The "
        "half-split layout pairs x[..., i] with x[..., i + head_dim/2], and puts the halves back side by "
        "side.",
        "Look at line 7, `x[..., 0::2], x[..., 1::2]`: it pairs neighbours (2i, 2i + 1), the "
        "interleaved layout, and lines 8 and 9 (`torch.stack` then `flatten(-2)`) interleave them "
        "back. The docstring's half-split layout pairs entry i with entry i + head_dim/2 and keeps "
        "the halves side by side.",
    ),
    atol=1e-5,
)
def _apply_rope_cases():
    yield from _rope_cases(_apply_rope)


# ---------------------------------------------------------------------------------------------
# Derive: with RoPE, the score of a query at position m and a key at position n depends on n - m only.

_RELATIVE_QUERY_POSITION = 50  # any m works; the point of the derivation is that m drops out


def _relative_score(q: torch.Tensor, k: torch.Tensor, offset: int) -> torch.Tensor:
    # The measured score: rotate q to position m and k to position m + offset with the package's RoPE.
    rope = RotaryEmbedding(q.shape[-1])
    m = _RELATIVE_QUERY_POSITION
    q_m = rope(q[..., None, :], torch.tensor([m]))[..., 0, :]
    k_n = rope(k[..., None, :], torch.tensor([m + offset]))[..., 0, :]
    return (q_m * k_n).sum(dim=-1)


def _relative_score_hidden(g):
    for _ in range(3):
        head_dim = 2 * draw(g, 1, 16)
        q, k = torch.randn(3, head_dim, generator=g), torch.randn(3, head_dim, generator=g)
        yield Case((q, k, draw(g, -_RELATIVE_QUERY_POSITION, 40)), note="random vectors and offset")


@exercise(
    "04.relative_score",
    reference=_relative_score,
    kind="derive",
    hidden=_relative_score_hidden,
    forbid=("llmbook.position.RotaryEmbedding",),
    hint=(
        "Write the score as (R_m q)·(R_n k) = qᵀ R_mᵀ R_n k, pair by pair. What is R_mᵀ R_n for 2-D "
        "rotations?",
        "Rotations compose: R_mᵀ = R_{-m} and R_{-m} R_n = R_{n-m}. So the score is q·(R_{n-m} k): rotate k "
        "alone, by the angle (n - m)·θ_i for pair i, in the half-split layout, and dot it with q.",
        "freqs = theta ** (-torch.arange(0, d, 2) / d); angles = offset * freqs; rotate k's halves by angles "
        "(a, b) -> (a cos - b sin, b cos + a sin); return (q * rotated_k).sum(-1).",
    ),
    atol=1e-4,
)
def _relative_score_cases():
    g = torch.Generator().manual_seed(42)
    for shape, offset, note in [
        ((2,), 0, "head_dim 2, offset 0: a plain dot product"),
        ((2,), 3, "head_dim 2, offset 3"),
        ((8,), 5, "head_dim 8"),
        ((4, 16), -7, "a key 7 positions before the query"),
        ((2, 3, 32), 40, "(batch, heads, head_dim), offset 40"),
    ]:
        q, k = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        yield Case((q, k, offset), expected=_relative_score(q, k, offset), note=note)


# ---------------------------------------------------------------------------------------------
# Predict: how many positions the slowest RoPE pair takes to turn once.


def measured_slowest_wavelength(head_dim: int = 64, theta: float = 10000.0) -> float:
    """2π / (the smallest of the package's rope_frequencies): positions per turn of the slowest pair."""
    return (2 * math.pi / rope_frequencies(head_dim, theta)[-1].double()).item()


@exercise(
    "04.predict_slowest_wavelength",
    reference=measured_slowest_wavelength,
    kind="predict",
    rtol=1e-3,
    hint=(
        "The slowest pair is the last one, i = head_dim/2 - 1; it turns θ^(-2i/head_dim) radians per "
        "position.",
        "One full turn is 2π radians, so it takes 2π / θ^(-2i/head_dim) = 2π · θ^(2i/head_dim) positions.",
        "With head_dim 64 and θ = 10000: 2π · 10000^(62/64).",
    ),
)
def _predict_slowest_wavelength_cases():
    yield Case((), expected=measured_slowest_wavelength(), note="head_dim 64, theta 10000, within 0.1%")

"""Telling attention where each token is: sinusoidal and learned absolute positions, and rotary embeddings.

Attention by itself treats its input as a set: permute the tokens and the outputs permute with them.
Order must therefore be injected. Two families do it:

* **absolute** positions (`SinusoidalPositions`, `LearnedPositions`) give one vector per position that is
  *added* to the token embeddings before the first block;
* **rotary** embeddings (`RotaryEmbedding`, RoPE) rotate pairs of query/key dimensions by an angle that grows
  with the position, inside every attention layer, so that the score ``q_m · k_n`` depends on the positions
  only through ``m - n``.

RoPE comes in two layouts that are the same rotation applied to differently ordered dimensions:

* **half-split** (Llama in Hugging Face `transformers`, the default here): dimension ``i`` is paired with
  ``i + head_dim/2``;
* **interleaved** (the RoFormer paper, Meta's original Llama code, ``interleaved=True``): dimension ``2i`` is
  paired with ``2i + 1``.

`rope_permutation` and the two weight converters below translate a model trained in one layout to the other
by permuting the rows of its query/key projections.
"""

from dataclasses import dataclass

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn

from llmbook.errors import ConfigValueError, check_float, check_int

__all__ = [
    "SinusoidalPositions",
    "LearnedPositions",
    "RotaryEmbedding",
    "RotaryAngles",
    "rope_frequencies",
    "rotate",
    "rope_permutation",
    "interleaved_to_half_split",
    "half_split_to_interleaved",
]

# RoPE's angles are position · frequency in float32, which holds every integer only up to 2**24.
MAX_ROPE_POSITION = 2**24


def _check_base(owner: str, name: str, base: float) -> float:
    """A finite wavelength base >= 1: below 1 later dimension pairs would turn faster than the first, and a
    base near 0 makes the frequencies overflow to inf (then the angles are NaN)."""
    return check_float(owner, name, base, minimum=1.0)


def _check_even_width(owner: str, name: str, width: int) -> int:
    check_int(owner, name, width, minimum=2)
    if width % 2 != 0:
        raise ConfigValueError(
            f"{owner} needs an even {name} (dimensions rotate in pairs), got {width}", name
        )
    return width


def _check_positions(positions: Tensor) -> int:
    """Validate integer, non-negative positions; return how many table rows they need (max + 1)."""
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions must be a torch.Tensor of integers, got {type(positions).__name__}")
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise TypeError(f"positions must hold integers (torch.long), got dtype {positions.dtype}")
    if positions.numel() == 0:
        return 0
    low, high = torch.stack(torch.aminmax(positions)).tolist()  # one GPU sync for both
    if low < 0:
        raise ValueError(f"positions must be >= 0, got a minimum of {low}")
    return high + 1


def _sinusoid_rows(positions: Int[Tensor, "..."], d_model: int, base: float) -> Float[Tensor, "... d_model"]:
    """The rows of "Attention Is All You Need"'s table: even dims sin(pos / base^(2i/d)), odd dims cos."""
    inv_freq = base ** (-torch.arange(0, d_model, 2, dtype=torch.float64, device=positions.device) / d_model)
    angles = positions.double()[..., None] * inv_freq  # (..., d_model/2), exact in float64 below 2**53
    # Stack sin/cos as the last axis and flatten it so that sin and cos alternate: dims 2i, 2i+1.
    return rearrange([angles.sin(), angles.cos()], "two ... half -> ... (half two)").float()


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal position vectors: forward(positions (...)) -> (..., d_model), added to the input.

    The table is a non-persistent buffer (it is a formula, not weights, so it is not in the state dict).
    Positions past ``max_positions`` are computed from the formula on demand (the same numbers), so one
    far position costs one row, not a table reaching it.
    """

    def __init__(self, max_positions: int, d_model: int, base: float = 10000.0):
        super().__init__()
        check_int("SinusoidalPositions", "max_positions", max_positions)
        self.d_model = _check_even_width("SinusoidalPositions", "d_model", d_model)
        self.base = _check_base("SinusoidalPositions", "base", base)
        table = _sinusoid_rows(torch.arange(max_positions), d_model, base)
        self.register_buffer("table", table, persistent=False)

    def forward(self, positions: Int[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
        """Look up the position vector of every entry of ``positions``."""
        if _check_positions(positions) > self.table.shape[0]:
            return _sinusoid_rows(positions, self.d_model, self.base).to(self.table.device)
        return self.table[positions]


class LearnedPositions(nn.Module):
    """One trained vector per position (GPT-2 style): forward(positions (...)) -> (..., d_model).

    A learned table knows nothing past ``max_positions``; asking for a later position is a ValueError.
    """

    def __init__(self, max_positions: int, d_model: int):
        super().__init__()
        check_int("LearnedPositions", "max_positions", max_positions)
        check_int("LearnedPositions", "d_model", d_model)
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.empty(max_positions, d_model))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, positions: Int[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
        """Look up the learned vector of every entry of ``positions``."""
        needed = _check_positions(positions)
        if needed > self.max_positions:
            raise ValueError(
                f"position {needed - 1} is beyond the learned table of "
                f"{self.max_positions} positions; "
                "learned positions cannot extrapolate (use a shorter input or a larger context_length)"
            )
        return self.weight[positions]


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> Float[Tensor, " half"]:
    """Rotation speed of each dimension pair: theta^(-2i/head_dim) radians per position, i < head_dim/2."""
    _check_even_width("rope_frequencies", "head_dim", head_dim)
    _check_base("rope_frequencies", "theta", theta)
    # Computed exactly as transformers' Llama does (float32 arange / head_dim) so results agree bit for bit.
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _rotate_half_split(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)  # pairs are (first[i], second[i])
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def _rotate_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    pairs = rearrange(x, "... (half two) -> ... half two", two=2)  # pairs are (x[2i], x[2i+1])
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return rearrange(rotated, "... half two -> ... (half two)")


def rotate(
    x: Float[Tensor, "... seq head_dim"],
    cos: Float[Tensor, "*batch seq half"],
    sin: Float[Tensor, "*batch seq half"],
    interleaved: bool = False,
) -> Float[Tensor, "... seq head_dim"]:
    """RoPE on queries or keys: rotate each dimension pair of ``x`` by the angle whose cos/sin are given.

    The dtype rule (the same in `llmbook.kernels`' fused RoPE): x of any float dtype is rotated in float32
    by float32 angles, and the result is cast back to x's dtype. Per-batch angles (batch, seq, half)
    broadcast over the heads of x (batch, heads, seq, head_dim).
    """
    while cos.ndim < x.ndim:  # (batch, seq, half) -> (batch, 1, seq, half): shared by the heads
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    rotated = (_rotate_interleaved if interleaved else _rotate_half_split)(x.float(), cos, sin)
    return rotated.to(x.dtype)


@dataclass
class RotaryAngles:
    """The cos/sin of one forward pass's positions, computed once and applied to every layer's q and k.

    Called like the module it came from, ``angles(x, positions)``; the positions were fixed when the
    angles were computed, so the argument is only there to keep that signature.
    """

    cos: Float[Tensor, "*batch seq half"]
    sin: Float[Tensor, "*batch seq half"]
    interleaved: bool = False

    def __call__(
        self, x: Float[Tensor, "... seq head_dim"], positions: Tensor | None = None
    ) -> Float[Tensor, "... seq head_dim"]:
        """Rotate ``x`` (queries or keys) by these angles."""
        if x.shape[-2] != self.cos.shape[-2] or x.shape[-1] != 2 * self.cos.shape[-1]:
            raise ValueError(
                f"these angles are for seq={self.cos.shape[-2]}, head_dim={2 * self.cos.shape[-1]}; "
                f"got x {tuple(x.shape)}"
            )
        return rotate(x, self.cos, self.sin, self.interleaved)


class RotaryEmbedding(nn.Module):
    """RoPE: forward(x (..., seq, head_dim), positions) rotates dimension pairs by position-dependent angles.

    ``positions`` holds absolute token positions, shaped ``(seq,)`` (shared by the batch) or ``(batch, seq)``
    (for ``x`` shaped ``(batch, [heads,] seq, head_dim)``), so a KV cache can rotate new tokens at
    ``offset + arange(seq)``. cos/sin are cached for ``max_positions`` positions in float32 and the cache is
    *extended* (doubling) when a later position is asked for — RoPE is a formula, so any position is valid.
    A model looks its positions up once per forward pass (`angles`) and hands the result to every layer.
    """

    def __init__(
        self, head_dim: int, theta: float = 10000.0, max_positions: int = 2048, interleaved: bool = False
    ):
        super().__init__()
        _check_even_width("RotaryEmbedding", "head_dim", head_dim)
        _check_base("RotaryEmbedding", "theta", theta)
        check_int("RotaryEmbedding", "max_positions", max_positions)
        self.head_dim = head_dim
        self.theta = theta
        self.interleaved = interleaved
        self.register_buffer("inv_freq", rope_frequencies(head_dim, theta), persistent=False)
        self._build_cache(max_positions)

    @property
    def max_positions(self) -> int:
        """How many positions the cos/sin cache currently covers."""
        return self.cos_cached.shape[0]

    def _build_cache(self, n_positions: int) -> None:
        device = self.inv_freq.device
        angles = torch.arange(n_positions, device=device, dtype=torch.float32)[:, None] * self.inv_freq
        self.register_buffer("cos_cached", angles.cos(), persistent=False)
        self.register_buffer("sin_cached", angles.sin(), persistent=False)

    def cos_sin(
        self, positions: Int[Tensor, "*batch seq"]
    ) -> tuple[Float[Tensor, "*batch seq half"], Float[Tensor, "*batch seq half"]]:
        """The cached cos and sin of every (position, pair) angle, extending the cache when needed."""
        if self.cos_cached.dtype != torch.float32:
            # model.to(torch.bfloat16) casts every float buffer; bf16 angles are far too coarse, so rebuild.
            self.inv_freq = rope_frequencies(self.head_dim, self.theta).to(self.inv_freq.device)
            self._build_cache(self.max_positions)
        needed = _check_positions(positions)  # reads the largest position: one GPU sync per call
        if needed > MAX_ROPE_POSITION:
            raise ValueError(
                f"position {needed - 1} is beyond RoPE's limit of {MAX_ROPE_POSITION - 1}: the angles are "
                "computed in float32, which cannot tell apart neighbouring integers above 2**24"
            )
        if needed > self.max_positions:
            self._build_cache(max(needed, min(2 * self.max_positions, MAX_ROPE_POSITION)))
        return self.cos_cached[positions], self.sin_cached[positions]

    def angles(self, positions: Int[Tensor, "*batch seq"]) -> RotaryAngles:
        """The angles of ``positions``, to rotate every layer's queries and keys with (one lookup)."""
        if positions.ndim not in (1, 2):
            raise ValueError(f"positions must be shaped (seq,) or (batch, seq), got {tuple(positions.shape)}")
        cos, sin = self.cos_sin(positions)
        return RotaryAngles(cos, sin, self.interleaved)

    def forward(
        self, x: Float[Tensor, "... seq head_dim"], positions: Int[Tensor, "*batch seq"]
    ) -> Float[Tensor, "... seq head_dim"]:
        """Rotate ``x`` (queries or keys) as tokens at the absolute ``positions``."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"expected x's last axis to be head_dim={self.head_dim}, got {tuple(x.shape)}")
        if positions.ndim not in (1, 2) or positions.shape[-1] != x.shape[-2]:
            raise ValueError(
                f"positions must be shaped (seq,) or (batch, seq) with seq={x.shape[-2]} matching x's "
                f"second-to-last axis, got positions {tuple(positions.shape)} for x {tuple(x.shape)}"
            )
        return self.angles(positions)(x)


def rope_permutation(head_dim: int) -> Int[Tensor, " head_dim"]:
    """Index map from the interleaved to the half-split layout: ``x_half = x_interleaved[..., perm]``.

    Half-split pair ``(i, i + head_dim/2)`` is interleaved pair ``(2i, 2i + 1)``, so the permutation lists the
    even dimensions and then the odd ones, so ``rope_half(x[..., perm]) == rope_interleaved(x)[..., perm]``.
    """
    _check_even_width("rope_permutation", "head_dim", head_dim)
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def _head_dim(owner: str, weight: Tensor, n_heads: int) -> int:
    """The head_dim of a q/k projection of ``n_heads`` heads, checked to be a whole, even number."""
    check_int(owner, "n_heads", n_heads)
    if weight.ndim == 0 or weight.shape[0] % n_heads != 0 or weight.shape[0] // n_heads % 2 != 0:
        raise ValueError(
            f"the weight's first axis ({tuple(weight.shape)[:1]}) must be n_heads * head_dim with "
            f"n_heads={n_heads} and an even head_dim"
        )
    return weight.shape[0] // n_heads


def _permute_heads(weight: Tensor, n_heads: int, perm: Tensor) -> Tensor:
    per_head = rearrange(weight, "(heads head_dim) ... -> heads head_dim ...", heads=n_heads)
    return rearrange(per_head[:, perm], "heads head_dim ... -> (heads head_dim) ...")


def interleaved_to_half_split(weight: Float[Tensor, "out ..."], n_heads: int) -> Float[Tensor, "out ..."]:
    """Reorder the output rows of a q or k projection (weight or bias) from interleaved to half-split RoPE.

    Attention scores are unchanged because q and k are permuted the same way inside each head.
    """
    return _permute_heads(
        weight, n_heads, rope_permutation(_head_dim("interleaved_to_half_split", weight, n_heads))
    )


def half_split_to_interleaved(weight: Float[Tensor, "out ..."], n_heads: int) -> Float[Tensor, "out ..."]:
    """Inverse of `interleaved_to_half_split`: reorder q/k projection rows from half-split to interleaved."""
    return _permute_heads(
        weight,
        n_heads,
        torch.argsort(rope_permutation(_head_dim("half_split_to_interleaved", weight, n_heads))),
    )

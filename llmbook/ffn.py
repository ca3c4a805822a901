"""Position-wise feed-forward networks: widen, apply a nonlinearity, narrow again.

* `GeluMLP` — the classic two-matrix MLP, down(act(up(x))), with exact (erf) GELU, SiLU, or the squared
  ReLU, relu(x)², of Primer (So et al., 2021);
* `SwiGLU` — Llama's gated MLP, down(silu(gate(x)) * up(x)). Diagrams often draw gate and up as one
  fused "Up" projection of width 2·d_ff split in two; here they are two `nn.Linear`s named as in Llama.

A gated MLP has three matrices instead of two, so at equal parameter count its hidden width is 2/3 of
the 4·d_model of a plain MLP: `swiglu_hidden_dim` gives ⌈8/3·d_model⌉ rounded up to a multiple of 32.
"""

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from llmbook.errors import check_int

__all__ = ["gelu", "silu", "relu2", "swiglu", "swiglu_hidden_dim", "SwiGLU", "GeluMLP"]


def gelu(x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """Exact GELU: x · Φ(x) = 0.5 · x · (1 + erf(x / √2))."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def silu(x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """SiLU (swish): x · sigmoid(x)."""
    return x * torch.sigmoid(x)


def relu2(x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
    """Squared ReLU: max(x, 0)². Zero for negative inputs like ReLU, but with a gradient 2x that grows
    with the input instead of a constant 1."""
    return torch.relu(x).square()


def swiglu(gate: Float[Tensor, "... d_ff"], value: Float[Tensor, "... d_ff"]) -> Float[Tensor, "... d_ff"]:
    """SwiGLU's gate: silu(gate) * value, computed in float32 and returned in the inputs' dtype."""
    # F.silu is `silu` above as one fused pass, as in transformers; .float() is free on float32 inputs.
    return (F.silu(gate.float()) * value.float()).to(gate.dtype)


def swiglu_hidden_dim(d_model: int, multiple_of: int = 32) -> int:
    """⌈8/3 · d_model⌉ rounded up to a multiple of ``multiple_of`` (keeps SwiGLU ≈ 8·d_model² parameters)."""
    check_int("swiglu_hidden_dim", "d_model", d_model)
    check_int("swiglu_hidden_dim", "multiple_of", multiple_of)
    hidden = -(-8 * d_model // 3)  # integer ceil(8 * d_model / 3)
    return multiple_of * -(-hidden // multiple_of)


def _check_width(owner: str, x: Tensor, d_model: int) -> None:
    if x.ndim == 0 or x.shape[-1] != d_model:
        raise ValueError(f"{owner} expects inputs (..., d_model={d_model}), got {tuple(x.shape)}")


class SwiGLU(nn.Module):
    """Gated MLP: (..., d_model) -> (..., d_model) via down(silu(gate(x)) * up(x)), hidden width d_ff."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        check_int("SwiGLU", "d_model", d_model)
        check_int("SwiGLU", "d_ff", d_ff)
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The gate decides, per hidden unit, how much of the up-projected value passes."""
        _check_width("SwiGLU", x, self.gate_proj.in_features)
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class GeluMLP(nn.Module):
    """Two-matrix MLP: (..., d_model) -> (..., d_model) via down(act(up(x))), act = exact GELU, SiLU or
    squared ReLU."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = False):
        super().__init__()
        # The fused PyTorch ops compute `gelu` and `silu` above in one pass each (tested equal).
        activations = {"gelu": F.gelu, "silu": F.silu, "relu2": relu2}
        if activation not in activations:
            raise ValueError(f"activation must be one of {sorted(activations)}, got {activation!r}")
        check_int("GeluMLP", "d_model", d_model)
        check_int("GeluMLP", "d_ff", d_ff)
        self.activation_name = activation
        self.activation = activations[activation]
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """Widen, apply the nonlinearity elementwise, narrow."""
        _check_width("GeluMLP", x, self.up_proj.in_features)
        return self.down_proj(self.activation(self.up_proj(x)))

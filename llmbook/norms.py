"""Normalization layers: LayerNorm (centre and scale) and RMSNorm (scale only), over the last axis.

The dtype rule (the same in `llmbook.kernels`' fused RMSNorm): the statistics and the normalisation are
computed in float32 (float64 stays float64), because a sum of squares of bfloat16 activations loses most
of its precision; the normalised vector is cast back to the input's dtype and then scaled by the gain, so
the result has the promoted dtype of the input and the gain (bfloat16 stays bfloat16 with a bfloat16 gain
and becomes float32 with a float32 gain, as in transformers' Llama). Like PyTorch's own norms, a vector
whose squares overflow float32 (entries beyond about 1e19) cannot be normalised in float32: pass float64.

``eps`` must be a positive number that float32 can hold (at least its smallest normal number, about
1.2e-38): a smaller one becomes 0 in float32, and a row of zeros would then divide 0 by 0.
"""

import torch
from jaxtyping import Float
from torch import Tensor, nn

from llmbook.errors import ConfigValueError, check_float, check_int

__all__ = ["LayerNorm", "RMSNorm", "layer_norm", "rms_norm", "check_eps"]

_SMALLEST_EPS = torch.finfo(torch.float32).tiny


def check_eps(owner: str, eps: float, name: str = "eps") -> float:
    """A finite eps > 0 that does not underflow to zero in float32 (see the module doc); else ConfigError."""
    check_float(owner, name, eps, above=0)
    if eps < _SMALLEST_EPS:
        raise ConfigValueError(
            f"{owner}.{name} must be at least float32's smallest normal number {_SMALLEST_EPS:.3g} "
            f"(a smaller eps is 0 in float32, where the statistics are computed), got {eps!r}",
            name,
        )
    return eps


def _statistics_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision (and integer) inputs, float64 for float64 ones."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def layer_norm(
    x: Float[Tensor, "... d"], weight: Float[Tensor, " d"], bias: Float[Tensor, " d"] | None, eps: float
) -> Float[Tensor, "... d"]:
    """(x - mean) / sqrt(var + eps) * weight + bias, statistics over the last axis (biased variance)."""
    check_eps("layer_norm", eps)
    x32 = x.to(_statistics_dtype(x))
    mean = x32.mean(dim=-1, keepdim=True)
    var = (x32 - mean).pow(2).mean(dim=-1, keepdim=True)
    normed = ((x32 - mean) * torch.rsqrt(var + eps)).to(x.dtype)
    out = normed * weight
    return out + bias if bias is not None else out


def rms_norm(
    x: Float[Tensor, "... d"], weight: Float[Tensor, " d"], eps: float = 1e-5
) -> Float[Tensor, "... d"]:
    """x / sqrt(mean(x²) + eps) * weight, over the last axis (no centring, no bias; dtypes: module doc)."""
    check_eps("rms_norm", eps)
    x32 = x.to(_statistics_dtype(x))
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis: (..., d) -> (..., d), learnable gain ``weight`` and ``bias``."""

    def __init__(self, d: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        check_int("LayerNorm", "d", d)
        self.eps = check_eps("LayerNorm", eps)
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """Normalize each vector to zero mean and unit variance, then scale and shift."""
        if x.ndim == 0 or x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"LayerNorm expects a last axis of {self.weight.shape[0]}, got {tuple(x.shape)}")
        return layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis: (..., d) -> (..., d), learnable gain ``weight`` only."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        check_int("RMSNorm", "d", d)
        self.eps = check_eps("RMSNorm", eps)
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """Divide each vector by its root mean square, then scale."""
        if x.ndim == 0 or x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm expects a last axis of {self.weight.shape[0]}, got {tuple(x.shape)}")
        return rms_norm(x, self.weight, self.eps)

"""The block formats a GGUF file stores weights in, dequantized in NumPy, and a round trip to fewer bits.

A quantized tensor is a run of *blocks*, each holding 32 consecutive weights of one row:

- **Q8_0** (34 bytes): a float16 scale ``d``, then 32 signed bytes ``q``; weight = d·q. 8.5 bits per weight.
- **Q4_1** (20 bytes): a float16 scale ``d`` and a float16 minimum ``m``, then 16 bytes holding 32 unsigned
  4-bit numbers ``q`` in 0..15; weight = d·q + m. Byte j holds weight j in its low nibble and weight j + 16
  in its high nibble. 5 bits per weight.
- **F32** and **F16** are plain little-endian floats, no blocks.

The arithmetic is float32, in the same order as the `gguf` package's NumPy code (d·q, then + m), so the
results are bit-identical to ``gguf.quants.dequantize``. `fake_quantize` rounds float weights to a
Q4_1-style grid (a scale and a minimum per block) at any number of bits, to measure what quantization costs.
"""

from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float, UInt8
from torch import Tensor

from llmbook.errors import check_int

__all__ = ["BlockFormat", "FORMATS", "dequantize", "dequantize_q4_1", "dequantize_q8_0", "fake_quantize"]

BLOCK_SIZE = 32


@dataclass(frozen=True)
class BlockFormat:
    """One GGML tensor type: its name, the weights per block and the bytes per block."""

    name: str
    type_id: int
    block_size: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        """Storage cost of one weight, scales and minimums included."""
        return 8 * self.block_bytes / self.block_size


# GGML's type ids (ggml.h); only these four are read, every other type is refused by name.
FORMATS = {
    fmt.type_id: fmt
    for fmt in (
        BlockFormat("F32", 0, 1, 4),
        BlockFormat("F16", 1, 1, 2),
        BlockFormat("Q4_1", 3, BLOCK_SIZE, 20),
        BlockFormat("Q8_0", 8, BLOCK_SIZE, 34),
    )
}
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip


def _as_blocks(raw: Tensor | np.ndarray, block_bytes: int, name: str) -> np.ndarray:
    blocks = raw.numpy(force=True) if isinstance(raw, Tensor) else np.asarray(raw)
    if blocks.dtype != np.uint8:
        raise TypeError(f"{name} expects raw bytes (uint8), got dtype {blocks.dtype}")
    if blocks.size % block_bytes != 0:
        raise ValueError(f"{name}: {blocks.size} bytes is not a whole number of {block_bytes}-byte blocks")
    return blocks.reshape(-1, block_bytes)


def _float16(two_bytes: np.ndarray) -> np.ndarray:
    """Bytes (n_blocks, 2) -> float32 (n_blocks, 1): each pair is one little-endian float16."""
    return two_bytes.view(np.float16).astype(np.float32)


# NumPy rather than torch for the byte shuffling: torch's uint8 kernels on 2-byte and 16-byte rows are
# an order of magnitude slower on CPU, and loading the model would take seconds longer.
def dequantize_q4_1(raw: UInt8[Tensor, " n_bytes"] | np.ndarray) -> Float[Tensor, "n_blocks 32"]:
    """Q4_1 blocks (20 bytes each: f16 scale, f16 minimum, 16 bytes of nibbles) -> float32 weights."""
    blocks = _as_blocks(raw, 20, "dequantize_q4_1")
    scale, minimum, packed = _float16(blocks[:, 0:2]), _float16(blocks[:, 2:4]), blocks[:, 4:]
    weights = np.empty((blocks.shape[0], BLOCK_SIZE), dtype=np.float32)
    weights[:, :16] = packed & 0x0F  # low nibbles are weights 0..15
    weights[:, 16:] = packed >> 4  # high nibbles are weights 16..31
    weights *= scale  # d·q, then + m, in place: one float32 array, no temporaries
    weights += minimum
    return torch.from_numpy(weights)


def dequantize_q8_0(raw: UInt8[Tensor, " n_bytes"] | np.ndarray) -> Float[Tensor, "n_blocks 32"]:
    """Q8_0 blocks (34 bytes each: f16 scale, 32 signed bytes) -> float32 weights."""
    blocks = _as_blocks(raw, 34, "dequantize_q8_0")
    weights = blocks[:, 2:].view(np.int8).astype(np.float32)
    weights *= _float16(blocks[:, 0:2])
    return torch.from_numpy(weights)


def dequantize(raw: UInt8[Tensor, " n_bytes"] | np.ndarray, type_id: int, shape: tuple[int, ...]) -> Tensor:
    """Raw tensor bytes of GGML type ``type_id`` -> a float32 tensor of ``shape`` (rows, ..., columns)."""
    if type_id not in FORMATS:
        name = GGML_TYPE_NAMES.get(type_id, f"unknown type {type_id}")
        raise ValueError(
            f"tensor type {name} is not supported; llmbook reads "
            f"{', '.join(f.name for f in FORMATS.values())}"
            " (re-quantize the model to one of them, e.g. with llama.cpp's llama-quantize)"
        )
    fmt = FORMATS[type_id]
    raw = raw.numpy(force=True) if isinstance(raw, Tensor) else np.asarray(raw)
    if raw.dtype != np.uint8:
        raise TypeError(f"dequantize expects raw bytes (uint8), got dtype {raw.dtype}")
    if not all(isinstance(size, int | np.integer) and size >= 0 for size in shape):
        raise ValueError(f"shape must hold non-negative integer sizes, got {shape!r}")
    n_weights = int(np.prod(shape))
    expected = n_weights // fmt.block_size * fmt.block_bytes
    if n_weights % fmt.block_size != 0 or raw.size != expected:
        raise ValueError(
            f"{fmt.name} tensor of shape {shape} needs {expected} bytes in whole {fmt.block_size}-weight "
            f"blocks, got {raw.size}"
        )
    if fmt.name == "F32":
        flat = torch.from_numpy(raw.reshape(-1).view(np.float32).copy())
    elif fmt.name == "F16":
        flat = torch.from_numpy(raw.reshape(-1).view(np.float16).astype(np.float32))
    elif fmt.name == "Q4_1":
        flat = dequantize_q4_1(raw)
    else:
        flat = dequantize_q8_0(raw)
    return flat.reshape(shape)


def fake_quantize(
    weight: Float[Tensor, "rows cols"], bits: int, block_size: int = BLOCK_SIZE
) -> Float[Tensor, "rows cols"]:
    """Round each block of ``block_size`` weights to 2**bits levels between its min and max (Q4_1's rule).

    ``bits=4`` reproduces Q4_1's grid (scale d = (max - min) / 15, minimum m = min), except that Q4_1 also
    rounds d and m to float16. Returns the dequantized weights, same shape, in float32 (float64 for a
    float64 weight, which also holds blocks whose range max - min would overflow float32).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")
    check_int("fake_quantize", "block_size", block_size)
    if weight.ndim != 2 or weight.shape[-1] % block_size != 0:
        raise ValueError(
            f"weight must be 2-D with columns a multiple of block_size={block_size}, "
            f"got {tuple(weight.shape)}"
        )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight must be finite: a NaN or inf has no place on a grid between min and max")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    blocks = rearrange(weight.to(dtype), "rows (n block) -> rows n block", block=block_size)
    low, high = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)
    levels = 2**bits - 1
    scale = (high - low) / levels
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(
            f"a block's range max - min exceeds {dtype}'s largest number; pass the weight as float64"
        )
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant block is exact
    codes = ((blocks - low) / safe_scale).round().clamp(0, levels)
    return rearrange(codes * scale + low, "rows n block -> rows (n block)")

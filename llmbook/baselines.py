"""Baselines in bits per byte: the standard library's compressors and byte n-gram models.

A trained model's validation bits per byte means little on its own. These are the numbers it has to
beat on the same text: what gzip, bz2 and lzma need at their strongest settings, and what a unigram or
bigram model of bytes, counted on the training text, pays to predict it. Chapter 8 and the quality
benchmark both compute them here.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math

import numpy as np

__all__ = ["COMPRESSORS", "compressed_bits_per_byte", "byte_ngram_bits_per_byte", "all_baselines"]

# Each compressor at its strongest setting; the whole compressed stream counts, headers included.
COMPRESSORS = {
    "gzip -9": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
    "bz2 -9": lambda data: bz2.compress(data, compresslevel=9),
    "lzma -9e": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
}


def _as_bytes(data: bytes | str, name: str) -> bytes:
    # Text is measured as its UTF-8 bytes, as bits per byte always is in this book.
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"{name} must be bytes or str, got {type(data).__name__}")


def compressed_bits_per_byte(data: bytes | str, compressor: str = "gzip -9") -> float:
    """Size of `data` compressed by one of COMPRESSORS, in bits per byte of `data`."""
    data = _as_bytes(data, "data")
    if not data:
        raise ValueError("data is empty: bits per byte needs at least one byte")
    if compressor not in COMPRESSORS:
        raise ValueError(f"unknown compressor {compressor!r}; expected one of {sorted(COMPRESSORS)}")
    return 8 * len(COMPRESSORS[compressor](data)) / len(data)


def _context_keys(data: np.ndarray, context_bytes: int) -> np.ndarray:
    # Key of the (context, next byte) pair that ends at each position from `context_bytes` on.
    keys = np.zeros(len(data) - context_bytes, dtype=np.int64)
    for offset in range(context_bytes + 1):
        keys = keys * 256 + data[offset : len(data) - context_bytes + offset]
    return keys


def _count(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    # How often each query occurs among the (sorted) keys.
    right = np.searchsorted(sorted_keys, queries, side="right")
    return right - np.searchsorted(sorted_keys, queries, side="left")


def byte_ngram_bits_per_byte(
    train: bytes | str, val: bytes | str, order: int = 1, smoothing: float = 1.0
) -> float:
    """Bits per byte of `val` under an order-`order` byte model counted on `train` (1 = unigram, 2 = bigram).

    p(b | previous order-1 bytes) = (count(context, b) + smoothing) / (count(context) + 256 * smoothing),
    add-one (Laplace) smoothing by default, so that an unseen byte costs a finite number of bits. Every byte
    of `val` is predicted once; the context of its first bytes is the end of `train`, as when `val`
    directly follows `train` in one file (the book's split).
    """
    train, val = _as_bytes(train, "train"), _as_bytes(val, "val")
    if not isinstance(order, int) or not 1 <= order <= 4:
        raise ValueError(f"order must be an int from 1 (unigram) to 4, got {order!r}")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0 (1 is add-one), got {smoothing!r}")
    if not val or len(train) < order - 1:
        raise ValueError(f"need a non-empty val and at least {order - 1} train bytes for order {order}")
    context_bytes = order - 1
    train_array = np.frombuffer(train, dtype=np.uint8).astype(np.int64)
    stream = np.frombuffer(train[len(train) - context_bytes :] + val, dtype=np.uint8).astype(np.int64)
    pair_keys = np.sort(_context_keys(train_array, context_bytes))
    context_keys = pair_keys // 256  # sorted too: the context is the high part of the key
    queries = _context_keys(stream, context_bytes)
    pair_counts = _count(pair_keys, queries)
    context_counts = _count(context_keys, queries // 256)
    probabilities = (pair_counts + smoothing) / (context_counts + 256 * smoothing)
    return float(-np.log2(probabilities).sum() / len(val))


def all_baselines(train: bytes | str, val: bytes | str) -> dict[str, float]:
    """Bits per byte of `val`: every compressor, add-one unigram and bigram byte models, uniform bytes."""
    results = {name: compressed_bits_per_byte(val, name) for name in COMPRESSORS}
    results["unigram bytes (add-one)"] = byte_ngram_bits_per_byte(train, val, order=1)
    results["bigram bytes (add-one)"] = byte_ngram_bits_per_byte(train, val, order=2)
    results["uniform bytes"] = math.log2(256)
    return results

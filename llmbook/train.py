"""Training the whole model: token files, random batches, the loop, checkpoints, and running the same
loop on several processes with DistributedDataParallel (`torchrun --nproc_per_node=N -m llmbook train`).

Data. A corpus is tokenized once into a flat file of uint16 ids (`prepare_tokens`); training reads it
through `np.memmap`, so a file larger than memory costs nothing to open, and a batch is `batch_size`
windows of `context_length + 1` tokens starting at random offsets: inputs are the first
`context_length` tokens of each window, targets the last `context_length` (the same text shifted by one).

Checkpoints. One safetensors file holds every tensor (model weights, optimizer moments, random-number
generator states) and its header holds the rest as JSON (step, configs, history). No pickle is involved,
so loading a checkpoint cannot run code. The file is written under a temporary name in the same folder,
flushed to disk, then renamed over the old one (`os.replace` is atomic), so a crash mid-write leaves the
previous checkpoint intact.

Determinism. The batch offsets come from one `torch.Generator` seeded by `TrainConfig.seed`; its state
goes into every checkpoint, so training N steps straight and training N/2 steps, saving, loading and
training N/2 more give bit-identical losses on the same machine.

Distributed. Every process draws the same global batch offsets from the same generator and takes its
own contiguous slice of rows; DDP averages the gradients, so N processes follow the same trajectory as
one process with the whole batch, up to the rounding of the all-reduce.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from jaxtyping import Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from llmbook import kernels
from llmbook.loss import bits_per_byte, cross_entropy
from llmbook.model import ModelConfig, TransformerLM
from llmbook.optim import AdamW, clip_grad_norm, cosine_schedule, param_groups

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "llmbook-checkpoint-1"
TOKEN_DTYPE = np.uint16
MAX_TOKEN_ID = int(np.iinfo(TOKEN_DTYPE).max)  # 65535: ids must fit in two bytes


# ----------------------------------------------------------------------------------------------------
# Token files


def _metadata_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_name) on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name in the same directory (so the rename stays on one file system); not mkstemp, whose
    # 0600 permissions would carry over to the final file.
    tmp_name = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp_name)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def _tokenizer_vocab_size(tokenizer: Any) -> int | None:
    """The vocabulary size of an llmbook, tiktoken or Hugging Face tokenizer, if it says."""
    for attribute in ("vocab_size", "n_vocab"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            return value
    if hasattr(tokenizer, "get_vocab_size"):
        return int(tokenizer.get_vocab_size())
    return None


def prepare_tokens(
    text_or_ids: str | Sequence[int] | np.ndarray, tokenizer: Any, path: str | os.PathLike
) -> np.memmap:
    """Write ids (or `tokenizer.encode(text)`) to `path` as flat uint16, plus `path + ".json"` metadata
    (n_tokens, n_bytes of the text when known); returns the file opened read-only as a memmap."""
    path = Path(path)
    n_bytes = None
    vocab_size = _tokenizer_vocab_size(tokenizer) if tokenizer is not None else None
    if vocab_size is not None and vocab_size > MAX_TOKEN_ID + 1:
        raise ValueError(
            f"the tokenizer has {vocab_size} ids, but token files store uint16 "
            f"(at most {MAX_TOKEN_ID + 1} ids)"
        )
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise TypeError("prepare_tokens got text but no tokenizer; pass one with an encode(text) method")
        n_bytes = len(text_or_ids.encode("utf-8"))
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
    _atomic_write(path, lambda tmp: ids.astype(TOKEN_DTYPE).tofile(tmp))
    metadata = {"dtype": "uint16", "n_tokens": int(ids.size), "n_bytes": n_bytes, "vocab_size": vocab_size}
    _write_json(_metadata_path(path), metadata)
    return load_tokens(path)


def load_tokens(path: str | os.PathLike) -> np.memmap:
    """Open a token file written by `prepare_tokens` without reading it into memory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no token file at {path}; write one with llmbook.train.prepare_tokens")
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


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, val): the last ~val_fraction of `text`, cut at a line break so no line is split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def _batch_starts(n_tokens: int, batch_size: int, context_length: int, generator: torch.Generator) -> Tensor:
    """Random window offsets: each window needs context_length + 1 tokens (inputs plus one target)."""
    if n_tokens <= context_length:
        raise ValueError(
            f"the token file has {n_tokens} tokens; a batch needs more than context_length={context_length}"
        )
    return torch.randint(0, n_tokens - context_length, (batch_size,), generator=generator)


def _windows(
    tokens: np.ndarray, starts: Tensor, context_length: int, device: torch.device | str
) -> tuple[Int[Tensor, "batch context"], Int[Tensor, "batch context"]]:
    rows = np.stack([tokens[start : start + context_length + 1] for start in starts.tolist()])
    windows = torch.from_numpy(rows.astype(np.int64))
    device = torch.device(device)
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        windows = windows.pin_memory().to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


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
    starts = _batch_starts(len(tokens), batch_size, context_length, generator)
    return _windows(tokens, starts, context_length, device)


# ----------------------------------------------------------------------------------------------------
# Configuration and history


@dataclass
class TrainConfig:
    """Everything a training run depends on. `batch_size` is the global batch (all processes together)."""

    model: ModelConfig
    train_data: str
    val_data: str | None = None
    tokenizer: str | None = None  # "gpt2" or a Tokenizer.save directory; recorded for `llmbook sample`
    bytes_per_token: float | None = None  # None: read n_bytes / n_tokens from the token file's metadata
    batch_size: int = 32
    steps: int = 1000
    max_lr: float = 1e-3
    min_lr: float | None = None  # None: max_lr / 10
    warmup_steps: int = 100
    cosine_steps: int | None = None  # None: decay until `steps`
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    eval_interval: int = 100
    eval_batches: int = 10
    checkpoint_dir: str | None = None
    checkpoint_interval: int | None = None  # None: only at the end
    resume: bool = True  # continue from checkpoint_dir when it holds a checkpoint
    seed: int = 0
    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str = "float32"  # or "bfloat16" (autocast; weights and optimizer state stay float32)
    compile: bool = False
    progress: bool = True

    # Fields that change the trajectory: resuming with a different value would silently train another run.
    MUST_MATCH_ON_RESUME = (
        "batch_size", "max_lr", "min_lr", "warmup_steps", "cosine_steps", "weight_decay", "betas", "eps",
        "grad_clip", "seed", "dtype",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        if not isinstance(self.model, ModelConfig):
            raise TypeError(f"model must be a ModelConfig (or a dict of its fields), got {type(self.model)}")
        self.betas = tuple(self.betas)
        positive = {"batch_size": self.batch_size, "steps": self.steps, "eval_interval": self.eval_interval}
        positive |= {"eval_batches": self.eval_batches, "max_lr": self.max_lr}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.checkpoint_interval is not None and self.checkpoint_interval < 1:
            raise ValueError(f"checkpoint_interval must be >= 1 or None, got {self.checkpoint_interval}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.device != "auto":
            torch.device(self.device)  # raises on a malformed device string
        # Also validates min_lr, warmup_steps and cosine_steps together.
        cosine_schedule(0, self.max_lr, self.resolved_min_lr, self.warmup_steps, self.resolved_cosine_steps)

    @property
    def resolved_min_lr(self) -> float:
        return self.max_lr / 10 if self.min_lr is None else self.min_lr

    @property
    def resolved_cosine_steps(self) -> int:
        return self.steps if self.cosine_steps is None else self.cosine_steps

    def lr_at(self, step: int) -> float:
        """The learning rate the schedule gives at `step`."""
        return cosine_schedule(
            step, self.max_lr, self.resolved_min_lr, self.warmup_steps, self.resolved_cosine_steps
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict (the model config nested under "model")."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys raise a ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)


def check_resume_compatible(saved: dict, config: TrainConfig) -> None:
    """Raise a ValueError naming the first field where a checkpoint's config and `config` differ."""
    saved_config = TrainConfig.from_dict(saved)
    for name in dataclasses.asdict(config.model):
        old, new = getattr(saved_config.model, name), getattr(config.model, name)
        if old != new:
            raise ValueError(
                f"the checkpoint was made for model.{name}={old!r}, "
                f"but this config has model.{name}={new!r}; "
                "use another checkpoint_dir or the checkpoint's config"
            )
    resolved = {"min_lr": "resolved_min_lr", "cosine_steps": "resolved_cosine_steps"}
    for name in TrainConfig.MUST_MATCH_ON_RESUME:
        old = getattr(saved_config, resolved.get(name, name))
        new = getattr(config, resolved.get(name, name))
        if old != new:
            raise ValueError(
                f"the checkpoint was made with {name}={old!r}, but this config has {name}={new!r}; "
                "resuming would not continue the same run (use another checkpoint_dir)"
            )


@dataclass
class History:
    """What a run measured. Per optimizer step: loss (nats/token), lr, grad_norm (before clipping).
    Per evaluation (at eval_step): mean loss over eval_batches fixed batches, and bits per byte when
    the token file says how many bytes of text it encodes."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float | None] = field(default_factory=list)
    train_bpb: list[float | None] = field(default_factory=list)
    val_bpb: list[float | None] = field(default_factory=list)
    tokens_per_second: list[float | None] = field(default_factory=list)  # since the previous evaluation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> History:
        return cls(**values)


class NonFiniteLossError(FloatingPointError):
    """Training met a NaN/inf loss or gradient; the last checkpoint written is still the last good one."""


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _checkpoint_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / CHECKPOINT_FILE


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    config: TrainConfig | ModelConfig | None = None,
    rng_states: dict[str, Tensor] | None = None,
    history: History | None = None,
) -> Path:
    """Atomically write model (+ optimizer, RNG states) tensors and JSON metadata to one safetensors file;
    `path` is a directory (the file is DIR/checkpoint.safetensors) or a .safetensors file."""
    file = _checkpoint_file(path)
    tensors: dict[str, Tensor] = {}
    # Tied weights (lm_head.weight is tok_embeddings.weight) are one tensor stored once; safetensors
    # refuses two names for one memory, so the others are recorded as aliases.
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in _unwrap(model).state_dict().items():
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.dtype,
        )
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[f"model.{name}"] = tensor.detach().contiguous().cpu()

    optimizer_json = None
    if optimizer is not None:
        state_dict = optimizer.state_dict()
        optimizer_json = {"param_groups": state_dict["param_groups"], "state": {}}
        for index, param_state in state_dict["state"].items():
            optimizer_json["state"][str(index)] = {}
            for key, value in param_state.items():
                if isinstance(value, Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous().cpu()
                else:
                    optimizer_json["state"][str(index)][key] = value
    for name, state in (rng_states or {}).items():
        tensors[f"rng.{name}"] = state.detach().contiguous().cpu()

    if isinstance(config, TrainConfig):
        config_json = {"train": config.to_dict(), "model": dataclasses.asdict(config.model)}
    elif isinstance(config, ModelConfig):
        config_json = {"train": None, "model": dataclasses.asdict(config)}
    else:
        model_config = getattr(_unwrap(model), "config", None)
        config_json = {"train": None, "model": dataclasses.asdict(model_config) if model_config else None}
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": config_json,
        "aliases": aliases,
        "optimizer": optimizer_json,
        "history": history.to_dict() if history is not None else None,
    }
    _atomic_write(file, lambda tmp: save_file(tensors, tmp, metadata={"llmbook": json.dumps(metadata)}))
    return file


@dataclass
class Checkpoint:
    """The contents of a checkpoint file, as `load_checkpoint` returns them."""

    path: Path
    step: int
    model_state: dict[str, Tensor]
    optimizer_state: dict | None
    rng_states: dict[str, Tensor]
    model_config: ModelConfig | None
    train_config: dict | None  # TrainConfig.to_dict() of the run, if a run wrote it
    history: History | None


def read_checkpoint_metadata(path: str | os.PathLike) -> dict:
    """The JSON part of a checkpoint (step, configs, history) without loading any tensor."""
    file = _checkpoint_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    with safe_open(file, framework="pt") as handle:
        header = handle.metadata() or {}
    if "llmbook" not in header:
        raise ValueError(
            f"{file} is a safetensors file but not an llmbook checkpoint (no 'llmbook' metadata)"
        )
    metadata = json.loads(header["llmbook"])
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{file} has checkpoint format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
        )
    return metadata


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str = "cpu",
) -> Checkpoint:
    """Read a checkpoint; if `model`/`optimizer` are given, load their states into them (strictly)."""
    file = _checkpoint_file(path)
    metadata = read_checkpoint_metadata(file)
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "optimizer": {}, "rng": {}}
    with safe_open(file, framework="pt", device=str(device)) as handle:
        for key in handle.keys():
            group, name = key.split(".", 1)
            groups[group][name] = handle.get_tensor(key)
    model_state = groups["model"]
    for alias, target in metadata["aliases"].items():
        model_state[alias] = model_state[target]

    optimizer_state = None
    if metadata["optimizer"] is not None:
        state: dict[int, dict] = {
            int(i): dict(values) for i, values in metadata["optimizer"]["state"].items()
        }
        for name, tensor in groups["optimizer"].items():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = tensor
        param_groups_json = metadata["optimizer"]["param_groups"]
        for group in param_groups_json:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        optimizer_state = {"state": state, "param_groups": param_groups_json}

    config = metadata["config"] or {}
    checkpoint = Checkpoint(
        path=file,
        step=int(metadata["step"]),
        model_state=model_state,
        optimizer_state=optimizer_state,
        rng_states=groups["rng"],
        model_config=ModelConfig(**config["model"]) if config.get("model") else None,
        train_config=config.get("train"),
        history=History.from_dict(metadata["history"]) if metadata["history"] else None,
    )
    if model is not None:
        _unwrap(model).load_state_dict(model_state, strict=True)
    if optimizer is not None:
        if optimizer_state is None:
            raise ValueError(f"{file} holds no optimizer state to load")
        optimizer.load_state_dict(optimizer_state)
    return checkpoint


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> TransformerLM:
    """Build a TransformerLM from a checkpoint's model config and load its weights (in eval mode)."""
    checkpoint = load_checkpoint(path, device=device)
    if checkpoint.model_config is None:
        raise ValueError(f"{checkpoint.path} does not record a model config")
    model = TransformerLM(checkpoint.model_config).to(device)
    model.load_state_dict(checkpoint.model_state, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# The distributed setup


@dataclass
class _Distributed:
    rank: int
    world_size: int
    device: torch.device
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: Tensor) -> Tensor:
        """The average of a scalar over all processes."""
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value = value / self.world_size
        return value

    def gather(self, tensor: Tensor) -> list[Tensor]:
        """Every process's copy of a same-shaped tensor, in rank order."""
        if self.world_size == 1:
            return [tensor]
        on_device = tensor.to(self.device)  # nccl only moves GPU tensors
        gathered = [torch.empty_like(on_device) for _ in range(self.world_size)]
        dist.all_gather(gathered, on_device)
        return [t.cpu() for t in gathered]


def _setup_distributed(device_name: str) -> _Distributed:
    """Join the process group torchrun describes in the environment (if any) and pick this rank's device."""
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    initialized_here = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        initialized_here = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank = 0
    if use_cuda:
        if world_size > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            device = torch.device("cuda" if device_name == "auto" else device_name)
        if device.index is None:  # "cuda" -> "cuda:N", so RNG states and DDP know which GPU
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu" if device_name == "auto" else device_name)
    return _Distributed(rank, world_size, device, initialized_here)


# ----------------------------------------------------------------------------------------------------
# The training loop


def _next_token_loss(model: nn.Module, logits: Tensor, targets: Tensor) -> Tensor:
    """cross_entropy of the logits (computed in float32); a model built with kernels=True also routes the
    loss to the Triton kernel (chapter 8), which never stores the softmax."""
    config = getattr(_unwrap(model), "config", None)
    use = getattr(config, "kernels", False)
    with kernels.use_kernels() if use else contextlib.nullcontext():
        return cross_entropy(logits, targets)


def _copy_tokenizer(spec: str | None, checkpoint_dir: Path) -> None:
    """Keep a tokenizer directory beside the checkpoint so `llmbook sample` needs nothing else."""
    if spec and Path(spec).is_dir():
        shutil.copytree(spec, checkpoint_dir / "tokenizer", dirs_exist_ok=True)


def _bytes_per_token(config: TrainConfig, path: str | None) -> float | None:
    if path is None:
        return None
    if config.bytes_per_token is not None:
        return config.bytes_per_token
    metadata = token_file_metadata(path)
    if metadata.get("n_bytes") and metadata.get("n_tokens"):
        return metadata["n_bytes"] / metadata["n_tokens"]
    return None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    n_batches: int,
    seed: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """Mean next-token loss (nats/token) over `n_batches` batches drawn from a fresh generator seeded
    with `seed`, so every evaluation of a run sees the same windows. With world_size > 1 each process
    computes its slice of every batch and the result is the average over processes."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    local = batch_size // world_size
    total = torch.zeros((), device=device)
    for _ in range(n_batches):
        starts = _batch_starts(len(tokens), batch_size, context_length, generator)
        x, y = _windows(tokens, starts[rank * local : (rank + 1) * local], context_length, device)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(x)
        total += _next_token_loss(model, logits, y)
    model.train(was_training)
    mean = total / n_batches
    if world_size > 1:
        dist.all_reduce(mean, op=dist.ReduceOp.SUM)
        mean = mean / world_size
    return mean.item()


def train(
    config: TrainConfig, callback: Callable[[int, nn.Module, History], bool | None] | None = None
) -> History:
    """Train (or resume) the run `config` describes and return its History.

    `callback(step, model, history)` runs after every evaluation; returning True stops the run early
    (after saving a checkpoint). Under torchrun every process calls `train` and all get the same History.
    """
    distributed = _setup_distributed(config.device)
    try:
        # Model initialisation and dropout draw from torch's global generator; seed it for this run and
        # give the caller's generator state back afterwards.
        devices = [distributed.device] if distributed.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return _train(config, callback, distributed)
    finally:
        if distributed.initialized_here:
            dist.destroy_process_group()


def _train(config: TrainConfig, callback: Callable | None, distributed: _Distributed) -> History:
    device, rank, world_size = distributed.device, distributed.rank, distributed.world_size
    if config.batch_size % world_size:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the {world_size} processes")
    local_batch = config.batch_size // world_size
    context_length = config.model.context_length
    amp_dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32

    train_tokens = load_tokens(config.train_data)
    val_tokens = load_tokens(config.val_data) if config.val_data else None
    vocab_limit = max(int(train_tokens.max()), int(val_tokens.max()) if val_tokens is not None else 0)
    if vocab_limit >= config.model.vocab_size:
        raise ValueError(
            f"the token files hold id {vocab_limit}, but model.vocab_size={config.model.vocab_size}"
        )
    bytes_per_token = {"train": _bytes_per_token(config, config.train_data)}
    bytes_per_token["val"] = _bytes_per_token(config, config.val_data)

    torch.manual_seed(config.seed)  # the same initial weights on every process
    model = TransformerLM(config.model).to(device)  # built on the CPU: the same weights on any device
    optimizer = AdamW(
        param_groups(model, config.weight_decay), lr=config.max_lr, betas=config.betas, eps=config.eps
    )
    data_generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed + 1 + rank)  # dropout masks: different on each process
    history = History()
    step = 0

    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    checkpoint_file = checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir else None
    if checkpoint_file is not None and checkpoint_file.exists() and config.resume:
        metadata = read_checkpoint_metadata(checkpoint_file)
        if metadata["config"].get("train") is None:
            raise ValueError(f"{checkpoint_file} was not written by train(); it records no TrainConfig")
        check_resume_compatible(metadata["config"]["train"], config)
        checkpoint = load_checkpoint(checkpoint_file, model, optimizer, device="cpu")
        step, history = checkpoint.step, checkpoint.history or History()
        data_generator.set_state(checkpoint.rng_states["data"])
        if f"torch.rank{rank}" in checkpoint.rng_states:
            torch.set_rng_state(checkpoint.rng_states[f"torch.rank{rank}"])
        if device.type == "cuda" and f"cuda.rank{rank}" in checkpoint.rng_states:
            torch.cuda.set_rng_state(checkpoint.rng_states[f"cuda.rank{rank}"], device)
    if checkpoint_dir is not None and distributed.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _copy_tokenizer(config.tokenizer, checkpoint_dir)
    start_step = step

    training_model: nn.Module = model
    if world_size > 1:
        training_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        training_model = torch.compile(training_model)
    training_model.train()

    def rng_states(data_state: Tensor, torch_state: Tensor, cuda_state: Tensor | None) -> dict[str, Tensor]:
        states = {"data": data_state}
        for r, state in enumerate(distributed.gather(torch_state)):
            states[f"torch.rank{r}"] = state
        if cuda_state is not None:
            for r, state in enumerate(distributed.gather(cuda_state)):
                states[f"cuda.rank{r}"] = state
        return states

    def current_rng() -> tuple[Tensor, Tensor, Tensor | None]:
        cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return data_generator.get_state(), torch.get_rng_state(), cuda_state

    def save(at_step: int, rng: tuple[Tensor, Tensor, Tensor | None]) -> None:
        if checkpoint_file is None:
            return
        states = rng_states(*rng)  # collective: every process takes part
        if distributed.is_main:
            save_checkpoint(checkpoint_file, model, optimizer, at_step, config, states, history)
        if world_size > 1:
            dist.barrier()

    def checkpoint_due(at_step: int) -> bool:
        return config.checkpoint_interval is not None and at_step % config.checkpoint_interval == 0

    progress = tqdm(
        total=config.steps, initial=step, disable=not (config.progress and distributed.is_main),
        desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
    )  # fmt: skip
    last_eval_time, last_eval_step = time.perf_counter(), step
    try:
        stop = False
        while True:
            already_evaluated = bool(history.eval_step) and history.eval_step[-1] == step
            if (step % config.eval_interval == 0 or step >= config.steps) and not already_evaluated:
                losses = {}
                for split, tokens in (("train", train_tokens), ("val", val_tokens)):
                    if tokens is None:
                        losses[split] = None
                        continue
                    losses[split] = evaluate(
                        model, tokens, config.batch_size, context_length, config.eval_batches,
                        config.seed + 1, device, amp_dtype, rank, world_size,
                    )  # fmt: skip
                now = time.perf_counter()
                elapsed = now - last_eval_time
                tokens_seen = (step - last_eval_step) * config.batch_size * context_length
                history.eval_step.append(step)
                history.train_loss.append(losses["train"])
                history.val_loss.append(losses["val"])
                for split in ("train", "val"):
                    ratio, loss = bytes_per_token[split], losses[split]
                    bpb = bits_per_byte(loss, 1, ratio) if ratio and loss is not None else None
                    getattr(history, f"{split}_bpb").append(bpb)
                history.tokens_per_second.append(
                    tokens_seen / elapsed if tokens_seen and elapsed > 0 else None
                )
                if not math.isfinite(losses["train"]):
                    raise NonFiniteLossError(
                        f"evaluation loss is {losses['train']} at step {step}; nothing saved, "
                        f"the last checkpoint in {checkpoint_dir} is the last good one"
                    )
                if distributed.is_main and config.progress:
                    val = f", val {losses['val']:.4f}" if losses["val"] is not None else ""
                    bpb = history.val_bpb[-1] if history.val_bpb[-1] is not None else history.train_bpb[-1]
                    bpb_text = (
                        f" ({'val ' if history.val_bpb[-1] is not None else 'train '}{bpb:.3f} bits/byte)"
                    )
                    progress.write(
                        f"step {step}: train {losses['train']:.4f}{val} nats/token"
                        + (bpb_text if bpb else "")
                    )
                if callback is not None:
                    stop = bool(callback(step, model, history))
                last_eval_time, last_eval_step = time.perf_counter(), step
            if step >= config.steps or stop:
                if step != start_step or stop:
                    save(step, current_rng())
                break

            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rng_before = current_rng()  # a checkpoint at this step must replay this step's batch
            starts = _batch_starts(len(train_tokens), config.batch_size, context_length, data_generator)
            x, y = _windows(
                train_tokens, starts[rank * local_batch : (rank + 1) * local_batch], context_length, device
            )
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
                logits = training_model(x)
            loss = _next_token_loss(model, logits, y)
            loss_value = distributed.mean(loss.detach()).item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"training loss is {loss_value} at step {step} (lr {lr:.3g}); nothing saved, the last "
                    f"checkpoint in {checkpoint_dir} is the last good one. Try a lower max_lr or grad_clip."
                )
            # Only now, with a finite loss in hand for these weights, is this state worth a checkpoint.
            if step != start_step and checkpoint_due(step):
                save(step, rng_before)

            loss.backward()
            if config.grad_clip is not None:
                grad_norm = clip_grad_norm(model.parameters(), config.grad_clip)
            else:
                grad_norm = torch.linalg.vector_norm(
                    torch.stack(
                        [torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]
                    )
                )
            grad_norm_value = grad_norm.item()
            if not math.isfinite(grad_norm_value):
                raise NonFiniteLossError(
                    f"gradient norm is {grad_norm_value} at step {step}; nothing saved, the last checkpoint "
                    f"in {checkpoint_dir} is the last good one"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            history.step.append(step)
            history.loss.append(loss_value)
            history.lr.append(lr)
            history.grad_norm.append(grad_norm_value)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
    finally:
        progress.close()  # also when a NonFiniteLossError leaves the loop
    return history


# ----------------------------------------------------------------------------------------------------
# Command line: python -m llmbook train ...


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for `python -m llmbook train`: a JSON config file and/or one flag per config field."""
    parser.add_argument("--config", help="JSON file with TrainConfig fields (model fields under 'model')")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("resume", "compile", "progress"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "betas":
            parser.add_argument(flag, dest=f.name, type=float, nargs=2, default=None)
        elif "str" in str(f.type):  # paths and names stay strings even when they look like numbers
            parser.add_argument(flag, dest=f.name, type=str, default=None)
        else:
            parser.add_argument(flag, dest=f.name, type=_parse_scalar, default=None)
    for f in dataclasses.fields(ModelConfig):
        parser.add_argument("--model." + f.name, dest="model." + f.name, type=_parse_scalar, default=None)


def _parse_scalar(text: str) -> Any:
    """Parse a flag value as JSON (numbers, true/false, null) and fall back to the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge a --config JSON file with flags (flags win) into a TrainConfig."""
    values: dict[str, Any] = {}
    if args.config:
        values = json.loads(Path(args.config).read_text(encoding="utf-8"))
    model_values = dict(values.get("model") or {})
    for name, value in vars(args).items():
        if value is None or name in ("config", "print_config", "command"):
            continue
        if name.startswith("model."):
            model_values[name.removeprefix("model.")] = value
        else:
            values[name] = value
    values["model"] = model_values
    if "train_data" not in values:
        raise ValueError("no training data: pass --train-data FILE (see `python -m llmbook prepare`)")
    return TrainConfig.from_dict(values)


def main_train(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    history = train(config)
    if int(os.environ.get("RANK", "0")) == 0 and history.eval_step:
        print(f"final step {history.eval_step[-1]}: train loss {history.train_loss[-1]:.4f} nats/token")
    return 0

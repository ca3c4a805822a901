"""Checkpoints: one safetensors file holds every tensor, its header the rest as JSON.

Tensors: model weights, optimizer moments and random-number generator states. JSON: step, configs,
history, the optimizer's non-tensor state. No pickle is involved, so loading a checkpoint cannot run
code. The file is written with `llmbook.data.atomic_write` (temporary name, fsync, rename), so a crash
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from llmbook.data import atomic_write
from llmbook.model import ModelConfig, TransformerLM
from llmbook.train_config import History, TrainConfig

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "llmbook-checkpoint-1"


def unwrap(model: nn.Module) -> nn.Module:
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


def _model_tensors(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, str]:
    """Put the model's tensors into `tensors` (as "model.NAME"); return {alias: name} for tied weights.

    Tied weights (lm_head.weight is tok_embeddings.weight) are one tensor stored once; safetensors
    refuses two names for one memory, so the others are recorded as aliases.
    """
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in unwrap(model).state_dict().items():
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
    return aliases


def _optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> dict:
    """Put the optimizer's tensors into `tensors` (as "optimizer.INDEX.KEY"); return the rest as JSON."""
    state_dict = optimizer.state_dict()
    optimizer_json: dict = {"param_groups": state_dict["param_groups"], "state": {}}
    for index, param_state in state_dict["state"].items():
        optimizer_json["state"][str(index)] = {}
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                optimizer_json["state"][str(index)][key] = value
    return optimizer_json


def _config_json(model: nn.Module, config: TrainConfig | ModelConfig | None) -> dict:
    if isinstance(config, TrainConfig):
        return {"train": config.to_dict(), "model": dataclasses.asdict(config.model)}
    if isinstance(config, ModelConfig):
        return {"train": None, "model": dataclasses.asdict(config)}
    model_config = getattr(unwrap(model), "config", None)
    return {"train": None, "model": dataclasses.asdict(model_config) if model_config else None}


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
    aliases = _model_tensors(model, tensors)
    optimizer_json = _optimizer_tensors(optimizer, tensors) if optimizer is not None else None
    for name, state in (rng_states or {}).items():
        tensors[f"rng.{name}"] = state.detach().contiguous().cpu()
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": _config_json(model, config),
        "aliases": aliases,
        "optimizer": optimizer_json,
        "history": history.to_dict() if history is not None else None,
    }
    atomic_write(file, lambda tmp: save_file(tensors, tmp, metadata={"llmbook": json.dumps(metadata)}))
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


def _optimizer_state(optimizer_json: dict, tensors: dict[str, Tensor]) -> dict:
    """The optimizer state_dict from its JSON part and its "INDEX.KEY" tensors."""
    state: dict[int, dict] = {int(i): dict(values) for i, values in optimizer_json["state"].items()}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    param_groups_json = optimizer_json["param_groups"]
    for group in param_groups_json:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": param_groups_json}


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
        optimizer_state = _optimizer_state(metadata["optimizer"], groups["optimizer"])
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
        unwrap(model).load_state_dict(model_state, strict=True)
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

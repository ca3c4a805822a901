"""Checkpoints: one safetensors file holds every tensor, its header the rest as JSON.

Tensors: model weights, optimizer moments and random-number generator states. JSON: step, configs,
history, the optimizer's non-tensor state, a sha256 of the tensor data and (for a training run) a sha256
of its training token file. No pickle is involved, so loading a checkpoint cannot run code. The file is
written with `llmbook.data.atomic_write` (temporary name, fsync, rename), so a crash mid-write leaves the
previous checkpoint intact.

Loading verifies what the file claims: the tensors against their checksum (a flipped byte is a
`CorruptFileError`), the metadata against its schema (a checksum proves integrity, not validity: a file
edited and re-hashed is still refused when a field has the wrong type, an unknown key or an impossible
size), and, when loading into a model, the model's config against the one the checkpoint was made with
(a same-shaped model with other heads or positions is a `RunMismatchError`).

A training run holds its checkpoint folder for its whole life (`hold_checkpoint_dir`, an OS lock that
dies with the process), so two runs can never write into one folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from llmbook.data import atomic_write
from llmbook.errors import (
    ConfigError,
    CorruptFileError,
    OverwriteError,
    RunLockedError,
    RunMismatchError,
    check_fits_in_memory,
)
from llmbook.model import ModelConfig, TransformerLM
from llmbook.train_config import History, TrainConfig, model_bytes

CHECKPOINT_FILE = "checkpoint.safetensors"
LOCK_FILE = ".lock"  # in the checkpoint folder: held (flock) by the training run that writes there
# Set by `llmbook.launch` for the processes it starts: the pid of the launcher that holds their folder.
LOCK_OWNER_ENV = "LLMBOOK_CHECKPOINT_LOCK_OWNER"
CHECKPOINT_FORMAT = "llmbook-checkpoint-2"  # 2: tensor checksum and training-data fingerprint
# ModelConfig fields that do not change what the weights mean: a model may differ in them from its checkpoint.
RUNTIME_FIELDS = ("dropout", "kernels")


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


def optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> dict:
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


def tensor_checksum(tensors: dict[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (CPU tensors)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def metadata_checksum(metadata: dict) -> str:
    """sha256 of the metadata (without this checksum), so a damaged step or config is caught too."""
    rest = {key: value for key, value in metadata.items() if key != "metadata_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


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
    data_sha256: dict[str, str] | None = None,
) -> Path:
    """Atomically write model (+ optimizer, RNG states) tensors and JSON metadata to one safetensors file;
    `path` is a directory (the file is DIR/checkpoint.safetensors) or a .safetensors file.
    `data_sha256` ({"train": hex digest}) records the data the run trained on, checked on resume."""
    file = _checkpoint_file(path)
    tensors: dict[str, Tensor] = {}
    aliases = _model_tensors(model, tensors)
    optimizer_json = optimizer_tensors(optimizer, tensors) if optimizer is not None else None
    for name, state in (rng_states or {}).items():
        tensors[f"rng.{name}"] = state.detach().contiguous().cpu()
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": _config_json(model, config),
        "aliases": aliases,
        "optimizer": optimizer_json,
        "history": history.to_dict() if history is not None else None,
        "tensor_sha256": tensor_checksum(tensors),
        "data_sha256": data_sha256,
    }
    metadata["metadata_sha256"] = metadata_checksum(metadata)
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


_WHAT_A_CHECKPOINT_IS = "a checkpoint is the checkpoint.safetensors that llmbook's save_checkpoint writes"


def _not_a_checkpoint(file: Path, problem: str) -> CorruptFileError:
    with open(file, "rb") as handle:
        start = handle.read(2)
    if start[:1] == b"\x80" or start == b"PK":  # a pickle, or torch.save's zip of pickles
        problem = "it is a pickle / torch.save file, which llmbook never loads (loading one can run code)"
    return CorruptFileError(
        f"{file} is not a readable llmbook checkpoint: {problem}; {_WHAT_A_CHECKPOINT_IS}"
    )


def read_checkpoint_metadata(path: str | os.PathLike) -> dict:
    """The JSON part of a checkpoint (step, configs, history) without loading any tensor."""
    file = _checkpoint_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    try:
        with safe_open(file, framework="pt") as handle:
            header = handle.metadata() or {}
    except SafetensorError as err:
        raise _not_a_checkpoint(file, f"{err} (cut short while copying, or another kind of file?)") from None
    if "llmbook" not in header:
        raise CorruptFileError(
            f"{file} is a safetensors file but not an llmbook checkpoint (no 'llmbook' metadata)"
        )
    try:
        metadata = json.loads(header["llmbook"])
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{file}: its llmbook metadata is not valid JSON ({err.msg})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != CHECKPOINT_FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise CorruptFileError(
            f"{file} has checkpoint format {found!r}, expected {CHECKPOINT_FORMAT!r}; "
            "retrain it (older formats carry no checksum to verify the weights with)"
        )
    if metadata.get("metadata_sha256") != metadata_checksum(metadata):
        raise CorruptFileError(
            f"{file}: the step, configs or history in its metadata do not match their checksum "
            "(metadata_sha256); the file is damaged — use another copy"
        )
    _check_metadata(file, metadata)
    return metadata


# ----------------------------------------------------------------------------------------------------
# The metadata's schema: checked before anything is built from it.

_METADATA_KEYS = (
    "format", "step", "config", "aliases", "optimizer", "history", "tensor_sha256", "data_sha256",
    "metadata_sha256",
)  # fmt: skip


class _Refusal(Exception):
    """One metadata field that breaks the schema: its path ("config.model.d_ff") and the problem."""

    def __init__(self, field: str, problem: str):
        super().__init__(problem)
        self.field = field


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, field: str, problem: str) -> None:
    if not condition:
        raise _Refusal(field, problem)


def _check_keys(values, field: str, allowed, required=()) -> None:
    """`values` is a JSON object whose keys are among `allowed` and include every one of `required`."""
    _require(isinstance(values, dict), field, f"must be a JSON object, got {type(values).__name__}")
    unknown, missing = sorted(set(values) - set(allowed)), sorted(set(required) - set(values))
    _require(not unknown, field, f"has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    _require(not missing, field, f"lacks the key(s) {missing}")


def _check_str_map(values, field: str) -> None:
    _require(isinstance(values, dict), field, f"must be a JSON object, got {type(values).__name__}")
    for key, value in values.items():
        _require(isinstance(value, str), f"{field}.{key}", f"must be a string, got {value!r}")


def _check_config(config) -> None:
    """config = {"train": TrainConfig fields or null, "model": ModelConfig fields or null}, both valid."""
    _check_keys(config, "config", ("train", "model"), required=("train", "model"))
    if config["model"] is not None:
        model_fields = [f.name for f in dataclasses.fields(ModelConfig)]
        _check_keys(config["model"], "config.model", model_fields)
        try:
            ModelConfig(**config["model"])
        except ConfigError as err:
            raise _Refusal(f"config.model.{err.field}", str(err)) from None
    if config["train"] is not None:
        try:
            TrainConfig.from_dict(config["train"])
        except ConfigError as err:
            raise _Refusal(f"config.train.{err.field}", str(err)) from None


def _check_history(history) -> None:
    if history is None:
        return
    names = [f.name for f in dataclasses.fields(History)]
    _check_keys(history, "history", names, required=names)
    for name in names:
        values = history[name]
        _require(isinstance(values, list), f"history.{name}", f"must be a list, got {type(values).__name__}")
        for value in values:
            _require(
                value is None or (isinstance(value, int | float) and not isinstance(value, bool)),
                f"history.{name}", f"must hold numbers (or null), got {value!r}",
            )  # fmt: skip


def _check_optimizer(optimizer) -> None:
    if optimizer is None:
        return
    _check_keys(optimizer, "optimizer", ("param_groups", "state"), required=("param_groups", "state"))
    groups, state = optimizer["param_groups"], optimizer["state"]
    _require(isinstance(groups, list), "optimizer.param_groups", "must be a list of parameter groups")
    for index, group in enumerate(groups):
        field = f"optimizer.param_groups[{index}]"
        _require(isinstance(group, dict), field, f"must be a JSON object, got {type(group).__name__}")
        params = group.get("params")
        _require(isinstance(params, list) and all(_is_int(p) for p in params), field,
                 "must list its parameters' indices under 'params'")  # fmt: skip
    _require(isinstance(state, dict), "optimizer.state", f"must be a JSON object, got {type(state).__name__}")
    for index, values in state.items():
        _require(index.isdigit(), f"optimizer.state.{index}", "must be keyed by a parameter's index")
        _require(isinstance(values, dict), f"optimizer.state.{index}", "must be a JSON object")


def _check_metadata(file: Path, metadata: dict) -> None:
    """Refuse metadata that breaks the checkpoint schema: a CorruptFileError naming the field.

    The checksum only proves the metadata is what was written; this proves it is something llmbook
    can build from (so an edited-and-rehashed file never reaches a constructor with a bad field).
    """
    try:
        _check_keys(metadata, "metadata", _METADATA_KEYS, required=_METADATA_KEYS)
        _require(_is_int(metadata["step"]) and metadata["step"] >= 0, "step", "must be an integer >= 0")
        _require(isinstance(metadata["tensor_sha256"], str), "tensor_sha256", "must be a hex string")
        if metadata["data_sha256"] is not None:
            _check_str_map(metadata["data_sha256"], "data_sha256")
        _check_str_map(metadata["aliases"], "aliases")
        _check_config(metadata["config"])
        _check_history(metadata["history"])
        _check_optimizer(metadata["optimizer"])
    except _Refusal as refusal:
        raise CorruptFileError(
            f"{file}: its metadata field {refusal.field} {refusal}; the file was edited or damaged, and a "
            f"checksum recomputed after an edit proves nothing — use another copy. {_WHAT_A_CHECKPOINT_IS}"
        ) from None
    model = metadata["config"]["model"]
    if model is not None:
        config = ModelConfig(**model)
        check_fits_in_memory(
            model_bytes(config), torch.device("cpu"),
            f"the model {file} describes (vocab_size={config.vocab_size}, context_length="
            f"{config.context_length}, d_model={config.d_model}, n_layers={config.n_layers})",
            "checkpoint",
        )  # fmt: skip


def _read_tensors(file: Path, metadata: dict) -> dict[str, dict[str, Tensor]]:
    """The file's tensors by group ("model", "optimizer", "rng"), on the CPU, checked against the checksum."""
    tensors: dict[str, Tensor] = {}
    try:
        with safe_open(file, framework="pt", device="cpu") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except SafetensorError as err:
        raise _not_a_checkpoint(file, str(err)) from None
    actual = tensor_checksum(tensors)
    if actual != metadata.get("tensor_sha256"):
        raise CorruptFileError(
            f"{file}: the tensor data does not match the checkpoint's checksum (tensor_sha256 recorded "
            f"{str(metadata.get('tensor_sha256'))[:12]}…, the data gives {actual[:12]}…); the file is "
            "damaged — use another copy"
        )
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "optimizer": {}, "rng": {}}
    for key, tensor in tensors.items():
        group, name = key.split(".", 1)
        if group not in groups:
            raise CorruptFileError(f"{file}: unexpected tensor {key!r}; {_WHAT_A_CHECKPOINT_IS}")
        groups[group][name] = tensor
    return groups


def check_model_matches(file: Path, model: nn.Module, saved: ModelConfig | None) -> None:
    """Refuse to load a checkpoint into a model whose config differs (beyond `RUNTIME_FIELDS`)."""
    config = getattr(unwrap(model), "config", None)
    if saved is None or not isinstance(config, ModelConfig):
        return
    for field in dataclasses.fields(ModelConfig):
        old, new = getattr(saved, field.name), getattr(config, field.name)
        if field.name not in RUNTIME_FIELDS and old != new:
            raise RunMismatchError(
                f"{file} was made with model.{field.name}={old!r}, but the model it is loaded into has "
                f"model.{field.name}={new!r}; build the model from the checkpoint with "
                "llmbook.checkpoint.load_model"
            )


def optimizer_state_from(optimizer_json: dict, tensors: dict[str, Tensor]) -> dict:
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
    groups = _read_tensors(file, metadata)
    if torch.device(device).type != "cpu":
        groups = {group: {k: t.to(device) for k, t in named.items()} for group, named in groups.items()}
    model_state = groups["model"]
    for alias, target in metadata["aliases"].items():
        if target not in model_state:
            raise CorruptFileError(
                f"{file}: its metadata field aliases.{alias} names the tensor {target!r}, which the file "
                f"does not hold; {_WHAT_A_CHECKPOINT_IS}"
            )
        model_state[alias] = model_state[target]
    optimizer_state = None
    if metadata["optimizer"] is not None:
        optimizer_state = optimizer_state_from(metadata["optimizer"], groups["optimizer"])
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
        check_model_matches(file, model, checkpoint.model_config)
        _load_model_state(file, model, model_state)
    if optimizer is not None:
        if optimizer_state is None:
            raise ValueError(f"{file} holds no optimizer state to load")
        optimizer.load_state_dict(optimizer_state)
    return checkpoint


def _load_model_state(file: Path, model: nn.Module, model_state: dict[str, Tensor]) -> None:
    """Load weights strictly; tensors that do not fit the model are a CorruptFileError naming the file."""
    try:
        unwrap(model).load_state_dict(model_state, strict=True)
    except RuntimeError as err:
        problem = str(err).replace("\n", " ").replace("\t", "")
        raise CorruptFileError(
            f"{file}: its tensors do not fit the model its config describes ({problem[:300]})"
        ) from None


def refuse_to_replace(file: Path) -> None:
    """Raise an OverwriteError if `file` holds a checkpoint (another run's, to a run not resuming it)."""
    if not file.exists():
        return
    try:
        held = f" (step {read_checkpoint_metadata(file)['step']})"
    except (ValueError, OSError):
        held = ""
    raise OverwriteError(
        f"{file} holds another run's checkpoint{held}, which resume=False would replace; pass --overwrite "
        "(TrainConfig.overwrite=True) to replace it, or choose another checkpoint_dir"
    )


def check_same_data(file: Path, metadata: dict, data_sha256: dict[str, str], train_data: str) -> None:
    """Raise a RunMismatchError if the checkpoint's run trained on another token file than `train_data`."""
    saved, current = (metadata.get("data_sha256") or {}).get("train"), data_sha256.get("train")
    if saved is not None and saved != current:
        raise RunMismatchError(
            f"{file} was trained on a train_data file with sha256 {saved[:12]}…, but {train_data} has "
            f"sha256 {str(current)[:12]}…; resuming would continue the run on other data (use another "
            "checkpoint_dir, or the original token file)"
        )


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> TransformerLM:
    """Build a TransformerLM from a checkpoint's model config and load its weights (in eval mode)."""
    checkpoint = load_checkpoint(path, device=device)
    if checkpoint.model_config is None:
        raise ValueError(f"{checkpoint.path} does not record a model config")
    model = TransformerLM(checkpoint.model_config).to(device)
    _load_model_state(checkpoint.path, model, checkpoint.model_state)
    return model.eval()


def _lock_holder(fd: int) -> str:
    """Who holds a checkpoint folder's lock, as its lock file says ("pid N: command"), or ""."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f" (pid {int(holder['pid'])}: {str(holder['command'])[:200]})"
    except (ValueError, KeyError, TypeError, OSError):
        return ""


def _lock_owner_pid(fd: int) -> int | None:
    try:
        return int(json.loads(os.pread(fd, 4096, 0).decode("utf-8"))["pid"])
    except (ValueError, KeyError, TypeError, OSError):
        return None


@contextlib.contextmanager
def hold_checkpoint_dir(directory: str | os.PathLike) -> Iterator[None]:
    """Hold `directory` (created if needed) for one training run; a second run is refused at once with a
    RunLockedError naming the holder.

    The lock is the OS's (flock on DIR/.lock), so it dies with the process: a killed run leaves nothing
    stuck. Processes that `llmbook.launch` starts while it holds the folder share its hold (the launcher's
    pid is in their environment as LOCK_OWNER_ENV and in the lock file).
    """
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / LOCK_FILE
    fd, held_here = _lock(lock_path)
    try:
        owner = os.environ.get(LOCK_OWNER_ENV)
        # Held by someone else: refused, unless it is the launcher that started this process.
        if not held_here and (owner is None or str(_lock_owner_pid(fd)) != owner):
            raise RunLockedError(
                f"{directory} is in use by another training run{_lock_holder(fd)}; two runs writing "
                "one checkpoint folder would destroy one of them. Wait for it to end, or pass "
                "another --checkpoint-dir"
            )
        if held_here:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)}).encode(), 0)
        try:
            yield
        finally:
            if held_here:  # remove it while still held, so no run can lock the file being removed
                lock_path.unlink(missing_ok=True)
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
        if created and held_here and not any(directory.iterdir()):
            with contextlib.suppress(OSError):  # something appeared meanwhile: leave it
                directory.rmdir()  # a run that failed before writing anything leaves no empty folder


def _lock(lock_path: Path) -> tuple[int, bool]:
    """Open the lock file and try to lock it: (descriptor, locked by us). A file that a finishing run
    removed between our open and our lock is not the folder's lock any more, so we open the new one."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return fd, False
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd, True
        except FileNotFoundError:
            pass
        os.close(fd)  # closing releases the lock on the removed file

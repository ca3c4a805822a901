"""LoRA written out: low-rank adapters beside a model's frozen linear layers (Hu et al., 2021).

A linear layer y = x Wᵀ (+ b) gets two small matrices, A (rank, in) and B (out, rank), and becomes

    y = x Wᵀ (+ b) + (x Aᵀ Bᵀ) · alpha / rank

with W frozen and only A and B trained: a rank-``rank`` update of W, with ``rank·(in + out)`` numbers
instead of ``in·out``. B starts at zero, so the adapted model starts as the model itself; A starts as
`peft` starts it (Kaiming-uniform with a = √5, nn.Linear's own init), so both libraries give the same
numbers from the same seed. `merge` folds the update into W (no extra work at inference), `unmerge`
takes it out again. `save_adapters` / `load_adapters` write and read only A and B, as one checksummed
safetensors file (the checkpoint module's conventions), refused when it does not fit the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from llmbook.checkpoint import metadata_checksum, tensor_checksum
from llmbook.data import atomic_write
from llmbook.errors import CorruptFileError, RunMismatchError
from llmbook.model import Adapter, TransformerLM

__all__ = [
    "LLAMA_TARGETS",
    "LoRALinear",
    "add_lora",
    "lora_layers",
    "merge",
    "unmerge",
    "adapter_state",
    "save_adapters",
    "load_adapters",
]

ADAPTER_FORMAT = "llmbook-lora-1"
# Every projection of a Llama-style block: attention's q, k, v, o and SwiGLU's gate, up, down.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear, Adapter):
    """nn.Linear plus a low-rank update: x (..., in) -> x Wᵀ + b + (x Aᵀ Bᵀ)·alpha/rank (..., out).

    Made from an existing nn.Linear in place (`add_lora`), so ``weight`` and ``bias`` keep their names
    and tensors; ``lora_A`` (rank, in) and ``lora_B`` (out, rank) are the adapter.
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def init_adapter(self, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        """Add A (Kaiming-uniform, a=√5, as peft) and B (zeros) of ``rank``; the scale is alpha / rank."""
        self.rank, self.alpha, self.scale, self.merged = rank, alpha, alpha / rank, False
        weight = self.weight
        self.lora_A = nn.Parameter(
            torch.empty(rank, self.in_features, device=weight.device, dtype=weight.dtype)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, rank, device=weight.device, dtype=weight.dtype)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """A and B."""
        return [self.lora_A, self.lora_B]

    def delta_weight(self) -> Float[Tensor, "out in"]:
        """The update the adapter adds to W: B @ A · alpha / rank."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: Float[Tensor, "... in"]) -> Float[Tensor, "... out"]:
        """The frozen layer, plus the low-rank path unless it is merged into W."""
        result = super().forward(x)
        if self.merged:
            return result
        # The same order of operations as peft (B(A(x)), then the scale), so the numbers agree.
        return result + nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    # peft's rule for a list of names: the module's own name (the last dotted part) is one of them.
    return name.rsplit(".", 1)[-1] in targets


def add_lora(
    model: TransformerLM,
    rank: int,
    alpha: float,
    targets: tuple[str, ...] = LLAMA_TARGETS,
    generator: torch.Generator | None = None,
) -> TransformerLM:
    """Give every linear layer of ``model``'s blocks named in ``targets`` a LoRA adapter, in place, and
    freeze everything else; returns the model. A and B are drawn in model order from ``generator``."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be a non-empty tuple of layer names such as {LLAMA_TARGETS}")
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters; add_lora adds them once")
    chosen = [
        (name, module)
        for name, module in model.blocks.named_modules()
        if type(module) is nn.Linear and _matches(name, tuple(targets))
    ]
    found = {name.rsplit(".", 1)[-1] for name, _ in chosen}
    if missing := [target for target in targets if target not in found]:
        linears = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(f"no linear layer in the blocks is named {missing}; the blocks have {linears}")
    model.requires_grad_(False)
    for _, module in chosen:
        module.__class__ = LoRALinear  # the same module, parameters and all, with the adapter's forward
        module.init_adapter(rank, alpha, generator)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers of ``model`` by name (``blocks.0.attn.q_proj``...), in model order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Fold every adapter into its weight: W <- W + B A · alpha/rank; the forward then skips the adapter."""
    for name, layer in lora_layers(model).items():
        if layer.merged:
            raise ValueError(f"{name} is already merged")
        layer.weight += layer.delta_weight()
        layer.merged = True


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Undo `merge`: W <- W - B A · alpha/rank (the same W up to float rounding)."""
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            raise ValueError(f"{name} is not merged")
        layer.weight -= layer.delta_weight()
        layer.merged = False


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """Every adapter tensor by name (``blocks.0.attn.q_proj.lora_A``...), detached, on the CPU."""
    return {
        f"{name}.{part}": getattr(layer, part).detach().contiguous().cpu()
        for name, layer in lora_layers(model).items()
        for part in ("lora_A", "lora_B")
    }


def _adapter_settings(model: nn.Module) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters (add them with add_lora)")
    settings = {(layer.rank, layer.alpha) for layer in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"the adapters differ in (rank, alpha): {sorted(settings)}")
    ((rank, alpha),) = settings
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    return {"rank": rank, "alpha": alpha, "targets": targets}


def save_adapters(path: str | os.PathLike, model: TransformerLM) -> Path:
    """Atomically write ``model``'s adapters (A and B only, unmerged) to one safetensors file with their
    rank, alpha, target layers, the model's config and sha256 checksums in its metadata; returns the path."""
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError("the adapters are merged into the weights; unmerge(model) before saving them")
    file = Path(path)
    tensors = adapter_state(model)
    metadata = {
        "format": ADAPTER_FORMAT,
        **_adapter_settings(model),
        "model": dataclasses.asdict(model.config),
        "tensor_sha256": tensor_checksum(tensors),
    }
    metadata["metadata_sha256"] = metadata_checksum(metadata)
    atomic_write(file, lambda tmp: save_file(tensors, tmp, metadata={"llmbook": json.dumps(metadata)}))
    return file


def _read_adapter_file(file: Path) -> tuple[dict, dict[str, Tensor]]:
    if not file.is_file():
        raise FileNotFoundError(f"no adapter file at {file}")
    what = "an adapter file is the safetensors file llmbook.lora.save_adapters writes"
    try:
        with safe_open(file, framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as err:
        raise CorruptFileError(f"{file} is not a readable adapter file ({err}); {what}") from None
    try:
        metadata = json.loads(header["llmbook"])
    except (KeyError, json.JSONDecodeError):
        raise CorruptFileError(f"{file} has no llmbook metadata; {what}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != ADAPTER_FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise CorruptFileError(f"{file} has format {found!r}, expected {ADAPTER_FORMAT!r}; {what}")
    if metadata.get("metadata_sha256") != metadata_checksum(metadata):
        raise CorruptFileError(f"{file}: its metadata does not match its checksum; the file is damaged")
    if tensor_checksum(tensors) != metadata.get("tensor_sha256"):
        raise CorruptFileError(
            f"{file}: the adapter tensors do not match their checksum; the file is damaged"
        )
    return metadata, tensors


def load_adapters(
    path: str | os.PathLike, model: TransformerLM, generator: torch.Generator | None = None
) -> TransformerLM:
    """Read adapters written by `save_adapters` into ``model`` (adding them with the file's rank, alpha and
    targets if it has none); `CorruptFileError` for a damaged file, `RunMismatchError` if it does not fit."""
    file = Path(path)
    metadata, tensors = _read_adapter_file(file)
    saved_model = metadata.get("model")
    if saved_model != dataclasses.asdict(model.config):
        differ = sorted(
            k
            for k in dataclasses.asdict(model.config)
            if (saved_model or {}).get(k) != getattr(model.config, k)
        )
        raise RunMismatchError(f"{file} holds adapters for another model: its config differs in {differ}")
    if not lora_layers(model):
        add_lora(model, metadata["rank"], metadata["alpha"], tuple(metadata["targets"]), generator)
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError(
            "the model's adapters are merged into its weights; unmerge(model) before loading others"
        )
    wanted = {key: tuple(value.shape) for key, value in adapter_state(model).items()}
    ours = _adapter_settings(model)
    problems = [
        f"{key}: the file has {metadata.get(key)}, the model {ours[key]}"
        for key in ("rank", "alpha", "targets")
        if metadata.get(key) != ours[key]
    ]
    if missing := sorted(set(wanted) - set(tensors)):
        problems.append(f"missing adapter tensors: {missing}")
    if unexpected := sorted(set(tensors) - set(wanted)):
        problems.append(f"unexpected adapter tensors: {unexpected}")
    problems += [
        f"{key}: shape {tuple(tensors[key].shape)} in the file, {shape} in the model"
        for key, shape in wanted.items()
        if key in tensors and tuple(tensors[key].shape) != shape
    ]
    if problems:
        raise RunMismatchError(f"{file} does not fit the model's adapters:\n  " + "\n  ".join(problems))
    layers = lora_layers(model)
    with torch.no_grad():
        for key, value in tensors.items():
            name, part = key.rsplit(".", 1)
            getattr(layers[name], part).copy_(value)
    return model

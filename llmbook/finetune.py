"""Fine-tuning runs: LoRA supervised fine-tuning on a checkable skill, then GRPO from its reward, both
resumable like `llmbook.train.train`.

The API (stable; the chapter and the command line use only this):

    SFTConfig(task="add3", steps=..., batch_size=..., lr=..., rank=..., alpha=..., ...)   validated
    RLConfig(task="add3", steps=..., prompts_per_step=..., group_size=..., lr=..., kl_coef=..., ...)
    run_sft(config, out, model=None, tokenizer=None, template=None, callback=None) -> FinetuneResult
    run_rl(config, out, start, model=None, tokenizer=None, template=None, callback=None, reward=None)
        -> FinetuneResult
    exact_reward(task) -> reward(problem, reply, finished) -> float       RL's default reward
    load_smollm2() -> (model, tokenizer, template)          the base model the runs train by default
    load_finetuned(path, model=None) -> model               base model + the adapters of a run or file
    adapter_file(path) -> Path                              a finished run folder's adapter file
    read_run(out) -> RunState                               a run folder's step, config and history

`run_sft` adds LoRA adapters to the model (SmolLM2-135M-Instruct unless one is given) and trains only
them on ``steps`` batches of the task's train split, rendered by the chat template with the loss on the
assistant's tokens only (`llmbook.sft`), with the book's AdamW (`llmbook.optim`) and the model's own loss
(``model(inputs, targets)``). `run_rl` loads the adapters a run (or an adapter file) ended with and
continues them by GRPO (`llmbook.grpo.grpo_step`): ``group_size`` sampled answers per train prompt,
reward 1 for an exact answer and 0 otherwise (`llmbook.tasks.Task.is_exact`), KL measured (and, with
``kl_coef > 0``, penalised) against the model the run started from.

The GRPO variant (`RLConfig`'s defaults): advantages are reward minus the group's mean, not divided by
its standard deviation (Dr. GRPO, Liu et al., 2025: with a 0/1 reward, the division makes a group with
one right answer in six push as hard as one with three, and weighs questions by how unsure the model is);
the loss is averaged per sequence, then over sequences (GRPO's); two optimizer updates per rollout, so
that the second sees a policy that moved and the clip acts (with one, the ratio is 1 and it never does).
These follow the papers; this module does not measure the alternatives.

A run folder ``out`` holds ``run.safetensors`` (the adapters, optimizer moments, sampling RNG state,
step, config and history: one checksummed file written atomically every ``save_every`` steps and at the
end) and, once finished, ``adapters.safetensors`` (`llmbook.lora.save_adapters`, what ``chat --adapter``
and ``run_rl(start=...)`` read). The folder is held with `llmbook.checkpoint.hold_checkpoint_dir` while a
run writes it. Calling a run again with the same folder resumes it from its last checkpoint (bit-equal
to a run that was never interrupted), returns at once when it is finished, and is refused with a
`RunMismatchError` when the folder was made with another config, stage, base model or starting adapters.
A run that fails keeps its last good checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

# The checkpoint module's own (de)serialisation of an optimizer's state, so both kinds of run store it alike.
from llmbook.checkpoint import (
    hold_checkpoint_dir,
    metadata_checksum,
    optimizer_state_from,
    optimizer_tensors,
    tensor_checksum,
)
from llmbook.data import atomic_write
from llmbook.errors import (
    ConfigTypeError,
    ConfigValueError,
    CorruptFileError,
    OverwriteError,
    RunMismatchError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_str,
)
from llmbook.grpo import NORMALISATIONS, grpo_step
from llmbook.lora import LLAMA_TARGETS, adapter_state, add_lora, load_adapters, lora_layers, save_adapters
from llmbook.model import TransformerLM
from llmbook.optim import AdamW, clip_grad_norm, cosine_schedule, param_groups
from llmbook.sft import pad_batch, tokenize_conversation
from llmbook.tasks import TASKS, Problem, Task, problems, prompt_text, sft_conversation
from llmbook.tokenizer import Tokenizer
from llmbook.train_config import NonFiniteLossError

__all__ = [
    "SFTConfig",
    "RLConfig",
    "FinetuneResult",
    "RunState",
    "run_sft",
    "run_rl",
    "load_smollm2",
    "load_finetuned",
    "read_run",
    "adapter_file",
    "exact_reward",
    "RUN_FILE",
    "ADAPTER_FILE",
]

RUN_FILE = "run.safetensors"  # the resumable state of a run
ADAPTER_FILE = "adapters.safetensors"  # the adapters a finished run ends with
RUN_FORMAT = "llmbook-finetune-1"
END_TOKEN = "<|im_end|>"  # SmolLM2's end of turn: the token that ends a reply
# Config fields that do not change what a run computes: a resumed run may differ from its folder in them.
RUNTIME_FIELDS = ("save_every",)


def _check_targets(owner: str, targets: Any) -> tuple[str, ...]:
    if isinstance(targets, str) or not isinstance(targets, list | tuple) or not targets:
        raise ConfigTypeError(
            f"{owner}.targets must be a non-empty tuple of layer names such as {LLAMA_TARGETS}, "
            f"got {targets!r}",
            "targets",
        )
    unknown = [name for name in targets if name not in LLAMA_TARGETS]
    if unknown:
        raise ConfigValueError(
            f"{owner}.targets: unknown layer names {unknown}; choose from {LLAMA_TARGETS}", "targets"
        )
    return tuple(targets)


class _FinetuneConfig:
    """What SFTConfig and RLConfig share: the checks of their common fields, and the JSON round trip."""

    def _check_common(self, owner: str) -> None:
        check_choice(owner, "task", self.task, tuple(TASKS))
        check_int(owner, "steps", self.steps)
        check_float(owner, "lr", self.lr, above=0.0)
        check_float(owner, "weight_decay", self.weight_decay, minimum=0.0)
        check_str(owner, "system_prompt", self.system_prompt, optional=True)
        check_int(owner, "seed", self.seed, minimum=0)
        check_int(owner, "save_every", self.save_every)

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict):
        """A config from `to_dict`'s output (unknown fields are refused by the constructor)."""
        return cls(**values)


@dataclass(frozen=True)
class SFTConfig(_FinetuneConfig):
    """LoRA supervised fine-tuning: which skill, the adapters, and the optimizer's schedule."""

    task: str = "add3"
    steps: int = 24
    batch_size: int = 8
    lr: float = 3e-3  # peak learning rate, after ``warmup_steps``, cosine down to ``min_lr``
    min_lr: float = 3e-4
    warmup_steps: int = 3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LLAMA_TARGETS
    system_prompt: str | None = None  # None: the chat template's default system prompt
    seed: int = 0  # which train problems, and the adapters' initial A
    save_every: int = 4

    def __post_init__(self) -> None:
        owner = "SFTConfig"
        self._check_common(owner)
        check_int(owner, "batch_size", self.batch_size)
        check_float(owner, "min_lr", self.min_lr, minimum=0.0)
        if self.min_lr > self.lr:
            raise ConfigValueError(f"{owner}.min_lr ({self.min_lr}) must be <= lr ({self.lr})", "min_lr")
        check_int(owner, "warmup_steps", self.warmup_steps, minimum=0, maximum=self.steps)
        check_float(owner, "grad_clip", self.grad_clip, above=0.0, optional=True)
        check_int(owner, "rank", self.rank)
        check_float(owner, "alpha", self.alpha, above=0.0)
        object.__setattr__(self, "targets", _check_targets(owner, self.targets))


@dataclass(frozen=True)
class RLConfig(_FinetuneConfig):
    """GRPO after SFT: prompts per step, answers per prompt, the policy loss's variant and the optimizer."""

    task: str = "add3"
    steps: int = 4
    prompts_per_step: int = 4
    group_size: int = 6  # answers sampled per prompt (GRPO's k)
    max_new_tokens: int = 8
    temperature: float = 0.7
    # Constant. Adam's first steps move every adapter weight by about lr whatever the gradient's size, and
    # a few 0/1 rewards are a noisy direction: lr=1e-3 took SmolLM2's policy far from its start in one step.
    lr: float = 1e-4
    weight_decay: float = 0.0
    kl_coef: float = 0.0  # the KL to the starting model is logged always, penalised when > 0
    clip_epsilon: float = 0.2
    scale_by_std: bool = False  # Dr. GRPO: advantages are reward - group mean, not divided by the std
    normalisation: str = "sequence"
    updates_per_rollout: int = 2  # > 1 so that the clip acts on the later updates
    system_prompt: str | None = None
    seed: int = 0  # which train prompts, and the sampling generator
    save_every: int = 2

    def __post_init__(self) -> None:
        owner = "RLConfig"
        self._check_common(owner)
        check_int(owner, "prompts_per_step", self.prompts_per_step)
        check_int(owner, "group_size", self.group_size, minimum=2)
        check_int(owner, "max_new_tokens", self.max_new_tokens)
        check_float(owner, "temperature", self.temperature, above=0.0)
        check_float(owner, "kl_coef", self.kl_coef, minimum=0.0)
        check_float(owner, "clip_epsilon", self.clip_epsilon, above=0.0, below=1.0)
        check_bool(owner, "scale_by_std", self.scale_by_std)
        check_choice(owner, "normalisation", self.normalisation, tuple(NORMALISATIONS))
        check_int(owner, "updates_per_rollout", self.updates_per_rollout)


@dataclass
class RunState:
    """What a run folder's checkpoint says: stage ("sft" or "rl"), steps done, config, history (one list
    per logged quantity, one entry per step), the base model's config and, for RL, the starting adapters'
    checksum."""

    stage: str
    step: int
    config: dict
    history: dict[str, list[float]]
    model: dict
    start_sha256: str | None

    @property
    def finished(self) -> bool:
        """True when every configured step is done."""
        return self.step >= self.config["steps"]


@dataclass
class FinetuneResult:
    """A run's outcome: the model with its trained adapters (eval mode), the history of every step (of
    this call and the calls it resumed), the adapter file, and how many steps this call ran."""

    model: TransformerLM
    history: dict[str, list[float]]
    adapter_file: Path
    steps_run: int
    wall_seconds: float = field(default=0.0)


# ----------------------------------------------------------------------------------------------------
# The base model, and a model with a run's adapters


def load_smollm2() -> tuple[TransformerLM, Tokenizer, str]:
    """SmolLM2-135M-Instruct from its GGUF file: (model in eval mode, tokenizer, chat template)."""
    from llmbook.gguf import load_model, load_tokenizer, read_gguf, smollm2_path

    file = read_gguf(smollm2_path())
    return load_model(file.path).eval(), load_tokenizer(file), file.metadata["tokenizer.chat_template"]


def adapter_file(path: str | os.PathLike) -> Path:
    """The adapter file of a finished run folder, or ``path`` itself when it is a file."""
    path = Path(path)
    if path.is_dir():
        file = path / ADAPTER_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"{path} has no {ADAPTER_FILE}: the run in it has not finished (run it again to resume it)"
            )
        return file
    if not path.exists():
        raise FileNotFoundError(f"no run folder or adapter file at {path}")
    return path


def load_finetuned(path: str | os.PathLike, model: TransformerLM | None = None) -> TransformerLM:
    """``model`` (default: SmolLM2) with the adapters of a finished run folder or adapter file, in eval
    mode; `RunMismatchError` when they do not fit the model."""
    model = load_smollm2()[0] if model is None else model
    return load_adapters(adapter_file(path), model).eval()


# ----------------------------------------------------------------------------------------------------
# The run file: adapters + optimizer + RNG + step + config + history, one checksummed safetensors file


def _save_run(
    file: Path, stage: str, step: int, config: SFTConfig | RLConfig, model: TransformerLM,
    optimizer: torch.optim.Optimizer, history: dict, generator: torch.Generator, start_sha256: str | None,
) -> None:  # fmt: skip
    """Atomically write the run's state (the previous file stays whole until the new one is complete)."""
    tensors = {f"adapter.{name}": value for name, value in adapter_state(model).items()}
    optimizer_json = optimizer_tensors(optimizer, tensors)
    tensors["rng.sampling"] = generator.get_state()
    metadata = {
        "format": RUN_FORMAT, "stage": stage, "step": step, "config": config.to_dict(),
        "model": dataclasses.asdict(model.config), "start_sha256": start_sha256, "history": history,
        "optimizer": optimizer_json, "tensor_sha256": tensor_checksum(tensors),
    }  # fmt: skip
    metadata["metadata_sha256"] = metadata_checksum(metadata)
    atomic_write(file, lambda tmp: save_file(tensors, tmp, metadata={"llmbook": json.dumps(metadata)}))


def _read_run_file(file: Path) -> tuple[dict, dict[str, Tensor]]:
    what = f"a run file is the {RUN_FILE} that llmbook.finetune writes"
    try:
        with safe_open(file, framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = json.loads(header["llmbook"])
    except (SafetensorError, KeyError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{file} is not a readable run file ({err}); {what}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != RUN_FORMAT:
        raise CorruptFileError(f"{file} is not a fine-tuning run file; {what}")
    if metadata.get("metadata_sha256") != metadata_checksum(metadata):
        raise CorruptFileError(f"{file}: its metadata does not match its checksum; the file is damaged")
    if tensor_checksum(tensors) != metadata.get("tensor_sha256"):
        raise CorruptFileError(f"{file}: its tensors do not match their checksum; the file is damaged")
    return metadata, tensors


def read_run(out: str | os.PathLike) -> RunState:
    """The state of the run in folder ``out`` (FileNotFoundError when it has none)."""
    file = Path(out) / RUN_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{out} holds no fine-tuning run ({RUN_FILE} is missing)")
    metadata, _ = _read_run_file(file)
    return RunState(
        stage=metadata["stage"], step=metadata["step"], config=metadata["config"],
        history=metadata["history"], model=metadata["model"], start_sha256=metadata["start_sha256"],
    )  # fmt: skip


def _check_same_run(
    file: Path, metadata: dict, stage: str, config: SFTConfig | RLConfig, model: TransformerLM,
    start_sha256: str | None,
) -> None:  # fmt: skip
    """Refuse to resume a run folder made by another stage, config, base model or start."""
    where = f"{file.parent} holds a {metadata['stage']} run"
    if metadata["stage"] != stage:
        raise RunMismatchError(f"{where}, not a {stage} run; use another --out folder")
    saved, ours = metadata["config"], config.to_dict()
    differ = sorted(
        k for k in set(saved) | set(ours) if k not in RUNTIME_FIELDS and saved.get(k) != ours.get(k)
    )
    if differ:
        changes = ", ".join(f"{k}: {saved.get(k)!r} there, {ours.get(k)!r} here" for k in differ)
        raise RunMismatchError(f"{where} made with another config ({changes}); use another --out folder")
    if metadata["model"] != dataclasses.asdict(model.config):
        raise RunMismatchError(f"{where} of another base model; use another --out folder")
    if metadata["start_sha256"] != start_sha256:
        raise RunMismatchError(f"{where} that started from other adapters; use another --out folder")


def _resume(
    file: Path, stage: str, config, model: TransformerLM, optimizer, generator, start_sha256: str | None
) -> tuple[int, dict]:
    """Load the run's state if the folder has one: (step, history); (0, {}) for a new run."""
    if not file.exists():
        if (file.parent / ADAPTER_FILE).exists():
            raise OverwriteError(
                f"{file.parent} holds {ADAPTER_FILE} but no {RUN_FILE}: it is not a run this code can "
                "resume, and starting over would replace its adapters; use another --out folder"
            )
        return 0, {}
    metadata, tensors = _read_run_file(file)
    _check_same_run(file, metadata, stage, config, model, start_sha256)
    layers = lora_layers(model)
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("adapter."):
                name, part = key.removeprefix("adapter.").rsplit(".", 1)
                getattr(layers[name], part).copy_(value)
    moments = {
        key.removeprefix("optimizer."): value
        for key, value in tensors.items()
        if key.startswith("optimizer.")
    }
    optimizer.load_state_dict(optimizer_state_from(metadata["optimizer"], moments))
    generator.set_state(tensors["rng.sampling"])
    return metadata["step"], metadata["history"]


# ----------------------------------------------------------------------------------------------------
# The loops


def _record(history: dict[str, list[float]], step: int, values: dict[str, float]) -> dict:
    record = {"step": step, **values}
    for key, value in record.items():
        history.setdefault(key, []).append(value)
    return record


def _check_finite(value: float, stage: str, step: int, file: Path, saved_step: int) -> None:
    if not math.isfinite(value):
        last = f"the last good checkpoint is {file} (step {saved_step})" if saved_step else "nothing saved"
        raise NonFiniteLossError(f"{stage} step {step}: the loss is {value}; {last}. Try a lower lr.")


def _base(model, tokenizer, template) -> tuple[TransformerLM, Tokenizer, str]:
    if model is None or tokenizer is None or template is None:
        if not (model is None and tokenizer is None and template is None):
            raise ValueError("pass model, tokenizer and template together, or none of them (SmolLM2)")
        return load_smollm2()
    if lora_layers(model):
        raise ValueError("the model already has adapters; pass the base model (a run adds its own)")
    return model, tokenizer, template


def _sft_batch(config: SFTConfig, task: Task, tokenizer, template, train: list, step: int):
    chunk = train[step * config.batch_size : (step + 1) * config.batch_size]
    examples = [
        tokenize_conversation(tokenizer, template, sft_conversation(problem, config.system_prompt), END_TOKEN)
        for problem in chunk
    ]
    return pad_batch(examples, pad_id=tokenizer.special_tokens[END_TOKEN])  # padded targets are ignored


def run_sft(
    config: SFTConfig,
    out: str | os.PathLike,
    model: TransformerLM | None = None,
    tokenizer: Tokenizer | None = None,
    template: str | None = None,
    callback: Callable[[dict], None] | None = None,
) -> FinetuneResult:
    """LoRA SFT of ``model`` (default SmolLM2; adapters are added to it in place) on the task's train split,
    resumable in folder ``out``; ``callback(record)`` sees each step's record (step, loss, lr, seconds)."""
    if not isinstance(config, SFTConfig):
        raise TypeError(f"config must be an SFTConfig, got {type(config).__name__}")
    model, tokenizer, template = _base(model, tokenizer, template)
    task = TASKS[config.task]
    add_lora(model, config.rank, config.alpha, config.targets, torch.Generator().manual_seed(config.seed))
    optimizer = AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)  # unused by SFT; saved so every run file has one
    out = Path(out)
    file = out / RUN_FILE
    started = time.perf_counter()
    with hold_checkpoint_dir(out):
        step, history = _resume(file, "sft", config, model, optimizer, generator, None)
        start_step = saved_step = step
        train = problems(task, "train", config.steps * config.batch_size, seed=config.seed)
        model.train()
        while step < config.steps:
            tick = time.perf_counter()
            # step + 1: the first step learns (at lr / warmup_steps), and the last one is at min_lr.
            lr = cosine_schedule(step + 1, config.lr, config.min_lr, config.warmup_steps, config.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, targets = _sft_batch(config, task, tokenizer, template, train, step)
            loss = model(inputs, targets)
            _check_finite(loss.item(), "sft", step + 1, file, saved_step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                clip_grad_norm([p for p in model.parameters() if p.requires_grad], config.grad_clip)
            optimizer.step()
            step += 1
            record = _record(
                history, step, {"loss": loss.item(), "lr": lr, "seconds": time.perf_counter() - tick}
            )
            if step % config.save_every == 0 or step == config.steps:
                _save_run(file, "sft", step, config, model, optimizer, history, generator, None)
                saved_step = step
            if callback is not None:
                callback(record)
        adapters = _finish(out, model)
    return FinetuneResult(model.eval(), history, adapters, step - start_step, time.perf_counter() - started)


def _finish(out: Path, model: TransformerLM) -> Path:
    """Write the finished run's adapter file (again, if it is there: the same adapters)."""
    return save_adapters(out / ADAPTER_FILE, model)


Reward = Callable[[Problem, str, bool], float]  # (problem, reply text, ended with its end token) -> reward


def exact_reward(task: Task) -> Reward:
    """The default RL reward: 1.0 when a reply that ended (with its end token) is exactly the answer
    (`Task.is_exact`), else 0.0; a reply cut off by ``max_new_tokens`` is not an answer."""

    def reward(problem: Problem, reply: str, finished: bool) -> float:
        return float(finished and task.is_exact(reply, problem))

    return reward


def _completion_reward(reward: Reward, tokenizer: Tokenizer, prompt_problems: list[Problem], end_id: int):
    """`grpo_step`'s reward(prompt_index, completion_ids) from a reward on the decoded reply."""

    def score(prompt_index: int, completion: list[int]) -> float:
        finished = bool(completion) and completion[-1] == end_id
        reply = tokenizer.decode(completion[:-1] if finished else completion)
        return reward(prompt_problems[prompt_index], reply, finished)

    return score


def _adapter_sha256(file: Path) -> str:
    with safe_open(file, framework="pt", device="cpu") as handle:
        return tensor_checksum({key: handle.get_tensor(key) for key in handle.keys()})


def run_rl(
    config: RLConfig,
    out: str | os.PathLike,
    start: str | os.PathLike,
    model: TransformerLM | None = None,
    tokenizer: Tokenizer | None = None,
    template: str | None = None,
    callback: Callable[[dict], None] | None = None,
    reward: Reward | None = None,
) -> FinetuneResult:
    """GRPO on the adapters of ``start`` (a finished SFT run folder or an adapter file) loaded onto
    ``model`` (default SmolLM2), resumable in folder ``out``; ``callback(record)`` sees each step's record
    (step, reward, completion_length, kl, clipped_fraction, loss, policy_loss, seconds). ``reward``
    defaults to `exact_reward` of the task; another one is not recorded in the run folder, so resume a run
    with the reward it started with."""
    if not isinstance(config, RLConfig):
        raise TypeError(f"config must be an RLConfig, got {type(config).__name__}")
    out = Path(out)
    start_file = adapter_file(start)
    if start_file.resolve() == (out / ADAPTER_FILE).resolve():
        raise ValueError(f"--from and --out are the same run ({out}); RL writes a new run folder")
    model, tokenizer, template = _base(model, tokenizer, template)
    load_adapters(start_file, model)
    start_sha256 = _adapter_sha256(start_file)
    reference = copy.deepcopy(model).eval().requires_grad_(False)  # the start, for the KL
    task = TASKS[config.task]
    reward = exact_reward(task) if reward is None else reward
    optimizer = AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    end_id = tokenizer.special_tokens[END_TOKEN]
    file = out / RUN_FILE
    started = time.perf_counter()
    with hold_checkpoint_dir(out):
        step, history = _resume(file, "rl", config, model, optimizer, generator, start_sha256)
        start_step = saved_step = step
        # Another seed than SFT's default draws: RL prompts are train problems SFT has (mostly) not seen.
        prompts = problems(task, "train", config.steps * config.prompts_per_step, seed=config.seed + 1)
        while step < config.steps:
            tick = time.perf_counter()
            chunk = prompts[step * config.prompts_per_step : (step + 1) * config.prompts_per_step]
            prompt_ids = [tokenizer.encode(prompt_text(template, p, config.system_prompt)) for p in chunk]
            model.train()
            score = _completion_reward(reward, tokenizer, chunk, end_id)
            stats = grpo_step(
                model, optimizer, prompt_ids, score, config.group_size, config.max_new_tokens,
                reference=reference, kl_coef=config.kl_coef, epsilon=config.clip_epsilon,
                scale_by_std=config.scale_by_std, normalisation=config.normalisation,
                updates_per_rollout=config.updates_per_rollout, generator=generator,
                temperature=config.temperature, stop_ids=[end_id], pad_id=end_id,
            )  # fmt: skip
            _check_finite(stats["loss"], "rl", step + 1, file, saved_step)
            step += 1
            record = _record(history, step, {**stats, "seconds": time.perf_counter() - tick})
            if step % config.save_every == 0 or step == config.steps:
                _save_run(file, "rl", step, config, model, optimizer, history, generator, start_sha256)
                saved_step = step
            if callback is not None:
                callback(record)
        adapters = _finish(out, model)
    return FinetuneResult(model.eval(), history, adapters, step - start_step, time.perf_counter() - started)

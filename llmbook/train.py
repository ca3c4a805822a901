"""The training loop: `train(config)` runs (or resumes) the run a `TrainConfig` describes.

The loop, as `_train` reads: hold the checkpoint folder for the run's life (a second run on it is
refused, `llmbook.checkpoint.hold_checkpoint_dir`), build the run (`_start`: model, optimizer,
generators), continue from a checkpoint when there is one (`_resume`), then alternate
evaluating-and-logging (`_evaluate_and_log`, every `eval_interval` steps) with optimizer steps
(`_train_step`), and save a checkpoint at the end.

Evaluation (`llmbook.evaluation.evaluate`) uses fixed random batches, the same at every evaluation.

Determinism. The batch offsets come from one `torch.Generator` seeded by `TrainConfig.seed`; its state
goes into every checkpoint, so training N steps straight and training N/2 steps, saving, loading and
training N/2 more give bit-identical losses on the same machine. Under torchrun each process takes its
slice of every global batch (`llmbook.distributed`).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from llmbook.checkpoint import (
    CHECKPOINT_FILE,
    LOCK_FILE,
    check_same_data,
    hold_checkpoint_dir,
    load_checkpoint,
    read_checkpoint_metadata,
    refuse_to_replace,
    save_checkpoint,
)
from llmbook.data import atomic_write, sha256_of
from llmbook.distributed import Distributed, setup_distributed
from llmbook.errors import ConfigValueError, RunMismatchError, check_fits_in_memory
from llmbook.evaluation import evaluate
from llmbook.loss import bits_per_byte
from llmbook.model import TransformerLM
from llmbook.optim import AdamW, MuonAdamW, clip_grad_norm, grad_norm, muon_param_groups, param_groups
from llmbook.tokens import batch_starts, load_tokens, token_file_metadata, windows
from llmbook.train_config import (
    DivergedError,
    History,
    NonFiniteLossError,
    TrainConfig,
    check_resume_compatible,
    oversized_field,
    training_bytes,
)

Callback = Callable[[int, nn.Module, History], "bool | None"]

# A loss this many times the uniform guess's (ln vocab_size) means the run has blown up even without a NaN;
# so do weights beyond WEIGHT_LIMIT in absolute value (initial weights are ~0.02, trained ones rarely > 10).
DIVERGED_LOSS_FACTOR = 3.0
WEIGHT_LIMIT = 1e4


# ----------------------------------------------------------------------------------------------------
# One run: its state, and the steps of the loop


@dataclass
class _Run:
    """Everything the loop carries from one step to the next."""

    config: TrainConfig
    distributed: Distributed
    model: TransformerLM
    training_model: nn.Module  # the model, possibly wrapped by DDP and/or torch.compile
    optimizer: torch.optim.Optimizer  # AdamW, or MuonAdamW with optimizer="muon"
    data_generator: torch.Generator
    train_tokens: np.ndarray
    val_tokens: np.ndarray | None
    bytes_per_token: dict[str, float | None]
    amp_dtype: torch.dtype
    checkpoint_file: Path | None
    history: History
    data_sha256: dict[str, str]
    saved_step: int | None = None  # the step of the last checkpoint this run wrote or resumed from
    step: int = 0
    start_step: int = 0
    last_eval_time: float = 0.0
    last_eval_step: int = 0
    progress: tqdm | None = None

    @property
    def local_rows(self) -> slice:
        """This process's rows of every global batch."""
        local = self.config.batch_size // self.distributed.world_size
        return slice(self.distributed.rank * local, (self.distributed.rank + 1) * local)


def _bytes_per_token(config: TrainConfig, path: str | None) -> float | None:
    if path is None:
        return None
    if config.bytes_per_token is not None:
        return config.bytes_per_token
    metadata = token_file_metadata(path)
    if metadata.get("n_bytes") and metadata.get("n_tokens"):
        return metadata["n_bytes"] / metadata["n_tokens"]
    return None


def _load_data(config: TrainConfig) -> tuple[np.ndarray, np.ndarray | None, dict[str, float | None]]:
    """The train and validation token files (checked against the vocabulary) and their bytes per token."""
    train_tokens = load_tokens(config.train_data, config.allow_missing_sidecar)
    val_tokens = load_tokens(config.val_data, config.allow_missing_sidecar) if config.val_data else None
    vocab_limit = max(int(train_tokens.max()), int(val_tokens.max()) if val_tokens is not None else 0)
    if vocab_limit >= config.model.vocab_size:
        raise ConfigValueError(
            f"the token files hold id {vocab_limit}, but model.vocab_size={config.model.vocab_size}; "
            f"the model needs a vocabulary of at least {vocab_limit + 1} (the tokenizer's size)",
            "model.vocab_size",
        )
    ratios = {"train": _bytes_per_token(config, config.train_data)}
    ratios["val"] = _bytes_per_token(config, config.val_data)
    return train_tokens, val_tokens, ratios


def _start(config: TrainConfig, distributed: Distributed) -> _Run:
    """A fresh run: the same initial weights on every process, the data generator, the optimizer."""
    if config.batch_size % distributed.world_size:
        raise ValueError(
            f"batch_size={config.batch_size} must be divisible by the {distributed.world_size} processes"
        )
    _check_memory(config, distributed)
    train_tokens, val_tokens, ratios = _load_data(config)
    torch.manual_seed(config.seed)  # the same initial weights on every process
    model = TransformerLM(config.model).to(distributed.device)  # built on the CPU: the same on any device
    optimizer = _make_optimizer(config, model, distributed.world_size)
    data_generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed + 1 + distributed.rank)  # dropout masks: different on each process
    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    return _Run(
        config=config, distributed=distributed, model=model, training_model=model, optimizer=optimizer,
        data_generator=data_generator, train_tokens=train_tokens, val_tokens=val_tokens,
        bytes_per_token=ratios, amp_dtype=torch.bfloat16 if config.dtype == "bfloat16" else torch.float32,
        checkpoint_file=checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir else None, history=History(),
        data_sha256={"train": sha256_of(Path(config.train_data))} if checkpoint_dir else {},
    )  # fmt: skip


def _check_memory(config: TrainConfig, distributed: Distributed) -> None:
    """Refuse, before allocating anything, a model or batch that cannot fit in this device's memory."""
    model = config.model
    check_fits_in_memory(
        training_bytes(config, distributed.world_size), distributed.device,
        f"a training step with batch_size={config.batch_size} of a model with vocab_size={model.vocab_size}, "
        f"context_length={model.context_length}, d_model={model.d_model}, n_layers={model.n_layers}, "
        f"d_ff={model.ffn_dim}",
        oversized_field(config),
    )  # fmt: skip


def _make_optimizer(config: TrainConfig, model: nn.Module, world_size: int) -> torch.optim.Optimizer:
    """AdamW for every parameter, or Muon for the blocks' matrices and AdamW for the rest (with several
    processes, each orthogonalises its share of the matrices: the same numbers, less work each)."""
    if config.optimizer == "adamw":
        groups = param_groups(model, config.weight_decay)
        return AdamW(groups, lr=config.max_lr, betas=config.betas, eps=config.eps)
    muon_lr = config.max_lr if config.muon_lr is None else config.muon_lr
    groups = muon_param_groups(model, config.weight_decay, lr_scale=muon_lr / config.max_lr)
    return MuonAdamW(
        groups,
        lr=config.max_lr,
        betas=config.betas,
        eps=config.eps,
        momentum=config.muon_momentum,
        split_across_processes=world_size > 1,
    )


def _resume(run: _Run) -> None:
    """Continue from the run's checkpoint, if it has one: weights, optimizer, step, history, RNG states."""
    file, rank, device = run.checkpoint_file, run.distributed.rank, run.distributed.device
    if not run.config.resume:
        if file is not None and not run.config.overwrite:
            refuse_to_replace(file)
        return
    if file is None or not file.exists():
        return
    metadata = read_checkpoint_metadata(file)
    if metadata["config"].get("train") is None:
        raise RunMismatchError(f"{file} was not written by train(); it records no TrainConfig")
    check_resume_compatible(metadata["config"]["train"], run.config)
    check_same_data(file, metadata, run.data_sha256, run.config.train_data)
    checkpoint = load_checkpoint(file, run.model, run.optimizer, device="cpu")
    run.step, run.history = checkpoint.step, checkpoint.history or History()
    run.saved_step = checkpoint.step
    run.data_generator.set_state(checkpoint.rng_states["data"])
    if f"torch.rank{rank}" in checkpoint.rng_states:
        torch.set_rng_state(checkpoint.rng_states[f"torch.rank{rank}"])
    if device.type == "cuda" and f"cuda.rank{rank}" in checkpoint.rng_states:
        torch.cuda.set_rng_state(checkpoint.rng_states[f"cuda.rank{rank}"], device)


def _copy_tokenizer(spec: str | None, checkpoint_dir: Path) -> None:
    """Keep a tokenizer directory beside the checkpoint so `llmbook sample` needs nothing else."""
    if spec and Path(spec).is_dir():
        shutil.copytree(spec, checkpoint_dir / "tokenizer", dirs_exist_ok=True)


def _prepare_to_train(run: _Run) -> None:
    """Checkpoint folder, DDP / torch.compile wrappers, progress bar: set up once the step is known."""
    config, distributed = run.config, run.distributed
    if run.checkpoint_file is not None and distributed.is_main:
        run.checkpoint_file.parent.mkdir(parents=True, exist_ok=True)
        _copy_tokenizer(config.tokenizer, run.checkpoint_file.parent)
    run.start_step = run.last_eval_step = run.step
    if distributed.world_size > 1:
        device = distributed.device
        run.training_model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if config.compile:
        run.training_model = torch.compile(run.training_model)
    run.training_model.train()
    run.progress = tqdm(
        total=config.steps, initial=run.step, disable=not (config.progress and distributed.is_main),
        desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
    )  # fmt: skip
    run.last_eval_time = time.perf_counter()


# -- checkpoints within the loop, and what is left when the run fails --


def _last_good(run: _Run) -> str:
    """Where the last good state of this run is, for an error message."""
    if run.checkpoint_file is None:
        return "no checkpoint_dir was set, so nothing was saved"
    if run.saved_step is None:
        folder = run.checkpoint_file.parent
        return f"nothing saved, and no checkpoint of this run exists yet in {folder}"
    return f"nothing saved; the last good checkpoint is {run.checkpoint_file} (step {run.saved_step})"


def _check_weights(run: _Run) -> None:
    """Refuse to checkpoint weights that have blown up (finite or not): they would pass for a good state."""
    largest = max(float(p.detach().abs().max()) for p in run.model.parameters())
    if not largest <= WEIGHT_LIMIT:
        raise DivergedError(
            f"the weights have diverged at step {run.step} (largest |weight| {largest:.3g} > "
            f"{WEIGHT_LIMIT:g}); "
            f"{_last_good(run)}. Try a lower max_lr or a grad_clip."
        )


def _rng_now(run: _Run) -> tuple[Tensor, Tensor, Tensor | None]:
    device = run.distributed.device
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return run.data_generator.get_state(), torch.get_rng_state(), cuda_state


def _save(run: _Run, at_step: int, rng: tuple[Tensor, Tensor, Tensor | None]) -> None:
    """Write the checkpoint (every process takes part in gathering the RNG states; rank 0 writes)."""
    if run.checkpoint_file is None:
        return
    _check_weights(run)
    data_state, torch_state, cuda_state = rng
    states = {"data": data_state}
    for r, state in enumerate(run.distributed.gather(torch_state)):
        states[f"torch.rank{r}"] = state
    if cuda_state is not None:
        for r, state in enumerate(run.distributed.gather(cuda_state)):
            states[f"cuda.rank{r}"] = state
    if run.distributed.is_main:
        save_checkpoint(
            run.checkpoint_file, run.model, run.optimizer, at_step, run.config, states, run.history,
            data_sha256=run.data_sha256,
        )  # fmt: skip
    run.saved_step = at_step
    if run.distributed.world_size > 1:
        dist.barrier()


# -- evaluate and log --


def _evaluation_due(run: _Run) -> bool:
    already_evaluated = bool(run.history.eval_step) and run.history.eval_step[-1] == run.step
    return (
        run.step % run.config.eval_interval == 0 or run.step >= run.config.steps
    ) and not already_evaluated


def _record_evaluation(run: _Run, losses: dict[str, float | None]) -> None:
    """Append one evaluation (losses, bits per byte, throughput since the last one) to the history."""
    history, config = run.history, run.config
    elapsed = time.perf_counter() - run.last_eval_time
    tokens_seen = (run.step - run.last_eval_step) * config.batch_size * config.model.context_length
    history.eval_step.append(run.step)
    history.train_loss.append(losses["train"])
    history.val_loss.append(losses["val"])
    for split in ("train", "val"):
        ratio, loss = run.bytes_per_token[split], losses[split]
        getattr(history, f"{split}_bpb").append(
            bits_per_byte(loss, 1, ratio) if ratio and loss is not None else None
        )
    history.tokens_per_second.append(tokens_seen / elapsed if tokens_seen and elapsed > 0 else None)


def _log_evaluation(run: _Run, losses: dict[str, float | None]) -> None:
    history = run.history
    val = f", val {losses['val']:.4f}" if losses["val"] is not None else ""
    bpb = history.val_bpb[-1] if history.val_bpb[-1] is not None else history.train_bpb[-1]
    # No bits per byte when the token files record no byte count.
    split = "val " if history.val_bpb[-1] is not None else "train "
    bpb_text = f" ({split}{bpb:.3f} bits/byte)" if bpb is not None else ""
    run.progress.write(f"step {run.step}: train {losses['train']:.4f}{val} nats/token" + bpb_text)


def _evaluate_and_log(run: _Run, callback: Callback | None) -> bool:
    """Evaluate on both splits, record and print the result, call the callback; True asks to stop."""
    config, distributed = run.config, run.distributed
    losses: dict[str, float | None] = {}
    for split, tokens in (("train", run.train_tokens), ("val", run.val_tokens)):
        losses[split] = None if tokens is None else evaluate(
            run.model, tokens, config.batch_size, config.model.context_length, config.eval_batches,
            config.seed + 1, distributed.device, run.amp_dtype, distributed.rank, distributed.world_size,
        )  # fmt: skip
    _record_evaluation(run, losses)
    if not math.isfinite(losses["train"]):
        raise NonFiniteLossError(
            f"evaluation loss is {losses['train']} at step {run.step}; {_last_good(run)}"
        )
    if distributed.is_main and config.progress:
        _log_evaluation(run, losses)
    stop = bool(callback(run.step, run.model, run.history)) if callback is not None else False
    run.last_eval_time, run.last_eval_step = time.perf_counter(), run.step
    return stop


# -- one optimizer step --


def _train_step(run: _Run) -> None:
    """One optimizer step on the next batch; a checkpoint due at this step is written before it."""
    config, step = run.config, run.step
    lr = config.lr_at(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's matrices may run at another peak lr
    rng_before = _rng_now(run)  # a checkpoint at this step must replay this step's batch
    starts = batch_starts(
        len(run.train_tokens), config.batch_size, config.model.context_length, run.data_generator
    )
    x, y = windows(
        run.train_tokens, starts[run.local_rows], config.model.context_length, run.distributed.device
    )
    with torch.autocast(
        run.distributed.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype != torch.float32
    ):
        loss = run.training_model(x, y)
    loss_value = run.distributed.mean(loss.detach()).item()
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(
            f"training loss is {loss_value} at step {step} (lr {lr:.3g}); {_last_good(run)}. "
            "Try a lower max_lr or a grad_clip."
        )
    if loss_value > DIVERGED_LOSS_FACTOR * math.log(config.model.vocab_size):
        raise DivergedError(
            f"training loss is {loss_value:.4g} at step {step} (lr {lr:.3g}), more than "
            f"{DIVERGED_LOSS_FACTOR:g}× a uniform guess's {math.log(config.model.vocab_size):.3f}: the run "
            f"has diverged; {_last_good(run)}. Try a lower max_lr or a grad_clip."
        )
    # Only now, with a finite loss in hand for these weights, is this state worth a checkpoint.
    if (
        step != run.start_step
        and config.checkpoint_interval is not None
        and step % config.checkpoint_interval == 0
    ):
        _save(run, step, rng_before)
    loss.backward()
    params = run.model.parameters()
    norm = clip_grad_norm(params, config.grad_clip) if config.grad_clip is not None else grad_norm(params)
    norm_value = norm.item()
    if not math.isfinite(norm_value):
        raise NonFiniteLossError(f"gradient norm is {norm_value} at step {step}; {_last_good(run)}")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    for name, value in (("step", step), ("loss", loss_value), ("lr", lr), ("grad_norm", norm_value)):
        getattr(run.history, name).append(value)
    run.step += 1
    run.progress.update(1)
    run.progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)


# ----------------------------------------------------------------------------------------------------
# The loop


def train(config: TrainConfig, callback: Callback | None = None) -> History:
    """Train (or resume) the run `config` describes and return its History.

    `callback(step, model, history)` runs after every evaluation; returning True stops the run early
    (after saving a checkpoint). Under torchrun every process calls `train` and all get the same History.
    """
    distributed = setup_distributed(config.device)
    try:
        # Model initialisation and dropout draw from torch's global generator; seed it for this run and
        # give the caller's generator state back afterwards.
        devices = [distributed.device] if distributed.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return _train(config, callback, distributed)
    finally:
        if distributed.initialized_here:
            dist.destroy_process_group()


def _train(config: TrainConfig, callback: Callback | None, distributed: Distributed) -> History:
    # One run per checkpoint folder, held by the process that writes it (rank 0) for the run's life.
    holding = config.checkpoint_dir is not None and distributed.is_main
    with hold_checkpoint_dir(config.checkpoint_dir) if holding else contextlib.nullcontext():
        return _train_holding_folder(config, callback, distributed)


def _train_holding_folder(
    config: TrainConfig, callback: Callback | None, distributed: Distributed
) -> History:
    run = _start(config, distributed)
    _resume(run)
    _prepare_to_train(run)
    try:
        while True:
            stop = _evaluate_and_log(run, callback) if _evaluation_due(run) else False
            if run.step >= config.steps or stop:
                if run.step != run.start_step or stop:
                    _save(run, run.step, _rng_now(run))
                return run.history
            _train_step(run)
    finally:
        run.progress.close()  # also when a NonFiniteLossError leaves the loop


# ----------------------------------------------------------------------------------------------------
# Reusing another chapter's finished run


def finished_run(
    config: TrainConfig, reuse: str | os.PathLike, run: Callable[[TrainConfig], History] = train
) -> Path:
    """The folder of a finished run of `config`: its checkpoint_dir when that holds one; else a verified copy
    of the finished run of the same config in `reuse` when no run is writing there; else `run(config)`.

    "The same config" is what shapes the trajectory (`check_resume_compatible`) and the same number of
    steps; file paths may differ. A checkpoint_dir that already holds another checkpoint (unfinished, or
    another run's) is never replaced by the copy: `run` resumes it or refuses it.
    """
    if config.checkpoint_dir is None:
        raise ConfigValueError(
            "finished_run needs config.checkpoint_dir: the folder the run lives in", "checkpoint_dir"
        )
    own, reuse = Path(config.checkpoint_dir), Path(reuse)
    if _holds_finished(own, config):
        return own
    if not (own / CHECKPOINT_FILE).exists() and _holds_finished(reuse, config):
        with hold_checkpoint_dir(own):  # no run of ours may start writing here while we copy
            _copy_run(reuse, own)
        if _holds_finished(own, config):  # the copy is checked against its checksums before it is trusted
            return own
    run(config)
    return own


def _holds_finished(directory: Path, config: TrainConfig) -> bool:
    """Whether `directory` holds, with no run writing there, an intact checkpoint of `config`'s last step."""
    if _is_held(directory):
        return False
    try:
        metadata = read_checkpoint_metadata(directory)
        check_resume_compatible(metadata["config"]["train"], config)
        load_checkpoint(directory)  # verifies every tensor against the checksum in the metadata
    except (FileNotFoundError, KeyError, ValueError):  # no checkpoint, a damaged one, or another run's
        return False
    return metadata["step"] == config.steps


def _is_held(directory: Path) -> bool:
    """Whether a training run holds `directory` now (its lock is taken), so its checkpoint may change."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the shared lock, when we got it
    return False


def _copy_run(source: Path, target: Path) -> None:
    """Copy a run's checkpoint and tokenizer folder from `source` into `target`."""
    atomic_write(target / CHECKPOINT_FILE, lambda tmp: shutil.copyfile(source / CHECKPOINT_FILE, tmp))
    if (source / "tokenizer").is_dir():
        shutil.copytree(source / "tokenizer", target / "tokenizer", dirs_exist_ok=True)

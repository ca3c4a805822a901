"""One quality run: split Tiny Shakespeare, learn its tokenizer, train a preset, evaluate it exactly.

The pieces of `python -m llmbook.bench quality` (the command line is `llmbook.bench.quality`, the
one-change-at-a-time runs `llmbook.bench.quality_sweep`). The split is `llmbook.tokens.split_text`:
the last 10% of the file (by bytes; the file is ASCII) is validation, the tokenizer never sees it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmbook.bench import device_description
from llmbook.bpe import train_bpe
from llmbook.checkpoint import load_model
from llmbook.data import cache_dir, load_text
from llmbook.evaluation import evaluate, evaluate_exact
from llmbook.launch import train_processes
from llmbook.loss import bits_per_byte
from llmbook.model import ModelConfig, count_parameters, flops_per_token
from llmbook.tokenizer import Tokenizer
from llmbook.tokens import load_tokens, prepare_tokens, split_text
from llmbook.train import train
from llmbook.train_config import History, TrainConfig

VAL_FRACTION = 0.1  # the last 10% of the text (the file is ASCII: characters are bytes)


def shakespeare_split() -> tuple[str, str]:
    """Tiny Shakespeare as (train text, validation text): the book's split, before any tokenizing."""
    return split_text(load_text("tinyshakespeare"), VAL_FRACTION)


@dataclasses.dataclass
class ShakespeareData:
    """Tiny Shakespeare tokenized with a BPE tokenizer learned on its training split."""

    tokenizer: Tokenizer
    train_path: Path
    val_path: Path
    train_bytes: int
    val_bytes: int
    n_train_tokens: int
    n_val_tokens: int

    @property
    def val_bytes_per_token(self) -> float:
        return self.val_bytes / self.n_val_tokens


def prepare_shakespeare(
    vocab_size: int, directory: Path | None = None, rebuild: bool = False
) -> ShakespeareData:
    """Train (or reuse) the BPE tokenizer and the train/val token files under `directory`."""
    directory = Path(directory) if directory is not None else cache_dir() / f"shakespeare-bpe{vocab_size}"
    train_text, val_text = shakespeare_split()
    tokenizer_dir = directory / "tokenizer"
    train_path, val_path = directory / "train.bin", directory / "val.bin"
    if rebuild or not (tokenizer_dir.is_dir() and train_path.is_file() and val_path.is_file()):
        vocab, merges = train_bpe(train_text, vocab_size)  # the validation text stays unseen
        tokenizer = Tokenizer(vocab, merges)
        tokenizer.save(tokenizer_dir)
        prepare_tokens(train_text, tokenizer, train_path)
        prepare_tokens(val_text, tokenizer, val_path)
    tokenizer = Tokenizer.load(tokenizer_dir)
    return ShakespeareData(
        tokenizer=tokenizer,
        train_path=train_path,
        val_path=val_path,
        train_bytes=len(train_text.encode("utf-8")),
        val_bytes=len(val_text.encode("utf-8")),
        n_train_tokens=len(load_tokens(train_path)),
        n_val_tokens=len(load_tokens(val_path)),
    )


def validation_bits_per_byte(
    model: nn.Module, data: ShakespeareData, context_length: int
) -> dict[str, float]:
    """Exact validation loss in nats/token and bits/byte (the formula in the module docstring)."""
    nats, _ = evaluate_exact(model, load_tokens(data.val_path), context_length)
    return {
        "val_nats_per_token": nats,
        "val_bits_per_byte": bits_per_byte(nats, data.n_val_tokens, data.val_bytes),
    }


def make_train_config(
    preset: dict[str, Any],
    data: ShakespeareData,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    device: str = "auto",
) -> TrainConfig:
    """The TrainConfig a preset describes, pointed at `data`'s token files."""
    model = ModelConfig(vocab_size=data.tokenizer.vocab_size, **preset["model"])
    return TrainConfig(
        model=model, train_data=str(data.train_path), val_data=str(data.val_path),
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, progress=progress, device=device,
        **preset["train"],
    )  # fmt: skip


CALIBRATION_STEPS, CALIBRATION_INTERVAL = 30, 10


def calibrate_steps(preset: dict[str, Any], data: ShakespeareData, seconds: float) -> dict[str, float]:
    """How many steps of `preset` fit in `seconds` of training here, evaluations included.

    Trains a throw-away copy for `CALIBRATION_STEPS` steps, evaluating every `CALIBRATION_INTERVAL`, and
    reads the seconds per step from the History's throughput over the last two intervals (the first
    steps are slower while memory is allocated), less one evaluation each, timed again on the model the
    loop hands to the callback. Then n steps take n·step + (n / eval_interval + 1)·evaluation.
    """
    timing: dict[str, float] = {}

    def time_evaluation(step: int, model: nn.Module, history: History) -> None:
        if step == CALIBRATION_STEPS:
            start = time.perf_counter()
            for path in (data.train_path, data.val_path):
                evaluate(model, load_tokens(path), config.batch_size, config.model.context_length,
                         config.eval_batches, config.seed + 1, "cpu")  # fmt: skip
            timing["eval_seconds"] = time.perf_counter() - start

    trial = variant(preset, steps=CALIBRATION_STEPS, eval_interval=CALIBRATION_INTERVAL, warmup_steps=5)
    config = make_train_config(trial, data, progress=False, device="cpu")
    history = train(config, callback=time_evaluation)
    tokens = CALIBRATION_INTERVAL * config.batch_size * config.model.context_length
    intervals = [tokens / rate for rate in history.tokens_per_second[-2:]]  # steps + one evaluation each
    step_seconds = (sum(intervals) / len(intervals) - timing["eval_seconds"]) / CALIBRATION_INTERVAL
    per_step = step_seconds + timing["eval_seconds"] / preset["train"]["eval_interval"]
    steps = int((seconds - timing["eval_seconds"]) / per_step)
    if steps <= preset["train"]["warmup_steps"]:
        raise ValueError(f"{seconds} s is only {steps} steps here, not more than the preset's warm-up")
    return {"steps": steps, "step_seconds": step_seconds, **timing}


def train_flops_per_step(preset: dict[str, Any]) -> int:
    """The training FLOPs of one step of `preset` (forward and backward: 3 × forward, per token)."""
    model = ModelConfig(vocab_size=preset["vocab_size"], **preset["model"])
    return 3 * flops_per_token(model) * preset["train"]["batch_size"] * model.context_length


def steps_for_flops(preset: dict[str, Any], flops: float) -> int:
    """How many steps of `preset` cost `flops` training FLOPs (rounded): equal compute, whatever the load."""
    return round(flops / train_flops_per_step(preset))


def variant(base: dict[str, Any], vocab_size: int | None = None, **changes: Any) -> dict[str, Any]:
    """A copy of preset `base` with some ModelConfig and/or TrainConfig fields changed."""
    preset = {
        "vocab_size": vocab_size or base["vocab_size"],
        "model": dict(base["model"]),
        "train": dict(base["train"]),
    }
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for name, value in changes.items():
        if name in model_fields:
            preset["model"][name] = value
        elif name in {f.name for f in dataclasses.fields(TrainConfig)}:
            preset["train"][name] = value
        else:
            raise ValueError(f"{name!r} is neither a ModelConfig nor a TrainConfig field")
    return preset


def run_preset(
    preset: dict[str, Any],
    progress: bool = True,
    device: str = "auto",
    seconds: float | None = None,
    processes: int = 1,
) -> dict[str, Any]:
    """Prepare the data, train the preset from scratch, evaluate exactly; returns a JSON-ready summary.

    `seconds` replaces the preset's step count by as many steps as `calibrate_steps` finds fit in that
    much training time (equal wall-clock comparisons); `processes` > 1 trains on that many CPU processes
    (`llmbook.launch.train_processes`).
    """
    data = prepare_shakespeare(preset["vocab_size"])
    calibration = None
    if seconds is not None:
        calibration = calibrate_steps(preset, data, seconds)
        preset = variant(preset, steps=calibration["steps"])
    # A fresh folder per run: never a resume, and parallel runs cannot share a checkpoint.
    run_dir = Path(tempfile.mkdtemp(prefix="bench-quality-run-", dir=cache_dir()))
    config = make_train_config(preset, data, checkpoint_dir=run_dir, progress=progress, device=device)
    start = time.perf_counter()
    history = train(config) if processes == 1 else train_processes(config, processes)
    train_seconds = time.perf_counter() - start
    model = load_model(run_dir, device=device if device != "auto" else "cpu")
    evaluation = validation_bits_per_byte(model, data, config.model.context_length)
    shutil.rmtree(run_dir, ignore_errors=True)
    tokens_seen = config.steps * config.batch_size * config.model.context_length
    return {
        "preset": jsonable(preset),
        "budget_seconds": seconds,
        "calibration": calibration,
        "processes": processes,
        "n_parameters": count_parameters(model),
        "n_parameters_non_embedding": count_parameters(model, exclude_embeddings=True),
        "train_flops": 3 * flops_per_token(config.model) * tokens_seen,
        "steps": config.steps,
        "tokens_seen": tokens_seen,
        "epochs": tokens_seen / data.n_train_tokens,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens_seen / train_seconds,
        "val_bytes": data.val_bytes,
        "val_tokens": data.n_val_tokens,
        "val_bytes_per_token": data.val_bytes_per_token,
        **evaluation,
        "history": _history_summary(history, data),
    }


def _history_summary(history: History, data: ShakespeareData) -> dict[str, list]:
    # Per-step losses thinned to every 10th step keep the JSON small; evaluations are kept whole.
    return {
        "step": history.step[::10],
        "loss": [round(v, 5) for v in history.loss[::10]],
        "lr": history.lr[::10],
        "eval_step": history.eval_step,
        "train_loss": history.train_loss,
        "val_loss": history.val_loss,
        "train_bpb": history.train_bpb,
        "val_bpb": history.val_bpb,
    }


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), so presets compare with stored ones."""
    return json.loads(json.dumps(value))


def environment(threads: int, device: str) -> dict[str, Any]:
    """When and where a quality run ran: the header of its results JSON."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_description(device),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        # Other work slows a run: the wall times are the machine's only when this is well under its cores.
        "load_average_1min": os.getloadavg()[0],
    }


def print_summary(name: str, summary: dict[str, Any]) -> None:
    """One run in one line: steps, tokens, wall time, exact validation loss."""
    print(
        f"{name}: {summary['steps']} steps, {summary['tokens_seen']:,} tokens seen "
        f"({summary['epochs']:.1f} epochs), wall {summary['train_seconds']:.1f} s "
        f"({summary['tokens_per_second']:,.0f} tokens/s), "
        f"val {summary['val_nats_per_token']:.4f} nats/token = {summary['val_bits_per_byte']:.4f} bits/byte",
        flush=True,
    )

"""The quality benchmark's sweep and ablations: one change at a time from a preset, each run in full.

`python -m llmbook.bench quality --sweep` / `--ablations` (see `llmbook.bench.quality`). Results are
written after every run, so a busy machine can finish a sweep in parts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from llmbook.bench import write_results
from llmbook.bench.quality_run import environment, jsonable, print_summary, run_preset
from llmbook.model import ModelConfig
from llmbook.train_config import TrainConfig


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


def sweep_variants(base: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (what changed, preset): the choices the chapter discusses, each varied alone."""
    lr = base["train"]["max_lr"]
    return {
        "baseline": ("the chapter's CPU configuration", base),
        "batch x 2, half the steps (same tokens)": (
            "batch size",
            variant(base, batch_size=2 * base["train"]["batch_size"], steps=base["train"]["steps"] // 2),
        ),
        "lr / 4": ("learning rate", variant(base, max_lr=lr / 4, min_lr=lr / 40)),
        "lr x 2": ("learning rate", variant(base, max_lr=lr * 2, min_lr=lr / 5)),
        "constant lr (no decay)": ("schedule", variant(base, min_lr=lr)),
        "vocab 256 (bytes)": ("tokenizer vocabulary", variant(base, vocab_size=256)),
        "vocab 2048": ("tokenizer vocabulary", variant(base, vocab_size=2048)),
        "deeper: d_model 96, 8 layers": (
            "width versus depth",
            variant(base, d_model=96, n_layers=8, n_heads=4),
        ),
        "wider: d_model 192, 2 layers": (
            "width versus depth",
            variant(base, d_model=192, n_layers=2, n_heads=4),
        ),
        "context 64": (
            "context length",
            variant(base, context_length=64, batch_size=2 * base["train"]["batch_size"]),
        ),
        "dropout 0.1": ("regularisation", variant(base, dropout=0.1)),
        "vocab 512": ("tokenizer vocabulary", variant(base, vocab_size=512)),
        "context 256": (
            "context length",
            variant(base, context_length=256, batch_size=base["train"]["batch_size"] // 2),
        ),
        "batch x 2 (same steps, twice the tokens)": (
            "batch size",
            variant(base, batch_size=2 * base["train"]["batch_size"]),
        ),
        "no weight decay": ("regularisation", variant(base, weight_decay=0.0)),
    }


def ablation_variants(base: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (what changed, preset) for the architecture ablations of the chapter's table."""
    return {
        "baseline: RoPE, pre-norm, SwiGLU": ("the chapter's CPU configuration", base),
        "no position information": ("positions", variant(base, positions="none")),
        "learned absolute positions": ("positions", variant(base, positions="learned")),
        "post-norm": ("norm position", variant(base, norm_position="post")),
        "GELU MLP (4x width)": ("feed-forward", variant(base, ffn="gelu")),
    }


def run_many(
    variants: dict[str, tuple[str, dict[str, Any]]],
    out: Path,
    threads: int,
    only: list[str] | None = None,
    reuse: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """Run each variant, skipping ones already in `out` (so a busy machine can finish it in parts) and
    copying identical presets already run in the `reuse` files (the sweep and ablations share a baseline)."""
    results: dict[str, Any] = {"environment": environment(threads, "cpu"), "runs": {}}
    if out.is_file():
        results["runs"] = json.loads(out.read_text(encoding="utf-8")).get("runs", {})
    done_elsewhere = [
        run
        for path in reuse
        if path.is_file()
        for run in json.loads(path.read_text("utf-8"))["runs"].values()
    ]
    for name, (what, preset) in variants.items():
        if only and name not in only:
            continue
        if name in results["runs"] and results["runs"][name]["preset"] == jsonable(preset):
            print(f"{name}: done before, skipping")
            continue
        same = [run for run in done_elsewhere if run["preset"] == jsonable(preset)]
        if same:
            print(f"{name}: copied from an identical run in {', '.join(str(p) for p in reuse)}")
            results["runs"][name] = {**same[0], "changed": what}
            write_results(out, results)
            continue
        print(f"--- {name} ({what})", flush=True)
        summary = run_preset(preset, progress=False, device="cpu")
        summary["changed"] = what
        summary["history"] = {k: summary["history"][k] for k in ("eval_step", "val_loss", "val_bpb")}
        results["runs"][name] = summary
        print_summary(name, summary)
        results["environment"] = environment(threads, "cpu")
        write_results(out, results)
    return results

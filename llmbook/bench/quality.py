"""Quality: how far the final chapter's CPU run gets on Tiny Shakespeare, in validation bits per byte.

    python -m llmbook.bench quality               # the chapter's CPU run -> results/quality.json + .png
    python -m llmbook.bench quality --preset cuda # the bigger configuration a GPU reader gets
    python -m llmbook.bench quality --sweep       # one change at a time -> results/quality_sweep.json
    python -m llmbook.bench quality --ablations   # positions / norm / FFN -> results/quality_ablations.json

Everything is the book's own code: `llmbook.bpe.train_bpe` learns the vocabulary on the training
text, `llmbook.train.train` runs the loop (llmbook.optim.AdamW, warm-up + cosine schedule, clipping) on
a `llmbook.model.TransformerLM`. The split is made on the text before tokenizing: the last 10% of the
file (by bytes; the file is ASCII) is validation, the tokenizer never sees it.

The presets and the target are chapter 9's (`llmbook.train_config.PRESETS`, `TARGET_BITS_PER_BYTE`),
the split is `llmbook.tokens.split_text`. The reported number is exact, not sampled:
`llmbook.evaluation.evaluate_exact` runs the model over the whole validation
token stream in consecutive windows of `context_length` tokens, so every validation token after the
first is predicted exactly once, and

    bits per byte = mean nats per token * number of val tokens / (number of val bytes * ln 2).

The stored sweep and ablation results were made with `--steps 200` (a sixth of the chapter's budget) to fit
a shared machine; drop the flag for full-length runs.

Runs train for a fixed number of steps (so the numbers are reproducible on one machine); the wall time
is measured and reported beside them, and depends on how busy the machine is.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmbook.bench import device_description, write_results
from llmbook.bpe import train_bpe
from llmbook.checkpoint import load_model
from llmbook.data import cache_dir, load_text
from llmbook.evaluation import evaluate_exact
from llmbook.loss import bits_per_byte
from llmbook.model import ModelConfig, count_parameters, flops_per_token
from llmbook.tokenizer import Tokenizer
from llmbook.tokens import load_tokens, prepare_tokens, split_text
from llmbook.train import train
from llmbook.train_config import PRESETS, TARGET_BITS_PER_BYTE, History, TrainConfig

VAL_FRACTION = 0.1  # the last 10% of the text (the file is ASCII: characters are bytes)

RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------------------------------
# Data: split the text, learn the tokenizer on the training part, write token files


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
    train_text, val_text = split_text(load_text("tinyshakespeare"), VAL_FRACTION)
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


# ----------------------------------------------------------------------------------------------------
# Exact evaluation


def validation_bits_per_byte(
    model: nn.Module, data: ShakespeareData, context_length: int
) -> dict[str, float]:
    """Exact validation loss in nats/token and bits/byte (the formula in the module docstring)."""
    nats, _ = evaluate_exact(model, load_tokens(data.val_path), context_length)
    return {
        "val_nats_per_token": nats,
        "val_bits_per_byte": bits_per_byte(nats, data.n_val_tokens, data.val_bytes),
    }


# ----------------------------------------------------------------------------------------------------
# One run


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


def run_preset(preset: dict[str, Any], progress: bool = True, device: str = "auto") -> dict[str, Any]:
    """Prepare the data, train the preset from scratch, evaluate exactly; returns a JSON-ready summary."""
    data = prepare_shakespeare(preset["vocab_size"])
    # A fresh folder per run: never a resume, and parallel runs cannot share a checkpoint.
    run_dir = Path(tempfile.mkdtemp(prefix="bench-quality-run-", dir=cache_dir()))
    config = make_train_config(preset, data, checkpoint_dir=run_dir, progress=progress, device=device)
    start = time.perf_counter()
    history = train(config)
    train_seconds = time.perf_counter() - start
    model = load_model(run_dir, device=device if device != "auto" else "cpu")
    evaluation = validation_bits_per_byte(model, data, config.model.context_length)
    shutil.rmtree(run_dir, ignore_errors=True)
    tokens_seen = config.steps * config.batch_size * config.model.context_length
    return {
        "preset": _jsonable(preset),
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


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _environment(threads: int, device: str) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_description(device),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


# ----------------------------------------------------------------------------------------------------
# Sweep and ablations: one change at a time from the CPU preset


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
    results: dict[str, Any] = {"environment": _environment(threads, "cpu"), "runs": {}}
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
        if name in results["runs"] and results["runs"][name]["preset"] == _jsonable(preset):
            print(f"{name}: done before, skipping")
            continue
        same = [run for run in done_elsewhere if run["preset"] == _jsonable(preset)]
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
        _print_summary(name, summary)
        results["environment"] = _environment(threads, "cpu")
        write_results(out, results)
    return results


# ----------------------------------------------------------------------------------------------------
# Reporting


def _print_summary(name: str, summary: dict[str, Any]) -> None:
    print(
        f"{name}: {summary['steps']} steps, {summary['tokens_seen']:,} tokens seen "
        f"({summary['epochs']:.1f} epochs), wall {summary['train_seconds']:.1f} s "
        f"({summary['tokens_per_second']:,.0f} tokens/s), "
        f"val {summary['val_nats_per_token']:.4f} nats/token = {summary['val_bits_per_byte']:.4f} bits/byte",
        flush=True,
    )


def plot_history(summary: dict[str, Any], path: Path) -> None:
    """Train and validation loss (nats/token and bits/byte) against steps, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = summary["history"]
    ratio = summary["val_bytes_per_token"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    axes[0].plot(history["step"], history["loss"], color="0.75", lw=0.8, label="train (one batch)")
    axes[0].plot(history["eval_step"], history["train_loss"], "o-", label="train (eval batches)")
    axes[0].plot(history["eval_step"], history["val_loss"], "o-", label="validation (eval batches)")
    axes[0].set(xlabel="step", ylabel="loss (nats per token)", title="Loss per token")
    axes[1].plot(
        history["eval_step"], history["val_bpb"], "o-", color="C1", label="validation (eval batches)"
    )
    axes[1].axhline(TARGET_BITS_PER_BYTE, color="k", ls="--", lw=1, label=f"target {TARGET_BITS_PER_BYTE}")
    axes[1].plot(
        [summary["steps"]], [summary["val_bits_per_byte"]], "*", ms=14, color="C3", label="validation (exact)"
    )
    axes[1].set(
        xlabel="step", ylabel="bits per byte", title=f"Bits per byte ({ratio:.2f} val bytes per token)"
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmbook.bench quality", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's number of steps")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE",
        help="override preset fields, e.g. --set batch_size=16 max_lr=3e-3 (ModelConfig/TrainConfig names)",
    )  # fmt: skip
    parser.add_argument("--sweep", action="store_true", help="run the one-change-at-a-time sweep instead")
    parser.add_argument("--ablations", action="store_true", help="run the architecture ablations instead")
    parser.add_argument("--only", nargs="*", default=None, help="sweep/ablation: run only these names")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the book assumes 2)")
    parser.add_argument("--out", default=None, help="results JSON (default: llmbook/bench/results/...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.set:
        overrides = {}
        for item in args.set:
            name, _, value = item.partition("=")
            overrides[name] = json.loads(value)
        preset = variant(preset, **overrides)
    if args.steps is not None:
        warmup = min(preset["train"]["warmup_steps"], args.steps)
        preset = variant(preset, steps=args.steps, warmup_steps=warmup)

    if args.sweep or args.ablations:
        kind = "sweep" if args.sweep else "ablations"
        variants = sweep_variants(preset) if args.sweep else ablation_variants(preset)
        out = Path(args.out) if args.out else RESULTS / f"quality_{kind}.json"
        other = out.with_name(out.name.replace(kind, "ablations" if args.sweep else "sweep"))
        results = run_many(variants, out, args.threads, args.only, reuse=(other,))
        print(f"\n{kind}: validation bits per byte (exact), {preset['train']['steps']}-step baseline")
        for name, run in results["runs"].items():
            print(f"  {name:40s} {run['val_bits_per_byte']:.4f}   {run['train_seconds']:7.1f} s")
        print(f"wrote {out}")
        return 0

    device = "cuda" if args.preset == "cuda" and torch.cuda.is_available() else "cpu"
    summary = run_preset(preset, progress=True, device=device)
    _print_summary(f"preset {args.preset}", summary)
    passed = summary["val_bits_per_byte"] <= TARGET_BITS_PER_BYTE
    print(f"val bits/byte <= {TARGET_BITS_PER_BYTE}: {passed}")
    result = {
        "environment": _environment(args.threads, device),
        "target_bits_per_byte": TARGET_BITS_PER_BYTE,
        **summary,
    }
    out = (
        Path(args.out)
        if args.out
        else RESULTS / ("quality.json" if args.preset == "cpu" else f"quality_{args.preset}.json")
    )
    write_results(out, result)
    plot_history(summary, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0

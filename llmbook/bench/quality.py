"""Quality: how far the final chapter's CPU run gets on Tiny Shakespeare, in validation bits per byte.

    python -m llmbook.bench quality               # the chapter's CPU run -> results/quality.json + .png
    python -m llmbook.bench quality --preset cuda # the bigger configuration a GPU reader gets
    python -m llmbook.bench quality --sweep       # one change at a time -> results/quality_sweep.json
    python -m llmbook.bench quality --ablations   # positions / norm / FFN -> results/quality_ablations.json
    python -m llmbook.bench quality --recipe --seconds 75    # the modern recipe, each change alone, at equal
                                                  # wall-clock, two seeds -> results/quality_recipe.json
    python -m llmbook.bench quality --leave-one-out   # the final recipe with its lr and weight-decay
                                                  # changes undone, full length, two seeds, one run at a time
                                                  # -> results/quality_leave_one_out.json

Everything is the book's own code: `llmbook.bpe.train_bpe` learns the vocabulary on the training
text, `llmbook.train.train` runs the loop (Muon and AdamW from `llmbook.optim`, warm-up + cosine
schedule, clipping) on a `llmbook.model.TransformerLM`, on two CPU processes for the cpu preset
(`llmbook.launch.train_processes`; `--processes N` to change). The split is made on the text before
tokenizing: the last 10% of the file (by bytes; the file is ASCII) is validation, the tokenizer never
sees it.

The presets and the target are chapter 8's (`llmbook.train_config.PRESETS`, `TARGET_BITS_PER_BYTE`),
the split is `llmbook.tokens.split_text`. The reported number is exact, not sampled:
`llmbook.evaluation.evaluate_exact` runs the model over the whole validation
token stream in consecutive windows of `context_length` tokens, so every validation token after the
first is predicted exactly once, and

    bits per byte = mean nats per token * number of val tokens / (number of val bytes * ln 2).

Beside the run's number it prints, and stores under "baselines_bits_per_byte", what must be beaten
on the same split (`llmbook.baselines.all_baselines`): gzip, bz2 and lzma at their strongest settings on
the validation text, and add-one unigram and bigram byte models counted on the training text. After
the cpu preset it trains nanoGPT's CPU recipe (`PRESETS["nanogpt-cpu"]`) twice, as nanoGPT runs it (one
process, the machine's threads): for the same wall-clock time (stored under "nanogpt_cpu"; meaningful only
on an otherwise idle machine, which the stored load average shows) and for the same training FLOPs, steps
× FLOPs per step (under "nanogpt_cpu_same_compute"; no load can move it).

The pieces live beside this command line: `llmbook.bench.quality_run` (data, one run, calibrating
steps to a time budget, exact evaluation) and `llmbook.bench.quality_sweep` (one change at a time).

The presets train for a fixed number of steps (so the numbers are reproducible on one machine); the
wall time is measured and reported beside them. `--seconds S` instead gives a run as many steps as
`calibrate_steps` finds fit in S seconds here: that is how `--recipe` compares changes at equal
wall-clock time. The stored sweep and ablations (`--sweep`, `--ablations`, made with `--steps 200` on a
shared machine) and the recipe ablations start from the plain AdamW configuration,
`PRESETS["cpu-adamw"]`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from llmbook.baselines import all_baselines
from llmbook.bench import write_results
from llmbook.bench.quality_run import (
    environment,
    print_summary,
    run_preset,
    shakespeare_split,
    steps_for_flops,
)
from llmbook.bench.quality_sweep import (
    ablation_variants,
    leave_one_out_variants,
    recipe_variants,
    run_leave_one_out,
    run_many,
    run_seeded,
    sweep_variants,
    variant,
)
from llmbook.train_config import BUDGET_SECONDS, PRESETS, PROCESSES, TARGET_BITS_PER_BYTE

RESULTS = Path(__file__).parent / "results"
NANOGPT_ROW = "nanoGPT CPU recipe, same time"
NANOGPT_COMPUTE_ROW = "nanoGPT CPU recipe, same FLOPs"


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


def print_baselines(baselines: dict[str, float], name: str, val_bits_per_byte: float) -> None:
    """The run's validation bits per byte among `llmbook.baselines.all_baselines`, worst first."""
    rows = sorted([*baselines.items(), (name, val_bits_per_byte)], key=lambda row: -row[1])
    print("validation bits per byte, beside the baselines (compressors on the validation text;")
    print("byte models counted on the training text):")
    for row_name, bits in rows:
        print(f"  {row_name:32s} {bits:6.3f}{'   <- this run' if row_name == name else ''}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    parser.add_argument(
        "--recipe", action="store_true",
        help="the modern-recipe ablations: each change alone, at equal wall-clock, over --seeds",
    )  # fmt: skip
    parser.add_argument(
        "--leave-one-out", action="store_true",
        help="the final recipe with each lr/regularisation change undone, full length, over --seeds",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=None, help="train each run for this long instead")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="--recipe: the seeds")
    parser.add_argument("--jobs", type=int, default=2, help="--recipe: runs at a time (one thread each)")
    parser.add_argument("--processes", type=int, default=None, help="train on N CPU processes (torchrun)")
    parser.add_argument(
        "--skip-nanogpt", action="store_true", help="do not train nanoGPT's CPU recipe beside the cpu preset"
    )
    parser.add_argument("--only", nargs="*", default=None, help="sweep/ablation: run only these names")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the book assumes 2)")
    parser.add_argument("--out", default=None, help="results JSON (default: llmbook/bench/results/...)")
    return parser.parse_args(argv)


def _preset_from_args(args: argparse.Namespace, name: str | None = None) -> dict[str, Any]:
    """The chosen preset (or preset `name`) with the --set and --steps overrides applied."""
    preset = PRESETS[name or args.preset]
    if args.set:
        overrides = {}
        for item in args.set:
            name, _, value = item.partition("=")
            overrides[name] = json.loads(value)
        preset = variant(preset, **overrides)
    if args.steps is not None:
        warmup = min(preset["train"]["warmup_steps"], args.steps)
        preset = variant(preset, steps=args.steps, warmup_steps=warmup)
    return preset


def _sweep(args: argparse.Namespace, preset: dict[str, Any]) -> int:
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


def _recipe(args: argparse.Namespace, preset: dict[str, Any]) -> int:
    out = Path(args.out) if args.out else RESULTS / "quality_recipe.json"
    results = run_seeded(recipe_variants(preset), out, args.seconds, tuple(args.seeds), args.jobs, args.only)
    print(f"\nrecipe: validation bits per byte (exact), mean over seeds {args.seeds}, {args.seconds} s each")
    for name, run in results["runs"].items():
        if "val_bits_per_byte" in run:
            steps = [seeded["steps"] for seeded in run["seeds"].values()]
            print(f"  {name:36s} {run['val_bits_per_byte']:.4f} ± {run['spread'] / 2:.4f}   steps {steps}")
    print(f"wrote {out}")
    return 0


def _leave_one_out(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else RESULTS / "quality_leave_one_out.json"
    variants = leave_one_out_variants(PRESETS["cpu"], PRESETS["cpu-adamw"])
    reuse = (RESULTS / "quality.json", RESULTS / "quality_seed1.json")
    processes = args.processes or PROCESSES["cpu"]
    results = run_leave_one_out(variants, out, tuple(args.seeds), processes, args.only, reuse)
    print(f"\nleave-one-out: validation bits per byte (exact), seeds {args.seeds}, {processes} processes")
    for name, run in results["runs"].items():
        if "val_bits_per_byte" in run:
            each = ", ".join(f"{seeded['val_bits_per_byte']:.4f}" for seeded in run["seeds"].values())
            print(f"  {name:32s} {run['val_bits_per_byte']:.4f}  (seeds: {each})")
    print(f"wrote {out}")
    return 0


def _one_run(args: argparse.Namespace, preset: dict[str, Any]) -> int:
    device = "cuda" if args.preset == "cuda" and torch.cuda.is_available() else "cpu"
    processes = args.processes or PROCESSES.get(args.preset, 1)
    if device == "cuda":
        processes = 1
    summary = run_preset(preset, progress=True, device=device, seconds=args.seconds, processes=processes)
    print_summary(f"preset {args.preset} on {processes} process(es)", summary)
    baselines = all_baselines(*shakespeare_split())
    reference = same_compute = None
    if args.preset == "cpu" and not args.skip_nanogpt:
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
            print("warning: OMP_WAIT_POLICY=PASSIVE slows nanoGPT's one-process baseline; unset it")
        # nanoGPT's CPU recipe as published: one process, the machine's threads, the same wall-clock time.
        print(f"\nnanoGPT's CPU recipe, the same {summary['train_seconds']:.0f} s of training:", flush=True)
        reference = run_preset(PRESETS["nanogpt-cpu"], progress=False, device="cpu",
                               seconds=summary["train_seconds"])  # fmt: skip
        print_summary("nanoGPT CPU recipe, same time", reference)
        # ... and for the same training FLOPs (steps x FLOPs per step), a comparison no load can move.
        steps = steps_for_flops(PRESETS["nanogpt-cpu"], summary["train_flops"])
        print(
            f"\nnanoGPT's CPU recipe, the same {summary['train_flops']:.3g} training FLOPs ({steps} steps):"
        )
        same_compute = run_preset(variant(PRESETS["nanogpt-cpu"], steps=steps), progress=False, device="cpu")
        print_summary("nanoGPT CPU recipe, same compute", same_compute)
    compared = {**baselines}
    if reference is not None:
        compared[NANOGPT_ROW] = reference["val_bits_per_byte"]
        compared[NANOGPT_COMPUTE_ROW] = same_compute["val_bits_per_byte"]
    print_baselines(compared, f"this run (preset {args.preset})", summary["val_bits_per_byte"])
    passed = summary["val_bits_per_byte"] <= TARGET_BITS_PER_BYTE
    in_budget = summary["train_seconds"] <= BUDGET_SECONDS
    print(f"val bits/byte <= {TARGET_BITS_PER_BYTE}: {passed}")
    print(f"training wall time {summary['train_seconds']:.1f} s <= the {BUDGET_SECONDS} s budget:", in_budget)
    result = {
        "environment": environment(args.threads, device),
        "target_bits_per_byte": TARGET_BITS_PER_BYTE,
        "chapter_budget_seconds": BUDGET_SECONDS,
        "baselines_bits_per_byte": baselines,
        **summary,
        "nanogpt_cpu": reference,
        "nanogpt_cpu_same_compute": same_compute,
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


def main(argv: list[str] | None = None) -> int:
    """Run the quality benchmark (one preset, or the sweep or ablations); return an exit status."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    # The sweeps start from the plain AdamW configuration: there `--preset cpu` means its AdamW version.
    sweeping = args.recipe or args.sweep or args.ablations
    preset = _preset_from_args(args, "cpu-adamw" if sweeping and args.preset == "cpu" else None)
    if args.leave_one_out:
        return _leave_one_out(args)
    if args.recipe:
        return _recipe(args, preset)
    if args.sweep or args.ablations:
        return _sweep(args, preset)
    return _one_run(args, preset)

"""The quality benchmark's sweep and ablations: one change at a time from a preset, each run in full.

`python -m llmbook.bench quality --sweep` / `--ablations` (see `llmbook.bench.quality`). Results are
written after every run, so a busy machine can finish a sweep in parts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmbook.bench import write_results
from llmbook.bench.quality_run import environment, jsonable, print_summary, run_preset, variant


def sweep_variants(base: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (what changed, preset): the choices the chapter discusses, each varied alone."""
    lr = base["train"]["max_lr"]
    return {
        "baseline": ("none: the plain model", base),
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
        "baseline: RoPE, pre-norm, SwiGLU": ("none: the plain model", base),
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


# The recipe changes chapter 8's run keeps. The stored two-seed `--recipe` table (short runs on one core)
# shows the first four help alone; the last two ("lr x 4, decay to 0", "weight decay x 10") do not help
# alone and short, and are settled at full length by `--leave-one-out` (results/quality_leave_one_out.json,
# which chapter 8 checks `PRESETS["cpu"]` against). Not kept: the longer windows, no better at full length
# with two seeds (results/quality_context256*.json).
KEPT = (
    "Muon, lr x 4 on the matrices", "QK-norm", "squared-ReLU MLP", "untied embeddings",
    "lr x 4, decay to 0", "weight decay x 10",
)  # fmt: skip


def recipe_variants(base: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (what changed, preset): the post-2023 training changes, each added alone to `base` (the
    plain AdamW configuration, `PRESETS["cpu-adamw"]`), then the ones in `KEPT` all together."""
    lr = base["train"]["max_lr"]
    changes: dict[str, tuple[str, dict[str, Any]]] = {
        "Muon": ("optimizer", dict(optimizer="muon")),
        "Muon, lr x 4 on the matrices": ("optimizer", dict(optimizer="muon", muon_lr=4 * lr)),
        "QK-norm": ("attention", dict(qk_norm=True)),
        "squared-ReLU MLP": ("feed-forward", dict(ffn="relu2")),
        "untied embeddings": ("output layer", dict(tie_embeddings=False)),
        "logit soft-cap 30": ("output layer", dict(logit_softcap=30.0)),
        "lr x 4, decay to 0": ("learning rate", dict(max_lr=4 * lr, min_lr=0.0)),
        "batch x 2": ("batch size", dict(batch_size=2 * base["train"]["batch_size"])),
        "weight decay x 10": ("regularisation", dict(weight_decay=10 * base["train"]["weight_decay"])),
        "linear decay": ("learning rate", dict(lr_decay="linear")),
        "context x 2, batch / 2": (
            "context",
            dict(
                context_length=2 * base["model"]["context_length"],
                batch_size=base["train"]["batch_size"] // 2,
            ),
        ),
    }
    variants = {"baseline (AdamW)": ("the plain AdamW configuration", base)}
    variants |= {name: (what, variant(base, **fields)) for name, (what, fields) in changes.items()}
    together: dict[str, Any] = {}
    for name in KEPT:
        together |= changes[name][1]
    variants["all kept changes"] = ("the chapter's recipe", variant(base, **together))
    return variants


def leave_one_out_variants(
    recipe: dict[str, Any], plain: dict[str, Any]
) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (what was undone, preset): the final recipe (`PRESETS["cpu"]`), then the recipe with one of
    its learning-rate or regularisation changes put back to the plain configuration's value (`plain`)."""
    base = plain["train"]
    return {
        "recipe": ("nothing: the chapter's final run", recipe),
        "without lr x 4, decay to 0": (
            "AdamW's peak and floor back to the plain run's",
            variant(recipe, max_lr=base["max_lr"], min_lr=base["min_lr"]),
        ),
        "without weight decay x 10": (
            "weight decay back to the plain run's",
            variant(recipe, weight_decay=base["weight_decay"]),
        ),
        "without Muon's lr x 4": (
            "Muon's peak back to the plain AdamW peak",
            variant(recipe, muon_lr=base["max_lr"]),
        ),
    }


def run_leave_one_out(
    variants: dict[str, tuple[str, dict[str, Any]]],
    out: Path,
    seeds: tuple[int, ...],
    processes: int,
    only: list[str] | None = None,
    reuse: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """Each variant with each seed at its full step count, one run at a time on `processes` CPU processes
    (as the chapter trains); seed by seed, so a first seed of every variant is in `out` early.

    Runs already in `out`, or single runs in the `reuse` files (`python -m llmbook.bench quality` results),
    with the same preset are kept rather than run again: a fixed step count makes a run's number the same
    whatever else the machine is doing.
    """
    results: dict[str, Any] = {"environment": environment(1, "cpu"), "processes": processes, "runs": {}}
    if out.is_file():
        results["runs"] = json.loads(out.read_text(encoding="utf-8")).get("runs", {})
    stored = [json.loads(path.read_text("utf-8")) for path in reuse if path.is_file()]
    for seed in seeds:
        for name, (what, preset) in variants.items():
            if only and name not in only:
                continue
            entry = results["runs"].setdefault(name, {"changed": what, "seeds": {}})
            seeded = jsonable(variant(preset, seed=seed))
            done = entry["seeds"].get(str(seed))
            if done and done["preset"] == seeded:
                continue
            same = [run for run in stored if run["preset"] == seeded and run.get("processes") == processes]
            if same:
                print(f"{name} (seed {seed}): copied from a stored run of {same[0]['environment']['date']}")
                summary = {key: value for key, value in same[0].items() if not key.startswith("nanogpt_cpu")}
            else:
                print(f"--- {name} (seed {seed})", flush=True)
                summary = run_preset(seeded, progress=False, device="cpu", processes=processes)
                summary["environment"] = environment(1, "cpu")
            summary["history"] = {k: summary["history"][k] for k in ("eval_step", "val_loss", "val_bpb")}
            _record_seed(results, name, str(seed), summary, out)
    return results


def _run_one(task: tuple[str, dict[str, Any], float | None]) -> tuple[str, dict[str, Any]]:
    """One seeded run in a worker process with one torch thread (what a parallel run may use)."""
    import torch

    torch.set_num_threads(1)
    name, preset, seconds = task
    summary = run_preset(preset, progress=False, device="cpu", seconds=seconds)
    summary["history"] = {k: summary["history"][k] for k in ("eval_step", "val_loss", "val_bpb")}
    return name, summary


def run_seeded(
    variants: dict[str, tuple[str, dict[str, Any]]],
    out: Path,
    seconds: float | None,
    seeds: tuple[int, ...] = (0, 1),
    jobs: int = 2,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Each variant with each seed, `jobs` runs at a time on one thread each, every run given the same
    `seconds` of training (`calibrate_steps`); the mean over seeds and the spread (max - min) per variant.

    Runs already in `out` with the same preset, seed and budget are kept, so a sweep can finish in parts.
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    results: dict[str, Any] = {"environment": environment(1, "cpu"), "seconds": seconds, "runs": {}}
    if out.is_file():
        results["runs"] = json.loads(out.read_text(encoding="utf-8")).get("runs", {})
    tasks = []
    for name, (what, preset) in variants.items():
        if only and name not in only:
            continue
        entry = results["runs"].setdefault(name, {"changed": what, "seeds": {}})
        entry["changed"] = what
        for seed in seeds:
            seeded = variant(preset, seed=seed)
            done = entry["seeds"].get(str(seed))
            if done and done.get("budget_seconds") == seconds and _same_run(done["preset"], seeded, seconds):
                continue
            tasks.append((f"{name}\x00{seed}", seeded, seconds))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        for key, summary in pool.map(_run_one, tasks):
            name, seed = key.split("\x00")
            _record_seed(results, name, seed, summary, out)
    return results


def _record_seed(results: dict[str, Any], name: str, seed: str, summary: dict[str, Any], out: Path) -> None:
    """Store one seed's run of `name`, update the run's mean and spread over its seeds, and save."""
    entry = results["runs"][name]
    entry["seeds"][seed] = summary
    print_summary(f"{name} (seed {seed})", summary)
    values = [run["val_bits_per_byte"] for run in entry["seeds"].values()]
    entry["val_bits_per_byte"] = sum(values) / len(values)
    entry["spread"] = max(values) - min(values)
    results["environment"] = environment(1, "cpu")
    write_results(out, results)


def _same_run(done: dict[str, Any], preset: dict[str, Any], seconds: float | None) -> bool:
    """Is a stored run's preset this one? With a time budget the step count was the calibration's."""
    done, wanted = jsonable(done), jsonable(preset)
    if seconds is not None:
        for one in (done, wanted):
            one["train"].pop("steps", None)
    return done == wanted

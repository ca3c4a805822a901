"""Fine-tuning SmolLM2-135M-Instruct on a checkable skill: held-out accuracy before, after LoRA SFT and
after GRPO (`llmbook.finetune`), exact and extracted, each with its 95% Wilson interval, and the wall time
and steps of each training stage.

    python -m llmbook.bench finetune [--task add3] [--problems 500] [--runs runs/bench-finetune]
    python -m llmbook.bench finetune --zero-shot [--problems 150] [--tasks add3,count_letter]

The recipe is `SFTConfig` / `RLConfig`'s defaults, with ``--sft-steps`` / ``--rl-steps`` to shorten it. The
runs are kept in ``--runs`` (resumable: a benchmark stopped during training continues where it stopped, and
a finished stage is not trained again, so its wall time is the sum of the steps' times in its history).
Greedy decoding, so with a fixed thread count the accuracies do not depend on the machine's load; the
timings do (``--note`` says under what conditions they were taken). ``--zero-shot`` is the table of every
candidate task of `llmbook.tasks` before training (``results/finetune_zero_shot.json``).
"""

import argparse
import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import torch

from llmbook.bench import run_metadata, save_if_asked
from llmbook.finetune import RLConfig, SFTConfig, run_rl, run_sft
from llmbook.gguf import load_model, load_tokenizer, read_gguf, smollm2_path
from llmbook.tasks import TASKS, evaluate, problems, prompt_text

RESULTS = Path(__file__).parent / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmbook.bench finetune", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--zero-shot", action="store_true", help="only the zero-shot table of --tasks")
    parser.add_argument("--task", default=SFTConfig.task, help="the skill the stages train")
    parser.add_argument("--tasks", default=",".join(TASKS), help="--zero-shot: comma-separated task names")
    parser.add_argument("--problems", type=int, default=None, help="held-out problems (500; zero-shot 150)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="which held-out problems are drawn")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--examples", type=int, default=5, help="replies per stage to print and save")
    parser.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default: SFTConfig's)")
    parser.add_argument("--rl-steps", type=int, default=None, help="RL steps (default: RLConfig's)")
    parser.add_argument("--runs", default="runs/bench-finetune", help="folder of the resumable runs")
    parser.add_argument("--note", default=None, help="conditions of the timings, saved with them")
    parser.add_argument(
        "--out", default=None, help="results JSON ('' to skip; default results/finetune*.json)"
    )
    return parser


def _percent(entry: dict) -> str:
    low, high = entry["interval_95"]
    return f"{100 * entry['accuracy']:5.1f}% [{100 * low:4.1f}, {100 * high:4.1f}]"


def _examples(chosen, replies, count: int) -> list[dict]:
    return [
        {"question": p.question, "answer": p.answer, "reply": r}
        for p, r in zip(chosen[:count], replies, strict=False)
    ]


def _task_names(args) -> list[str]:
    """The tasks asked for (--tasks with --zero-shot, else --task); SystemExit naming unknown ones."""
    names = (
        [name.strip() for name in args.tasks.split(",") if name.strip()] if args.zero_shot else [args.task]
    )
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    return names


def zero_shot(args, model, tokenizer, template, file) -> int:
    """The table of every candidate task's zero-shot accuracy."""
    names = _task_names(args)
    n = 150 if args.problems is None else args.problems
    out = str(RESULTS / "finetune_zero_shot.json") if args.out is None else args.out
    results = run_metadata("finetune", torch.device("cpu"))
    results.update(
        model=file.metadata.get("general.name", file.path.name), model_file=file.path.name, split="heldout",
        stage="zero-shot", problems=n, seed=args.seed, max_new_tokens=args.max_new_tokens, decoding="greedy",
        system_prompt="the chat template's default (none given)",
        extraction={name: TASKS[name].extract.__name__ for name in names},
        example_prompt=prompt_text(template, problems(TASKS[names[0]], "heldout", 1, seed=args.seed)[0]),
        tasks={},
    )  # fmt: skip
    print(f"zero-shot on {n} held-out problems per task, greedy, {args.max_new_tokens} new tokens")
    print(f"{'task':18} {'exact (95% interval)':26} {'extracted (95% interval)':26}")
    for name in names:
        task = TASKS[name]
        chosen = problems(task, "heldout", n, seed=args.seed)
        score = evaluate(model, tokenizer, template, task, chosen, args.max_new_tokens, args.batch_size)
        summary = score.summary()
        summary["description"] = task.description
        # What always replying the commonest answer would score: the floor a trained model must beat.
        answer, count = Counter(p.answer for p in chosen).most_common(1)[0]
        summary["most_common_answer"] = {"answer": answer, "accuracy": count / len(chosen)}
        summary["examples"] = _examples(chosen, score.replies, args.examples)
        results["tasks"][name] = summary
        print(f"{name:18} {_percent(summary['exact']):26} {_percent(summary['extracted']):26}", flush=True)
        save_if_asked(out, results)  # after every task, so a long run that is stopped keeps what it did
    return 0


def _beats(after: dict, before: dict) -> bool:
    """True when the later stage's interval lies wholly above the earlier one's."""
    return after["interval_95"][0] > before["interval_95"][1]


def stages(args, model, tokenizer, template, file) -> int:
    """Held-out accuracy before, after SFT and after RL, and each stage's steps and wall time."""
    n = 500 if args.problems is None else args.problems
    out = str(RESULTS / "finetune.json") if args.out is None else args.out
    overrides = {"task": args.task}
    sft_config = SFTConfig(**overrides)
    if args.sft_steps is not None:  # a shorter run keeps the recipe's warm-up, up to its length
        sft_config = dataclasses.replace(
            sft_config, steps=args.sft_steps, warmup_steps=min(sft_config.warmup_steps, args.sft_steps)
        )
    rl_config = RLConfig(**overrides, **({} if args.rl_steps is None else {"steps": args.rl_steps}))
    if sft_config.system_prompt != rl_config.system_prompt:
        raise SystemExit("the SFT and RL recipes must ask with the same system prompt")
    task, runs = TASKS[args.task], Path(args.runs) / args.task
    chosen = problems(task, "heldout", n, seed=args.seed)
    results = run_metadata("finetune", torch.device("cpu"))
    results.update(
        model=file.metadata.get("general.name", file.path.name), model_file=file.path.name, task=task.name,
        description=task.description, split="heldout", problems=n, seed=args.seed,
        max_new_tokens=args.max_new_tokens, decoding="greedy", extraction=task.extract.__name__,
        sft_config=sft_config.to_dict(), rl_config=rl_config.to_dict(), timings_note=args.note, stages={},
    )  # fmt: skip

    earlier = _earlier_scores(out, results)

    def score(stage: str, scored_model, training: dict | None) -> None:
        if stage in earlier:  # scored by an earlier call with the same problems and recipe
            results["stages"][stage] = {**earlier[stage], "training": training}
            print(f"{stage:10} reused from {out} ({results['stages'][stage]['scored_on']})", flush=True)
            return
        tick = time.perf_counter()
        result = evaluate(
            scored_model, tokenizer, template, task, chosen, args.max_new_tokens, args.batch_size,
            system_prompt=sft_config.system_prompt,
        )  # fmt: skip
        summary = {**result.summary(), "eval_seconds": time.perf_counter() - tick, "training": training,
                   "scored_on": results["date"],
                   "examples": _examples(chosen, result.replies, args.examples)}  # fmt: skip
        results["stages"][stage] = summary
        print(f"{stage:10} {_percent(summary['exact']):26} {_percent(summary['extracted']):26}", flush=True)
        save_if_asked(out, results)

    print(f"{task.name} on {n} held-out problems, greedy, {args.max_new_tokens} new tokens")
    print(f"{'stage':10} {'exact (95% interval)':26} {'extracted (95% interval)':26}")

    # The trained stages first (the base model is scored last, on a fresh copy: SFT adds its adapters to
    # the one it is given), so a benchmark stopped early has kept the stages that cost the most.
    def progress(record: dict) -> None:
        print("  " + ", ".join(f"{key} {value:.4g}" for key, value in record.items()), flush=True)

    sft = run_sft(sft_config, runs / "sft", load_model(file.path), tokenizer, template, callback=progress)
    score("sft", sft.model, _training(sft, sft_config))
    rl = run_rl(rl_config, runs / "rl", runs / "sft", load_model(file.path), tokenizer, template, progress)
    score("rl", rl.model, _training(rl, rl_config))
    score("before", model, None)
    results["stages"] = {stage: results["stages"][stage] for stage in ("before", "sft", "rl")}
    for stage, earlier in (("sft", "before"), ("rl", "sft")):
        summary = results["stages"][stage]
        summary["exact_beats_previous_interval"] = _beats(
            summary["exact"], results["stages"][earlier]["exact"]
        )
    save_if_asked(out, results)
    return 0


# What a stage's held-out score depends on: the problems, the decoding, and the recipes up to that stage.
_SCORED_WITH = {
    "before": ("model_file", "task", "problems", "seed", "max_new_tokens"),
    "sft": ("model_file", "task", "problems", "seed", "max_new_tokens", "sft_config"),
    "rl": ("model_file", "task", "problems", "seed", "max_new_tokens", "sft_config", "rl_config"),
}


def _earlier_scores(out: str, results: dict) -> dict[str, dict]:
    """The stages an earlier results file scored on the same problems with the same recipe (greedy
    decoding makes them the same numbers), so that a benchmark stopped during a later stage does not
    score the finished ones again."""
    if not out or not Path(out).is_file():
        return {}
    try:
        previous = json.loads(Path(out).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {
        stage: summary
        for stage, summary in previous.get("stages", {}).items()
        if stage in _SCORED_WITH and "scored_on" in summary
        and all(previous.get(key) == results[key] for key in _SCORED_WITH[stage])
    }  # fmt: skip


def _training(result, config) -> dict:
    """A stage's steps, wall seconds (the sum over its steps, across resumed calls) and history."""
    return {"steps": config.steps, "wall_seconds": sum(result.history["seconds"]),
            "steps_run_in_this_call": result.steps_run, "history": result.history}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.problems is not None and args.problems < 1:
        raise SystemExit(f"--problems must be at least 1, got {args.problems}")
    _task_names(args)  # refused before the model loads
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    file = read_gguf(smollm2_path())
    template = file.metadata["tokenizer.chat_template"]
    model, tokenizer = load_model(file.path), load_tokenizer(file)
    return (zero_shot if args.zero_shot else stages)(args, model, tokenizer, template, file)

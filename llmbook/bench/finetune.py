"""Fine-tuning SmolLM2-135M-Instruct on a checkable skill. This round: the zero-shot accuracy of every
candidate task of `llmbook.tasks` on its held-out split, exact and extracted, with 95% Wilson intervals.

    python -m llmbook.bench finetune [--problems 150] [--tasks add3,count_letter] [--max-new-tokens 24]

Greedy decoding, so the numbers do not depend on the seed or on the machine's load; no timings are taken.
"""

import argparse
from pathlib import Path

import torch

from llmbook.bench import run_metadata, save_if_asked
from llmbook.gguf import load_model, load_tokenizer, read_gguf, smollm2_path
from llmbook.tasks import TASKS, evaluate, problems, prompt_text

RESULTS = Path(__file__).parent / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmbook.bench finetune", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--problems", type=int, default=150, help="held-out problems per task")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="which held-out problems are drawn")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--examples", type=int, default=3, help="replies per task to print and save")
    parser.add_argument(
        "--out", default=str(RESULTS / "finetune_zero_shot.json"), help="results JSON ('' to skip)"
    )
    return parser


def _percent(entry: dict) -> str:
    low, high = entry["interval_95"]
    return f"{100 * entry['accuracy']:5.1f}% [{100 * low:4.1f}, {100 * high:4.1f}]"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise SystemExit(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if args.problems < 1:
        raise SystemExit(f"--problems must be at least 1, got {args.problems}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    file = read_gguf(smollm2_path())
    template = file.metadata["tokenizer.chat_template"]
    model, tokenizer = load_model(file.path), load_tokenizer(file)
    results = run_metadata("finetune", torch.device("cpu"))
    results.update(
        model=file.metadata.get("general.name", file.path.name), stage="zero-shot", split="heldout",
        problems=args.problems, seed=args.seed, max_new_tokens=args.max_new_tokens, decoding="greedy",
        system_prompt="the chat template's default (none given)",
        extraction={name: TASKS[name].extract.__name__ for name in names},
        example_prompt=prompt_text(template, problems(TASKS[names[0]], "heldout", 1, seed=args.seed)[0]),
        tasks={},
    )  # fmt: skip
    print(
        f"zero-shot on {args.problems} held-out problems per task, greedy, {args.max_new_tokens} new tokens"
    )
    print(f"{'task':18} {'exact (95% interval)':26} {'extracted (95% interval)':26}")
    for name in names:
        task = TASKS[name]
        chosen = problems(task, "heldout", args.problems, seed=args.seed)
        score = evaluate(model, tokenizer, template, task, chosen, args.max_new_tokens, args.batch_size)
        summary = score.summary()
        summary["description"] = task.description
        summary["examples"] = [
            {"question": p.question, "answer": p.answer, "reply": r}
            for p, r in zip(chosen[: args.examples], score.replies, strict=False)
        ]
        results["tasks"][name] = summary
        print(f"{name:18} {_percent(summary['exact']):26} {_percent(summary['extracted']):26}", flush=True)
        save_if_asked(args.out, results)  # after every task, so a long run that is stopped keeps what it did
    return 0

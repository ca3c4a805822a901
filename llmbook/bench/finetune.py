"""Fine-tuning SmolLM2-135M-Instruct on a checkable skill. This round: the zero-shot accuracy of every
candidate task of `llmbook.tasks` on its held-out split, exact and extracted, with 95% Wilson intervals.

    python -m llmbook.bench finetune [--problems 150] [--tasks add3,count_letter] [--max-new-tokens 24]

Greedy decoding, so the numbers do not depend on the seed or on the machine's load; no timings are taken.

``--sft-probe-steps N`` (with ``--sft-probe-task``) adds a probe, not the chapter's run: N steps of LoRA
SFT on the task's train split, then the same held-out problems again, to show that the task can be learnt.
"""

import argparse
from collections import Counter
from pathlib import Path

import torch

from llmbook.bench import run_metadata, save_if_asked
from llmbook.gguf import load_model, load_tokenizer, read_gguf, smollm2_path
from llmbook.lora import add_lora
from llmbook.optim import AdamW, param_groups
from llmbook.sft import pad_batch, tokenize_conversation
from llmbook.tasks import TASKS, evaluate, problems, prompt_text, sft_conversation

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
    parser.add_argument("--sft-probe-steps", type=int, default=0, help="LoRA SFT probe steps (0: none)")
    parser.add_argument("--sft-probe-task", default="add3")
    parser.add_argument("--sft-probe-batch", type=int, default=8)
    parser.add_argument("--sft-probe-lr", type=float, default=2e-3)
    parser.add_argument("--sft-probe-rank", type=int, default=8)
    parser.add_argument("--skip-zero-shot", action="store_true", help="only the SFT probe")
    parser.add_argument(
        "--out", default=str(RESULTS / "finetune_zero_shot.json"), help="results JSON ('' to skip)"
    )
    return parser


def _percent(entry: dict) -> str:
    low, high = entry["interval_95"]
    return f"{100 * entry['accuracy']:5.1f}% [{100 * low:4.1f}, {100 * high:4.1f}]"


def sft_probe(model, tokenizer, template, task, steps: int, batch: int, lr: float, rank: int) -> list[float]:
    """LoRA SFT of ``model`` in place on ``steps`` batches of the task's train split; the losses."""
    add_lora(model, rank=rank, alpha=2 * rank, generator=torch.Generator().manual_seed(0))
    optimizer = AdamW(param_groups(model, weight_decay=0.0), lr=lr)
    train = problems(task, "train", steps * batch)
    pad_id = tokenizer.special_tokens["<|im_end|>"]  # any id: padded positions are never trained
    model.train()
    losses = []
    for step in range(steps):
        chunk = train[step * batch : (step + 1) * batch]
        examples = [tokenize_conversation(tokenizer, template, sft_conversation(p)) for p in chunk]
        inputs, targets = pad_batch(examples, pad_id)
        loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"  sft probe step {step + 1}/{steps}: loss {losses[-1]:.3f}", flush=True)
    model.eval()
    return losses


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
        model=file.metadata.get("general.name", file.path.name), model_file=file.path.name, split="heldout",
        stage="sft probe only" if args.skip_zero_shot else "zero-shot",
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
    for name in [] if args.skip_zero_shot else names:
        task = TASKS[name]
        chosen = problems(task, "heldout", args.problems, seed=args.seed)
        score = evaluate(model, tokenizer, template, task, chosen, args.max_new_tokens, args.batch_size)
        summary = score.summary()
        summary["description"] = task.description
        # What always replying the commonest answer would score: the floor a trained model must beat.
        answer, count = Counter(p.answer for p in chosen).most_common(1)[0]
        summary["most_common_answer"] = {"answer": answer, "accuracy": count / len(chosen)}
        summary["examples"] = [
            {"question": p.question, "answer": p.answer, "reply": r}
            for p, r in zip(chosen[: args.examples], score.replies, strict=False)
        ]
        results["tasks"][name] = summary
        print(f"{name:18} {_percent(summary['exact']):26} {_percent(summary['extracted']):26}", flush=True)
        save_if_asked(args.out, results)  # after every task, so a long run that is stopped keeps what it did
    if args.sft_probe_steps > 0:
        task = TASKS[args.sft_probe_task]
        losses = sft_probe(
            model, tokenizer, template, task, args.sft_probe_steps, args.sft_probe_batch, args.sft_probe_lr,
            args.sft_probe_rank,
        )  # fmt: skip
        chosen = problems(task, "heldout", args.problems, seed=args.seed)
        score = evaluate(model, tokenizer, template, task, chosen, args.max_new_tokens, args.batch_size)
        summary = score.summary()
        results["sft_probe"] = {
            "note": "a probe of learnability, not the chapter's run",
            "task": task.name, "steps": args.sft_probe_steps, "batch": args.sft_probe_batch,
            "lr": args.sft_probe_lr, "rank": args.sft_probe_rank, "alpha": 2 * args.sft_probe_rank,
            "optimizer": "llmbook.optim.AdamW, no weight decay, constant lr", "losses": losses,
            "heldout_after": summary,
            "examples": [{"question": p.question, "answer": p.answer, "reply": r}
                         for p, r in zip(chosen[: args.examples], score.replies, strict=False)],
        }  # fmt: skip
        exact, extracted = _percent(summary["exact"]), _percent(summary["extracted"])
        print(f"after the SFT probe: {task.name:18} {exact:26} {extracted}")
        save_if_asked(args.out, results)
    return 0

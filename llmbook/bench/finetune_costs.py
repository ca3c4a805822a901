"""What fine-tuning SmolLM2-135M-Instruct costs, measured in one run on the SFT data of `llmbook.tasks`
(a batch of the task's train split through the chat template, loss on the assistant's tokens only):

1. LoRA against full fine-tuning: trainable parameters and the bytes of AdamW's moments (exact, counted
   from the tensors), the bytes of the gradients, peak resident memory while training and seconds per
   step (median after a warm-up). Each mode runs in a fresh process, so neither inherits the other's
   memory; the peak is reset after the model is loaded (Linux's ``/proc/self/clear_refs``), so it is the
   training's own, and the resident size before training is reported beside it.
2. llmbook against transformers + peft on the same weights (`llmbook.hf.to_hf`, peft LoRA of the same
   rank, alpha and targets): training tokens/s (forward + backward + AdamW step of the adapters, the same
   batch) and rollout tokens/s (k sampled answers per prompt with a KV cache: `llmbook.grpo.rollout`
   against ``generate``, the same rows, new tokens and temperature, no early stop), as ratios, timed
   interleaved round by round (`time_interleaved`) so a busy machine slows both alike.
3. Bits per byte on a general text (the TinyStories sample): `general_bits_per_byte`, which the
   fine-tuning benchmark also calls before and after SFT and RL; here "before", and with ``--adapter PATH``
   after loading that adapter file.

    python -m llmbook.bench finetune_costs [--threads 2] [--rank 8] [--batch-size 4] [--adapter PATH]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmbook.bench import print_environment, run_metadata, save_if_asked, time_interleaved
from llmbook.evaluation import evaluate_exact
from llmbook.grpo import rollout
from llmbook.lora import LLAMA_TARGETS, add_lora, load_adapters
from llmbook.loss import bits_per_byte
from llmbook.model import TransformerLM
from llmbook.optim import AdamW, param_groups
from llmbook.sft import pad_batch, tokenize_conversation
from llmbook.tasks import TASKS, problems, prompt_text, sft_conversation
from llmbook.tokenizer import Tokenizer

__all__ = [
    "trainable_parameters",
    "optimizer_state_bytes",
    "gradient_bytes",
    "reset_peak_rss",
    "peak_rss_bytes",
    "rss_bytes",
    "general_bits_per_byte",
    "sft_batch",
    "measure_training",
]

RESULTS = Path(__file__).parent / "results"
MODES = ("lora", "full")
END_TOKEN = "<|im_end|>"
LEARNING_RATE = 1e-5  # small: the timed steps should not move the model far from the one measured


# ---- exact counts -----------------------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> int:
    """How many numbers the optimizer updates: parameters with requires_grad, a tied tensor counted once."""
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by AdamW's moments (``exp_avg`` and ``exp_avg_sq`` of every parameter), read from the
    tensors themselves; 0 before the first step (AdamW creates them lazily)."""
    return sum(
        state[name].numel() * state[name].element_size()
        for state in optimizer.state.values()
        for name in ("exp_avg", "exp_avg_sq")
        if name in state
    )


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the gradients the model holds now (after backward, before zero_grad)."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


# ---- resident memory (Linux) ------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak resident size to its current size; False where the system cannot (it
    needs Linux >= 4.0's ``/proc/self/clear_refs``), and then the peak counts from the process's start."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS (proc(5))
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """The most memory this process has held resident since it started or since `reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def rss_bytes() -> int | None:
    """The memory this process holds resident now (None where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


# ---- bits per byte on a general text ----------------------------------------------------------------


def general_bits_per_byte(
    model: TransformerLM,
    tokenizer: Tokenizer,
    text: str,
    context_length: int | None = None,
    batch_size: int = 8,
    start_token: str | None = "<|endoftext|>",
) -> float:
    """Bits per byte of ``text`` under ``model``: how much a fine-tuning cost the model on text it was not
    tuned for (compare one model before and after, with the same arguments).

    The text is tokenized and preceded by ``start_token`` (a document boundary, as in pretraining), so
    every token of the text is predicted once (`llmbook.evaluation.evaluate_exact`, consecutive windows
    of ``context_length`` tokens, default the model's) and the bytes are all of the text's; with
    ``start_token=None`` the first token is context only and its bytes are not counted. The conversion is
    `llmbook.loss.bits_per_byte`.
    """
    ids = tokenizer.encode(text)
    if start_token is not None:
        if start_token not in tokenizer.special_tokens:
            raise ValueError(
                f"start_token {start_token!r} is not a special token of the tokenizer; "
                f"choose one of {sorted(tokenizer.special_tokens)} or None"
            )
        ids = [tokenizer.special_tokens[start_token], *ids]
    if len(ids) < 2:
        raise ValueError(f"the text gives {len(ids)} token(s) with the start token; at least 2 are needed")
    nats, n_targets = evaluate_exact(
        model, torch.tensor(ids), context_length or model.config.context_length, batch_size
    )
    return float(bits_per_byte(nats, n_targets, len(tokenizer.decode_bytes(ids[1:]))))


# ---- one mode of training, in its own process --------------------------------------------------------


def sft_batch(
    tokenizer: Tokenizer, template: str, task: str, batch_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (batch, seq): the first ``batch_size`` problems of ``task``'s train split as
    chat conversations, right-padded, with the loss on the assistant's tokens only (`llmbook.sft`)."""
    examples = [
        tokenize_conversation(tokenizer, template, sft_conversation(problem), END_TOKEN)
        for problem in problems(TASKS[task], "train", batch_size, seed=seed)
    ]
    return pad_batch(examples, pad_id=tokenizer.special_tokens[END_TOKEN])  # pads are never targets


def _smollm2(context_length: int | None) -> tuple[TransformerLM, Tokenizer, str]:
    """SmolLM2-135M-Instruct as a `TransformerLM`, its tokenizer and its chat template."""
    from llmbook.gguf import load_model, load_tokenizer, read_gguf, smollm2_path

    file = read_gguf(smollm2_path())
    model = load_model(file.path, context_length=context_length)
    return model, load_tokenizer(file), file.metadata["tokenizer.chat_template"]


def _train_step(model: TransformerLM, optimizer: torch.optim.Optimizer, inputs, targets) -> float:
    loss = model(inputs, targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def measure_training(
    mode: str,
    model: TransformerLM,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    warmup: int,
    rank: int,
    alpha: float,
    targets_lora: tuple[str, ...] = LLAMA_TARGETS,
) -> dict:
    """Train ``model`` in place for ``warmup`` + ``steps`` AdamW steps on one batch, fully (``mode="full"``)
    or through LoRA adapters (``"lora"``), and return the exact counts, the step times and the memory.
    The warm-up steps are not timed; the first of them also measures the gradients' bytes.

    The peak resident memory is reset before the first step, so ``peak_rss_bytes`` is the training's own
    high-water mark (model, batch, gradients, AdamW's state, activations) when ``peak_reset`` is True.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if steps < 1 or warmup < 1:
        raise ValueError(f"need steps >= 1 and warmup >= 1, got steps={steps}, warmup={warmup}")
    if mode == "lora":
        add_lora(model, rank, alpha, targets_lora, torch.Generator().manual_seed(0))
    optimizer = AdamW(param_groups(model, weight_decay=0.0), lr=LEARNING_RATE)
    model.train()
    rss_before = rss_bytes()
    peak_reset = reset_peak_rss()
    loss = model(inputs, targets)  # the first step, taken apart to read the gradients' size
    loss.backward()
    grads = gradient_bytes(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = []
    for index in range(warmup - 1 + steps):
        start = time.perf_counter()
        _train_step(model, optimizer, inputs, targets)
        if index >= warmup - 1:
            seconds.append(time.perf_counter() - start)
    return {
        "mode": mode,
        "trainable_parameters": trainable_parameters(model),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "gradient_bytes": grads,
        "rss_before_training_bytes": rss_before,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_reset": peak_reset,
        "first_loss": loss.item(),
        "seconds_per_step": statistics.median(seconds),
        "seconds_all_steps": seconds,
    }


def _training_in_this_process(mode: str, args: dict) -> dict:
    """The child's whole job: load SmolLM2 and the batch, then `measure_training`."""
    torch.set_num_threads(args["threads"])
    model, tokenizer, template = _smollm2(args["context_length"])
    inputs, targets = sft_batch(tokenizer, template, args["task"], args["batch_size"])
    return measure_training(
        mode, model, inputs, targets, args["steps"], args["warmup"], args["rank"], args["alpha"],
        tuple(args["targets"]),
    )  # fmt: skip


def _training_in_fresh_process(mode: str, args: dict) -> dict:
    # "spawn": a new interpreter, so the child's memory holds nothing of this process's models.
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_training_in_this_process, mode, args).result()


# ---- llmbook against transformers + peft ----------------------------------------------------------


def _peft_model(model: TransformerLM, rank: int, alpha: float, targets: tuple[str, ...]):
    """transformers' Llama with ``model``'s weights (sdpa attention) and peft's LoRA adapters."""
    import peft

    from llmbook.hf import to_hf

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    return peft.get_peft_model(to_hf(model, attn_implementation="sdpa"), config)


def _training_variants(ours: TransformerLM, theirs, inputs, targets) -> dict[str, Callable[[], float]]:
    """One LoRA step of each: the book's (its loss, its AdamW) and transformers + peft (F.cross_entropy,
    torch.optim.AdamW, as a user of those libraries would write it)."""
    our_optimizer = AdamW(param_groups(ours, weight_decay=0.0), lr=LEARNING_RATE)
    their_optimizer = torch.optim.AdamW(
        [p for p in theirs.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0.0
    )

    def their_step() -> float:
        logits = theirs(input_ids=inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        their_optimizer.step()
        their_optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return {
        "llmbook": lambda: _train_step(ours, our_optimizer, inputs, targets),
        "transformers+peft": their_step,
    }


def _rollout_variants(ours: TransformerLM, theirs, prompts: list[list[int]], args) -> dict[str, Callable]:
    """k sampled answers per prompt, ``new_tokens`` each (no stop token, so both do the same work); each
    variant returns how many tokens it sampled."""
    generator = torch.Generator().manual_seed(0)

    def our_rollout() -> int:
        batch = rollout(ours, prompts, args.k, args.new_tokens, args.temperature, generator=generator)
        return sum(len(completion) for completion in batch.completions)

    @torch.no_grad()
    def their_rollout() -> int:
        sampled = 0
        for prompt in prompts:
            batch = torch.tensor([prompt] * args.k)
            out = theirs.generate(
                input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True,
                temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens, pad_token_id=0, use_cache=True,
            )  # fmt: skip
            sampled += out[:, batch.shape[1] :].numel()
        return sampled

    return {"llmbook": our_rollout, "transformers+peft": their_rollout}


def _ratio(rates: dict[str, float]) -> float:
    return rates["llmbook"] / rates["transformers+peft"]


# ---- the command ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmbook.bench finetune_costs", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, in every process")
    parser.add_argument("--task", default="add3", choices=sorted(TASKS), help="whose train split is the data")
    parser.add_argument("--batch-size", type=int, default=4, help="conversations per training step")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 * rank)")
    parser.add_argument("--targets", default=",".join(LLAMA_TARGETS), help="comma-separated linear layers")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode, after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode first (>= 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds against transformers")
    parser.add_argument("--prompts", type=int, default=2, help="rollout prompts")
    parser.add_argument("--k", type=int, default=4, help="sampled answers per prompt")
    parser.add_argument("--new-tokens", type=int, default=16, help="new tokens per sampled answer")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--adapter", default=None, help="an adapter file: bits per byte after loading it")
    parser.add_argument(
        "--context-length", type=int, default=None,
        help="load SmolLM2 with this context (default: the file's); an adapter file must match it",
    )  # fmt: skip
    parser.add_argument("--note", default=None, help="saved with the results (e.g. how busy the machine was)")
    parser.add_argument(
        "--out", default=str(RESULTS / "finetune_costs.json"), help="results JSON ('' to skip)"
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    for name in ("threads", "batch_size", "rank", "steps", "warmup", "rounds", "prompts", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.k < 2:
        parser.error(f"--k must be at least 2 (a group of one answer has no baseline), got {args.k}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        parser.error(f"--temperature must be a positive number (sampling), got {args.temperature}")
    if args.adapter is not None and not Path(args.adapter).is_file():
        parser.error(f"--adapter: no adapter file at {args.adapter}")


def _memory_table(modes: dict[str, dict]) -> None:
    mib = 2**20
    print(f"{'':6s} {'trainable':>12s} {'AdamW state':>12s} {'gradients':>10s} {'RSS before':>11s} "
          f"{'peak RSS':>9s} {'s/step':>7s}")  # fmt: skip
    for mode, rec in modes.items():
        print(
            f"{mode:6s} {rec['trainable_parameters']:12,d} {rec['optimizer_state_bytes'] / mib:8.1f} MiB "
            f"{rec['gradient_bytes'] / mib:6.1f} MiB {rec['rss_before_training_bytes'] / mib:7.0f} MiB "
            f"{rec['peak_rss_bytes'] / mib:5.0f} MiB {rec['seconds_per_step']:7.2f}"
        )


def _lora_vs_full(settings: dict) -> dict:
    """Part 1: each mode in a fresh process, one after the other; the records and their ratios."""
    modes = {mode: _training_in_fresh_process(mode, settings) for mode in MODES}
    _memory_table(modes)
    lora, full = modes["lora"], modes["full"]
    return {
        **modes,
        "trainable_fraction": lora["trainable_parameters"] / full["trainable_parameters"],
        "optimizer_state_ratio": full["optimizer_state_bytes"] / lora["optimizer_state_bytes"],
        "step_time_ratio": full["seconds_per_step"] / lora["seconds_per_step"],
        "note": "one fresh process per mode, run one after the other (not interleaved); the peak RSS is "
        "reset after the model and the batch are loaded",
    }


def _bits_per_byte(model: TransformerLM, tokenizer: Tokenizer, adapter: str | None) -> dict:
    """Part 3: bits per byte of the TinyStories sample, before, and after loading ``adapter`` if given."""
    from llmbook import data

    text = data.load_text("tinystories_sample")
    result = {"text": "tinystories_sample", "bytes": len(text.encode("utf-8"))}
    result["before"] = general_bits_per_byte(model, tokenizer, text)
    print(f"bits per byte on the TinyStories sample ({result['bytes']} bytes): before {result['before']:.4f}")
    if adapter is not None:
        # Into a copy, so the model compared with transformers afterwards starts without adapters.
        adapted = load_adapters(adapter, copy.deepcopy(model))
        result["adapter"] = str(adapter)
        result["after"] = general_bits_per_byte(adapted, tokenizer, text)
        print(f"  after loading {adapter}: {result['after']:.4f}")
    return result


def _rates(rates: dict, work: dict) -> dict:
    return {
        **work,
        "tokens_per_second": rates["median"],
        "best_tokens_per_second": rates["best"],
        "tokens_per_second_all_rounds": rates["all_rounds"],
        "ratio": _ratio(rates["median"]),
        "best_ratio": _ratio(rates["best"]),
    }


def _against_transformers(model: TransformerLM, tokenizer: Tokenizer, template: str, args) -> dict:
    """Part 2: LoRA training and rollout tokens/s of llmbook and transformers + peft, interleaved."""
    theirs = _peft_model(model, args.rank, args.alpha, args.targets).train()
    add_lora(model, args.rank, args.alpha, args.targets, torch.Generator().manual_seed(0))
    model.train()
    inputs, targets = sft_batch(tokenizer, template, args.task, args.batch_size)
    training = _training_variants(model, theirs, inputs, targets)
    first_losses = {name: step() for name, step in training.items()}  # B = 0: both are still the model
    if max(first_losses.values()) - min(first_losses.values()) > 1e-3:
        raise RuntimeError(f"llmbook and transformers+peft disagree on the first loss: {first_losses}")
    train_rates = time_interleaved(training, args.rounds, inputs.numel(), "cpu")
    prompts = [
        tokenizer.encode(prompt_text(template, problem))
        for problem in problems(TASKS[args.task], "train", args.prompts, seed=1)
    ]
    sampling = _rollout_variants(model, theirs, prompts, args)
    sampled = args.prompts * args.k * args.new_tokens
    counts = {name: sample() for name, sample in sampling.items()}  # also the warm-up
    if set(counts.values()) != {sampled}:
        raise RuntimeError(f"the rollouts sampled {counts} tokens, not {sampled} each: unequal work")
    rollout_rates = time_interleaved(sampling, args.rounds, sampled, "cpu")
    for what, rates in (("training", train_rates), ("rollout", rollout_rates)):
        speeds = rates["median"]
        print(f"{what:8s} tokens/s: llmbook {speeds['llmbook']:7.1f}, transformers+peft "
              f"{speeds['transformers+peft']:7.1f}  ({_ratio(speeds):.2f}x)")  # fmt: skip
    return {
        "training": _rates(train_rates, {"tokens_per_step": inputs.numel(), "first_loss": first_losses}),
        "rollout": _rates(rollout_rates, {
            "prompts": args.prompts, "k": args.k, "new_tokens": args.new_tokens,
            "temperature": args.temperature, "tokens_per_call": sampled,
        }),
        "rounds": args.rounds,
        "reference": "transformers' LlamaForCausalLM (sdpa) + peft LoRA, torch.optim.AdamW, "
        "generate(do_sample=True)",
        "note": "tokens/s counts padded positions in training and every sampled token in rollouts; median "
        "over rounds interleaved ABAB; ratio = llmbook / transformers+peft",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    torch.set_num_threads(args.threads)
    args.alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    args.targets = tuple(name.strip() for name in args.targets.split(",") if name.strip())
    started = time.perf_counter()
    results = run_metadata("finetune_costs", torch.device("cpu"))
    settings = {
        "task": args.task, "split": "train", "batch_size": args.batch_size, "rank": args.rank,
        "alpha": args.alpha, "targets": list(args.targets), "steps": args.steps, "warmup": args.warmup,
        "threads": args.threads, "context_length": args.context_length,
    }  # fmt: skip
    results["settings"] = settings
    results["note"] = args.note
    # Other jobs on the machine slow every timing; the load average says how busy it was.
    results["load_average_1_5_15_min"] = {"start": os.getloadavg()}
    print_environment(results)
    results["lora_vs_full"] = _lora_vs_full(settings)
    save_if_asked(args.out, results)  # after each part, so a run that is stopped keeps what it measured
    model, tokenizer, template = _smollm2(args.context_length)
    results["bits_per_byte"] = _bits_per_byte(model, tokenizer, args.adapter)
    save_if_asked(args.out, results)
    results["vs_transformers_peft"] = _against_transformers(model, tokenizer, template, args)
    results["wall_seconds"] = time.perf_counter() - started
    results["load_average_1_5_15_min"]["end"] = os.getloadavg()
    print(f"wall time {results['wall_seconds']:.0f} s")
    save_if_asked(args.out, results)
    return 0

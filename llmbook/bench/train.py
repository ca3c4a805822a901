"""Training throughput: tokens/s of one optimizer step (forward + backward + update) of llmbook's
TransformerLM against transformers' LlamaForCausalLM holding the same weights, measured in one run.

    python -m llmbook.bench train [--device cpu] [--threads 1] [--d-model 256 ...]

Three step functions are timed, interleaved round by round so a busy machine slows them alike:
  llmbook       TransformerLM + llmbook.loss.cross_entropy + llmbook.optim.AdamW (what `train` runs)
  transformers  LlamaForCausalLM (sdpa attention) + F.cross_entropy + torch.optim.AdamW (its default
                implementation: a per-tensor loop on CPU, multi-tensor "foreach" on a GPU)
  llmbook-model TransformerLM + F.cross_entropy + torch.optim.AdamW: isolates the model itself
The reported number per variant is the median over rounds; ratios are llmbook / transformers.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llmbook.bench import (
    add_model_arguments,
    configure_from_args,
    print_environment,
    run_metadata,
    save_if_asked,
    time_interleaved,
)
from llmbook.hf import to_hf
from llmbook.loss import cross_entropy
from llmbook.model import ModelConfig, TransformerLM
from llmbook.optim import AdamW

RESULTS = Path(__file__).parent / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmbook.bench train", description=__doc__.split("\n")[0])
    add_model_arguments(parser, context_length=128, batch_size=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "train.json"), help="results JSON ('' to skip)")
    return parser


def _step_function(
    model: torch.nn.Module, logits_of: Callable, loss_of: Callable, optimizer: torch.optim.Optimizer
) -> Callable[[torch.Tensor, torch.Tensor], float]:
    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        loss = loss_of(logits_of(model, x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _torch_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _variants(config: ModelConfig, device: torch.device) -> dict[str, Callable]:
    """The three step functions of the module docstring, on models holding the same initial weights."""
    torch.manual_seed(0)
    base = TransformerLM(config).to(device)

    def fresh_llmbook() -> TransformerLM:
        model = TransformerLM(config).to(device)
        model.load_state_dict(base.state_dict())
        return model.train()

    hf_model = to_hf(base, attn_implementation="sdpa").train()
    ours, ours_isolated = fresh_llmbook(), fresh_llmbook()
    lr = 1e-4  # small, so the weights (and the work per step) stay comparable across steps
    return {
        "llmbook": _step_function(
            ours, lambda m, x: m(x), cross_entropy, AdamW(ours.parameters(), lr=lr, weight_decay=0.1)
        ),
        "transformers": _step_function(
            hf_model, lambda m, x: m(input_ids=x, use_cache=False).logits, _torch_cross_entropy,
            torch.optim.AdamW(hf_model.parameters(), lr=lr, weight_decay=0.1),
        ),
        "llmbook-model": _step_function(
            ours_isolated, lambda m, x: m(x), _torch_cross_entropy,
            torch.optim.AdamW(ours_isolated.parameters(), lr=lr, weight_decay=0.1),
        ),
    }  # fmt: skip


def _first_losses(variants: dict[str, Callable], x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Each variant's first-step loss; they must agree, or the comparison is between different models."""
    first_losses = {name: float(step(x, y)) for name, step in variants.items()}
    spread = max(first_losses.values()) - min(first_losses.values())
    if spread > 1e-3:
        raise RuntimeError(f"the variants disagree on the first loss: {first_losses}")
    return first_losses


def _relative_to_transformers(speeds: dict[str, float]) -> dict[str, float]:
    return {name: value / speeds["transformers"] for name, value in speeds.items() if name != "transformers"}


def _print_report(results: dict, config: ModelConfig) -> None:
    print_environment(results)
    print(f"model d_model={config.d_model} n_layers={config.n_layers} vocab={config.vocab_size}, "
          f"batch {results['batch_size']} x {config.context_length} tokens")  # fmt: skip
    ratios, best_ratios = results["ratio_vs_transformers"], results["best_ratio_vs_transformers"]
    cpu_ratios, best = results["cpu_time_ratio_vs_transformers"], results["best_tokens_per_second"]
    for name, value in results["tokens_per_second"].items():
        ratio = (
            f"{ratios[name]:.2f}x (best {best_ratios[name]:.2f}x, CPU time {cpu_ratios[name]:.2f}x)"
            if name in ratios
            else "reference"
        )
        print(f"  {name:14s} {value:8.0f} tokens/s (best {best[name]:8.0f})   {ratio}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device, config = configure_from_args(args)
    variants = _variants(config, device)
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.context_length + 1)
    windows = torch.randint(0, config.vocab_size, shape, generator=generator).to(device)
    x, y = windows[:, :-1], windows[:, 1:]
    # Same weights, same batch: the first losses are compared before anything is timed.
    first_losses = _first_losses(variants, x, y)
    for _ in range(args.warmup_steps):
        for step in variants.values():
            step(x, y)

    def timed(step: Callable) -> Callable[[], float]:
        def round_of_steps() -> float:
            for _ in range(args.steps_per_round):
                loss = step(x, y)
            return float(loss)  # waits for the last step

        return round_of_steps

    tokens_per_step = args.batch_size * args.context_length
    rates = time_interleaved(
        {name: timed(step) for name, step in variants.items()}, args.rounds,
        tokens_per_step * args.steps_per_round, device,
    )  # fmt: skip
    results = {
        **run_metadata("train", device), "model_config": config.__dict__, "batch_size": args.batch_size,
        "tokens_per_step": tokens_per_step, "rounds": args.rounds, "steps_per_round": args.steps_per_round,
        "first_loss": first_losses, "tokens_per_second": rates["median"],
        "best_tokens_per_second": rates["best"], "tokens_per_second_all_rounds": rates["all_rounds"],
        "ratio_vs_transformers": _relative_to_transformers(rates["median"]),
        "best_ratio_vs_transformers": _relative_to_transformers(rates["best"]),
        "tokens_per_cpu_second": rates["per_cpu_second"],
        "cpu_time_ratio_vs_transformers": _relative_to_transformers(rates["per_cpu_second"]),
        "note": "median and best over interleaved rounds; a shared machine makes absolute numbers noisy",
    }  # fmt: skip
    _print_report(results, config)
    save_if_asked(args.out, results)
    return 0

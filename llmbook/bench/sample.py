"""Generation throughput: new tokens/s of `llmbook.sample.generate` with the KV cache, without it, and
of transformers' `generate` on a LlamaForCausalLM holding the same weights (greedy, same lengths).

    python -m llmbook.bench sample [--device cpu] [--threads 1] [--new-tokens 128 ...]

The three are timed interleaved, round by round, and each number is the median over rounds. Greedy
decoding makes the outputs comparable: the benchmark also reports how many generated tokens agree
with transformers' (float rounding can flip a near-tie, after which the sequences differ).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llmbook.bench import (
    add_model_arguments,
    configure_from_args,
    print_environment,
    run_metadata,
    save_if_asked,
    time_interleaved,
)
from llmbook.hf import to_hf
from llmbook.model import ModelConfig, TransformerLM
from llmbook.sample import generate

RESULTS = Path(__file__).parent / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmbook.bench sample", description=__doc__.split("\n")[0]
    )
    add_model_arguments(parser, context_length=256, batch_size=1)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "sample.json"), help="results JSON ('' to skip)")
    return parser


def _matching_prefix(a: list[int], b: list[int]) -> int:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return min(len(a), len(b))


def _sharpened_models(config: ModelConfig, device: torch.device) -> tuple[TransformerLM, torch.nn.Module]:
    """A seeded TransformerLM with a sharpened head, and transformers' Llama holding the same weights."""
    torch.manual_seed(0)
    model = TransformerLM(config).to(device).eval()
    # A freshly initialised model's logits are nearly flat, so greedy choices would hinge on rounding;
    # sharpen them so the comparison of outputs across implementations means something.
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    hf_model = to_hf(model, attn_implementation="sdpa").eval()
    hf_model.generation_config.pad_token_id = 0  # no padding happens; silences a warning
    return model, hf_model


def _variants(model: TransformerLM, hf_model: torch.nn.Module, prompt: torch.Tensor, n_new: int) -> dict:
    """Greedy generation of n_new tokens three ways: llmbook with and without its cache, transformers."""

    @torch.no_grad()
    def transformers_generate() -> torch.Tensor:
        return hf_model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, min_new_tokens=n_new,
            do_sample=False, use_cache=True,
        )  # fmt: skip

    return {
        "llmbook (cache)": lambda: generate(model, prompt, n_new, temperature=0, use_cache=True),
        "llmbook (no cache)": lambda: generate(model, prompt, n_new, temperature=0, use_cache=False),
        "transformers": transformers_generate,
    }


def _compare_outputs(variants: dict, prompt_length: int, full_shape: tuple[int, int]) -> dict:
    """Run each variant once (also a warm-up): is the cache exact, how many tokens match transformers."""
    outputs = {name: fn() for name, fn in variants.items()}
    for name, out in outputs.items():
        if out.shape != full_shape:
            raise RuntimeError(f"{name} returned shape {tuple(out.shape)}, expected the full length")
    ours, theirs = outputs["llmbook (cache)"].tolist(), outputs["transformers"].tolist()
    return {
        "cache_equals_no_cache": torch.equal(outputs["llmbook (cache)"], outputs["llmbook (no cache)"]),
        "tokens_agreeing_with_transformers": [
            _matching_prefix(a[prompt_length:], b[prompt_length:]) for a, b in zip(ours, theirs, strict=True)
        ],
    }


def _ratios_of(speeds: dict[str, float]) -> dict[str, float]:
    cached = speeds["llmbook (cache)"]
    return {
        "cache_vs_no_cache": cached / speeds["llmbook (no cache)"],
        "cache_vs_transformers": cached / speeds["transformers"],
    }


def _print_report(results: dict, config: ModelConfig) -> None:
    print_environment(results)
    batch, prompt_length, n_new = results["batch_size"], results["prompt_length"], results["new_tokens"]
    print(f"model d_model={config.d_model} n_layers={config.n_layers} vocab={config.vocab_size}; "
          f"batch {batch}, prompt {prompt_length} + {n_new} new tokens, greedy")  # fmt: skip
    best = results["best_new_tokens_per_second"]
    for name, value in results["new_tokens_per_second"].items():
        print(f"  {name:20s} {value:8.1f} new tokens/s (best {best[name]:8.1f})")
    ratios, best_ratios, cpu_ratios = results["ratios"], results["best_ratios"], results["cpu_time_ratios"]
    for key in ratios:
        print(
            f"  {key:22s} {ratios[key]:.2f}x (best {best_ratios[key]:.2f}x, CPU time {cpu_ratios[key]:.2f}x)"
        )
    print(f"  cache == no cache: {results['cache_equals_no_cache']}; tokens agreeing with transformers: "
          f"{results['tokens_agreeing_with_transformers']} of {n_new}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.prompt_length + args.new_tokens > args.context_length:
        raise SystemExit("prompt-length + new-tokens must fit the context length (the cache's best case)")
    device, config = configure_from_args(args)
    model, hf_model = _sharpened_models(config, device)
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.prompt_length)
    prompt = torch.randint(0, config.vocab_size, shape, generator=generator).to(device)
    n_new = args.new_tokens
    variants = _variants(model, hf_model, prompt, n_new)
    agreement = _compare_outputs(variants, args.prompt_length, (args.batch_size, args.prompt_length + n_new))
    rates = time_interleaved(variants, args.rounds, args.batch_size * n_new, device)
    results = {
        **run_metadata("sample", device), "model_config": config.__dict__, "batch_size": args.batch_size,
        "prompt_length": args.prompt_length, "new_tokens": n_new, "rounds": args.rounds,
        "decoding": "greedy", "new_tokens_per_second": rates["median"],
        "best_new_tokens_per_second": rates["best"], "new_tokens_per_second_all_rounds": rates["all_rounds"],
        "ratios": _ratios_of(rates["median"]), "best_ratios": _ratios_of(rates["best"]),
        "new_tokens_per_cpu_second": rates["per_cpu_second"],
        "cpu_time_ratios": _ratios_of(rates["per_cpu_second"]), **agreement,
        "note": "median and best over interleaved rounds; a shared machine makes absolute numbers noisy",
    }  # fmt: skip
    _print_report(results, config)
    save_if_asked(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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

from llmbook.bench import add_model_arguments, run_metadata, save_if_asked, time_interleaved
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.prompt_length + args.new_tokens > args.context_length:
        raise SystemExit("prompt-length + new-tokens must fit the context length (the cache's best case)")
    device = torch.device(args.device)
    config = ModelConfig(
        vocab_size=args.vocab_size, context_length=args.context_length, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads,
    )  # fmt: skip
    torch.manual_seed(0)
    model = TransformerLM(config).to(device).eval()
    # A freshly initialised model's logits are nearly flat, so greedy choices would hinge on rounding;
    # sharpen them so the comparison of outputs across implementations means something.
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    hf_model = to_hf(model, attn_implementation="sdpa").eval()
    hf_model.generation_config.pad_token_id = 0  # no padding happens; silences a warning

    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.prompt_length)
    prompt = torch.randint(0, config.vocab_size, shape, generator=generator).to(device)
    n_new = args.new_tokens

    def with_cache() -> torch.Tensor:
        return generate(model, prompt, n_new, temperature=0, use_cache=True)

    def without_cache() -> torch.Tensor:
        return generate(model, prompt, n_new, temperature=0, use_cache=False)

    @torch.no_grad()
    def transformers_generate() -> torch.Tensor:
        return hf_model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, min_new_tokens=n_new,
            do_sample=False, use_cache=True,
        )  # fmt: skip

    variants = {"llmbook (cache)": with_cache, "llmbook (no cache)": without_cache}
    variants["transformers"] = transformers_generate
    outputs = {name: fn() for name, fn in variants.items()}  # also a warm-up
    for name, out in outputs.items():
        if out.shape != (args.batch_size, args.prompt_length + n_new):
            raise RuntimeError(f"{name} returned shape {tuple(out.shape)}, expected the full length")
    ours, theirs = outputs["llmbook (cache)"].tolist(), outputs["transformers"].tolist()
    agree_with_transformers = [
        _matching_prefix(a[args.prompt_length :], b[args.prompt_length :])
        for a, b in zip(ours, theirs, strict=True)
    ]
    cache_equals_no_cache = torch.equal(outputs["llmbook (cache)"], outputs["llmbook (no cache)"])

    rates = time_interleaved(variants, args.rounds, args.batch_size * n_new, device)
    tokens_per_second, best_tokens_per_second = rates["median"], rates["best"]
    per_cpu_second, samples = rates["per_cpu_second"], rates["all_rounds"]

    def ratios_of(speeds: dict[str, float]) -> dict[str, float]:
        cached = speeds["llmbook (cache)"]
        return {
            "cache_vs_no_cache": cached / speeds["llmbook (no cache)"],
            "cache_vs_transformers": cached / speeds["transformers"],
        }

    ratios, best_ratios = ratios_of(tokens_per_second), ratios_of(best_tokens_per_second)
    cpu_ratios = ratios_of(per_cpu_second)

    results = {
        **run_metadata("sample", device),
        "model_config": config.__dict__,
        "batch_size": args.batch_size,
        "prompt_length": args.prompt_length,
        "new_tokens": n_new,
        "rounds": args.rounds,
        "decoding": "greedy",
        "new_tokens_per_second": tokens_per_second,
        "best_new_tokens_per_second": best_tokens_per_second,
        "new_tokens_per_second_all_rounds": samples,
        "ratios": ratios,
        "best_ratios": best_ratios,
        "new_tokens_per_cpu_second": per_cpu_second,
        "cpu_time_ratios": cpu_ratios,
        "cache_equals_no_cache": cache_equals_no_cache,
        "tokens_agreeing_with_transformers": agree_with_transformers,
        "note": "median and best over interleaved rounds; a shared machine makes absolute numbers noisy",
    }
    print(f"device {results['device']} ({device.type}, {results['threads']} threads), "
          f"torch {torch.__version__}, transformers {results['transformers']}")  # fmt: skip
    print(f"model d_model={config.d_model} n_layers={config.n_layers} vocab={config.vocab_size}; "
          f"batch {args.batch_size}, prompt {args.prompt_length} + {n_new} new tokens, greedy")  # fmt: skip
    for name, value in tokens_per_second.items():
        print(f"  {name:20s} {value:8.1f} new tokens/s (best {best_tokens_per_second[name]:8.1f})")
    for key in ratios:
        print(
            f"  {key:22s} {ratios[key]:.2f}x (best {best_ratios[key]:.2f}x, CPU time {cpu_ratios[key]:.2f}x)"
        )
    print(f"  cache == no cache: {cache_equals_no_cache}; "
          f"tokens agreeing with transformers: {agree_with_transformers} of {n_new}")  # fmt: skip
    save_if_asked(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

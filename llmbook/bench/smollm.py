"""SmolLM2-135M-Instruct from its GGUF file: load time, and greedy generation with the KV cache, for
`llmbook.gguf.load_model` + `llmbook.sample.generate` against transformers loading the same file
(``from_pretrained(folder, gguf_file=...)``) + ``generate``.

    python -m llmbook.bench smollm [--threads 2] [--new-tokens 64] [--rounds 5] [--load-rounds 2]

Loads are timed in alternation (``--load-rounds`` each), generation interleaved round by round with
`time_interleaved`; each number is the median over rounds. The benchmark also reports whether the greedy
tokens of both agree.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from llmbook.bench import run_metadata, time_interleaved, write_results
from llmbook.gguf import load_model, load_tokenizer, smollm2_path
from llmbook.sample import generate

RESULTS = Path(__file__).parent / "results"
PROMPT = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmbook.bench smollm", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--load-rounds", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "smollm.json"), help="results JSON ('' to skip)")
    return parser


def _load_transformers(path: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # the dequantization progress bar would fill the log
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def _time_loads(path: Path, rounds: int) -> tuple[dict[str, float], object, object]:
    seconds: dict[str, list[float]] = {"llmbook": [], "transformers": []}
    loaded: dict[str, object] = {}
    for round_index in range(rounds):
        order = ["llmbook", "transformers"] if round_index % 2 == 0 else ["transformers", "llmbook"]
        for name in order:
            loaded.pop(name, None)  # free the previous copy before timing the next load
            start = time.perf_counter()
            loaded[name] = load_model(path) if name == "llmbook" else _load_transformers(path)
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return medians, loaded["llmbook"], loaded["transformers"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = smollm2_path()
    device = torch.device("cpu")
    load_seconds, model, hf_model = _time_loads(path, args.load_rounds)
    tokenizer = load_tokenizer(path)
    prompt = torch.tensor([tokenizer.encode(PROMPT)])
    n_new = args.new_tokens

    def ours() -> torch.Tensor:
        return generate(model, prompt, n_new, temperature=0)

    @torch.no_grad()
    def theirs() -> torch.Tensor:
        return hf_model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, min_new_tokens=n_new,
            do_sample=False, use_cache=True, pad_token_id=2,
        )  # fmt: skip

    variants = {"llmbook (cache)": ours, "transformers": theirs}
    outputs = {name: fn() for name, fn in variants.items()}  # also a warm-up
    ours_new = outputs["llmbook (cache)"][0, prompt.shape[1] :].tolist()
    theirs_new = outputs["transformers"][0, prompt.shape[1] :].tolist()
    # min_new_tokens makes transformers skip the end token; compare up to where ours would have stopped.
    agree = next((i for i, (a, b) in enumerate(zip(ours_new, theirs_new, strict=True)) if a != b), n_new)
    rates = time_interleaved(variants, args.rounds, n_new, device)
    speed = rates["median"]
    results = {
        **run_metadata("smollm", device),
        "model_file": path.name,
        "prompt_tokens": prompt.shape[1],
        "new_tokens": n_new,
        "rounds": args.rounds,
        "load_rounds": args.load_rounds,
        "load_seconds": load_seconds,
        "load_speedup_vs_transformers": load_seconds["transformers"] / load_seconds["llmbook"],
        "new_tokens_per_second": speed,
        "best_new_tokens_per_second": rates["best"],
        "new_tokens_per_second_all_rounds": rates["all_rounds"],
        "new_tokens_per_cpu_second": rates["per_cpu_second"],
        "generation_ratio_vs_transformers": speed["llmbook (cache)"] / speed["transformers"],
        "best_generation_ratio_vs_transformers": (
            rates["best"]["llmbook (cache)"] / rates["best"]["transformers"]
        ),
        "greedy_tokens_agreeing_with_transformers": agree,
        "note": "median over rounds; a shared machine makes absolute numbers noisy, the ratios less so",
    }
    print(f"device {results['device']} ({results['threads']} threads), torch {torch.__version__}, "
          f"transformers {results['transformers']}")  # fmt: skip
    print(f"  load: llmbook {load_seconds['llmbook']:.1f} s, "
          f"transformers {load_seconds['transformers']:.1f} s "
          f"({results['load_speedup_vs_transformers']:.2f}x)")  # fmt: skip
    for name, value in speed.items():
        print(f"  {name:16s} {value:7.1f} new tokens/s (best {rates['best'][name]:7.1f})")
    print(f"  generation ratio {results['generation_ratio_vs_transformers']:.2f}x; "
          f"greedy tokens agreeing: {agree} of {n_new}")  # fmt: skip
    if args.out:
        write_results(args.out, results)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

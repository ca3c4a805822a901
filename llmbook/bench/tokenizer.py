"""Tokenizer benchmark: `train_bpe` against HF `tokenizers`, `Tokenizer.encode` against `tiktoken`.

    python -m llmbook.bench tokenizer [--repeats N] [--vocab-sizes 1000 8000]
                                      [--long-chars 1000000] [--stream-chars 10000000] [--no-save]

Every measurement runs in a fresh process (so peak memory is that job's own) on Tiny Shakespeare:
training at each vocab size with our `train_bpe` and with HF's `BpeTrainer` (byte-level, GPT-2 split
pattern, fed the corpus line by line, its usual input); encoding the whole corpus with GPT-2's
vocabulary with our `Tokenizer` (cache cleared before each repeat) and with `tiktoken` built from the
same files. Two rows measure text without whitespace, one pre-token however long: `--long-chars`
random lowercase letters encoded whole, and ``"a" * --stream-chars`` streamed through
`Tokenizer.encode_iterable` in 64 KiB strings (ids counted, not kept), against tiktoken encoding the
same text whole (it has no streaming encoder; its peak counts the ids it returns, not the text).
Times are the best of `--repeats` runs; ratios are ours / reference (lower is better), on wall-clock
time and, as a check on a busy machine, on the process's CPU time summed over threads.
Results go to llmbook/bench/results/tokenizer.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import random
import resource
import string
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from llmbook.bench import device_description, write_results

RESULTS = Path(__file__).parent / "results" / "tokenizer.json"
TARGET_RATIO = 5.0
STREAM_STRING_CHARS = 65_536  # the streamed job's input arrives in strings of this many characters


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MB; None where there is no such file."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _start_peak_rss() -> tuple[float, bool]:
    """(baseline MB, whether the peak was reset): Linux resets its peak-RSS mark to the current RSS when
    asked, so the job's peak is not hidden under a higher one from the setup (loading a vocabulary)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        rss = _status_mb("VmRSS")
        if rss is not None:
            return rss, True
    except OSError:
        pass
    return _peak_rss_mb(), False


def _tiktoken_gpt2():
    import tiktoken

    from llmbook import data
    from llmbook.bpe import GPT2_SPLIT_PATTERN
    from llmbook.tokenizer_files import bytes_to_unicode

    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    encoder = json.loads(data.path("gpt2_encoder_json").read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in encoder.items() if tok != "<|endoftext|>"}
    return tiktoken.Encoding(
        name="gpt2_offline",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )


def _random_letters(n_chars: int) -> str:
    rng = random.Random(0)
    return "".join(rng.choices(string.ascii_lowercase, k=n_chars))


def _workload(kind: str, vocab_size: int, text: str) -> Callable[[], object]:
    """The function one job times: training or encoding `text`, ours or the reference library's."""
    if kind == "train_ours":
        from llmbook.bpe import train_bpe

        return lambda: train_bpe(text, vocab_size)
    if kind == "train_hf":
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        lines = text.splitlines(keepends=True)

        def train_hf():
            hf = Tokenizer(models.BPE())
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
            hf.train_from_iterator(lines, trainer)

        return train_hf
    if kind == "encode_ours":
        from llmbook.tokenizer import gpt2_tokenizer

        tokenizer = gpt2_tokenizer()
        tokenizer.encode("x")  # builds the pattern's Unicode tables once per process, outside the timing

        def encode_ours():
            tokenizer._cache.clear()  # measure a first pass over the text, not a warm cache
            tokenizer.encode(text)

        return encode_ours
    if kind == "encode_tiktoken":
        encoding = _tiktoken_gpt2()
        return lambda: encoding.encode_ordinary(text)
    raise ValueError(f"unknown job {kind!r}")


def _stream_workload(kind: str, n_chars: int) -> Callable[[], object]:
    """`"a" * n_chars` in 64 KiB strings through our encode_iterable, or encoded whole by tiktoken."""
    n_strings, last = divmod(n_chars, STREAM_STRING_CHARS)
    if kind == "stream_ours":
        from llmbook.tokenizer import gpt2_tokenizer

        tokenizer = gpt2_tokenizer()
        tokenizer.encode("x")  # builds the pattern's Unicode tables once per process, outside the timing

        def strings():
            yield from ("a" * STREAM_STRING_CHARS for _ in range(n_strings))
            yield "a" * last

        return lambda: sum(1 for _ in tokenizer.encode_iterable(strings()))
    if kind == "stream_tiktoken":
        encoding, text = _tiktoken_gpt2(), "a" * n_chars
        return lambda: encoding.encode_ordinary(text)
    raise ValueError(f"unknown job {kind!r}")


def _job(kind: str, vocab_size: int, repeats: int, n_chars: int = 0) -> dict:
    """Run one measurement in this (fresh) process; return best time and peak memory above baseline.

    `n_chars` > 0 picks the text without whitespace: random letters (long_*), or "a"s (stream_*).
    """
    from llmbook import data

    if kind.startswith("stream_"):
        run, n_bytes = _stream_workload(kind, n_chars), n_chars
    else:
        text = _random_letters(n_chars) if kind.startswith("long_") else data.load_text("tinyshakespeare")
        run = _workload(kind.replace("long_", "encode_"), vocab_size, text)
        n_bytes = len(text.encode("utf-8"))
    baseline, was_reset = _start_peak_rss()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)  # all threads: robust to a busy machine
    return {
        "seconds": min(times),
        "cpu_seconds": min(cpu_times),
        "peak_mb": ((was_reset and _status_mb("VmHWM")) or _peak_rss_mb()) - baseline,
        "bytes": n_bytes,
    }


def _in_fresh_process(kind: str, vocab_size: int, repeats: int, n_chars: int = 0) -> dict:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_job, (kind, vocab_size, repeats, n_chars))


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llmbook.bench tokenizer", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--repeats", type=_positive_int, default=3, help="runs per measurement; the best is kept"
    )
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[1000, 8000])
    parser.add_argument(
        "--long-chars", type=_positive_int, default=1_000_000, help="random letters encoded as one piece"
    )
    parser.add_argument(
        "--stream-chars", type=_positive_int, default=10_000_000, help='"a"s streamed in 64 KiB strings'
    )
    parser.add_argument("--no-save", action="store_true", help="print only, do not write the JSON file")
    return parser.parse_args(argv)


def _header(repeats: int) -> dict:
    import tiktoken
    import tokenizers

    import llmbook

    return {
        "benchmark": "tokenizer",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_description("cpu"),
        "versions": {
            "python": platform.python_version(),
            "llmbook": llmbook.__version__,
            "tiktoken": tiktoken.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "corpus": "tinyshakespeare",
        "repeats": repeats,
        "target_ratio": TARGET_RATIO,
        "train": [],
        "encode": {},
    }


def _compare_training(vocab_size: int, repeats: int) -> dict:
    """`train_bpe` against HF's BpeTrainer at one vocab size: a results row, printed as a table row."""
    ours = _in_fresh_process("train_ours", vocab_size, repeats)
    ref = _in_fresh_process("train_hf", vocab_size, repeats)
    ratio = ours["seconds"] / ref["seconds"]
    print(
        f"{f'train_bpe vocab={vocab_size} vs HF':<28}{ours['seconds']:>9.3f}s{ref['seconds']:>11.3f}s"
        f"{ratio:>7.2f}x{ours['peak_mb']:>10.1f}{ref['peak_mb']:>9.1f}"
    )
    return {
        "vocab_size": vocab_size,
        "ours_seconds": round(ours["seconds"], 4),
        "hf_seconds": round(ref["seconds"], 4),
        "ratio": round(ratio, 3),
        "ours_cpu_seconds": round(ours["cpu_seconds"], 4),
        "hf_cpu_seconds": round(ref["cpu_seconds"], 4),
        "cpu_ratio": round(ours["cpu_seconds"] / ref["cpu_seconds"], 3),
        "ours_peak_mb": round(ours["peak_mb"], 1),
        "hf_peak_mb": round(ref["peak_mb"], 1),
    }


def _compare_encoding(repeats: int) -> dict:
    """`Tokenizer.encode` with GPT-2's vocabulary against tiktoken: a results entry, printed."""
    ours = _in_fresh_process("encode_ours", 0, repeats)
    ref = _in_fresh_process("encode_tiktoken", 0, repeats)
    ours_mbs, ref_mbs = ours["bytes"] / ours["seconds"] / 1e6, ref["bytes"] / ref["seconds"] / 1e6
    ratio = ref_mbs / ours_mbs
    print(
        f"{'encode GPT-2 vs tiktoken':<28}{ours_mbs:>7.2f}MB/s{ref_mbs:>9.2f}MB/s{ratio:>7.2f}x"
        f"{ours['peak_mb']:>10.1f}{ref['peak_mb']:>9.1f}"
    )
    return {
        "vocab": "gpt2",
        "ours_mb_per_s": round(ours_mbs, 3),
        "tiktoken_mb_per_s": round(ref_mbs, 3),
        "ratio": round(ratio, 3),
        "cpu_ratio": round(ours["cpu_seconds"] / ref["cpu_seconds"], 3),
        "ours_peak_mb": round(ours["peak_mb"], 1),
        "tiktoken_peak_mb": round(ref["peak_mb"], 1),
    }


def _compare_long_piece(kind: str, n_chars: int, repeats: int) -> dict:
    """Ours against tiktoken on text without whitespace (`_job`'s long_/stream_ kinds): a results entry."""
    ours = _in_fresh_process(f"{kind}_ours", 0, repeats, n_chars)
    ref = _in_fresh_process(f"{kind}_tiktoken", 0, repeats, n_chars)
    ratio = ours["seconds"] / ref["seconds"]
    label = {"long": f"encode {n_chars:,} letters", "stream": f'stream "a"*{n_chars:,}'}[kind]
    print(
        f"{label:<28}{ours['seconds']:>9.3f}s{ref['seconds']:>11.3f}s{ratio:>7.2f}x"
        f"{ours['peak_mb']:>10.1f}{ref['peak_mb']:>9.1f}"
    )
    return {
        "chars": n_chars,
        "ours_seconds": round(ours["seconds"], 4),
        "tiktoken_seconds": round(ref["seconds"], 4),
        "ratio": round(ratio, 3),
        "cpu_ratio": round(ours["cpu_seconds"] / ref["cpu_seconds"], 3),
        "ours_peak_mb": round(ours["peak_mb"], 1),
        "tiktoken_peak_mb": round(ref["peak_mb"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    results = _header(args.repeats)
    print(f"tokenizer benchmark on Tiny Shakespeare, best of {args.repeats}; ratio = ours / reference\n")
    print(f"{'job':<28}{'ours':>10}{'reference':>12}{'ratio':>8}{'ours MB':>10}{'ref MB':>9}")
    results["train"] = [_compare_training(vocab_size, args.repeats) for vocab_size in args.vocab_sizes]
    results["encode"] = _compare_encoding(args.repeats)
    results["long_piece"] = _compare_long_piece("long", args.long_chars, args.repeats)
    results["stream"] = _compare_long_piece("stream", args.stream_chars, args.repeats)
    # The verdict is judged on the ratios the JSON keeps (rounded to 3 places), every row alike.
    rows = [*results["train"], results["encode"], results["long_piece"], results["stream"]]
    worst = max(row["ratio"] for row in rows)
    verdict = "within" if worst <= TARGET_RATIO else "OUTSIDE"
    print(f"\nworst ratio {worst:.2f}x: {verdict} the {TARGET_RATIO:.0f}x target")
    print(
        "CPU-time ratios (all threads; less sensitive to other load):",
        ", ".join(f"{row['cpu_ratio']:.2f}x" for row in rows),
    )
    print("peak MB = growth of the process's peak resident memory during the job, above its baseline")
    print("(on Linux the peak is reset after setup; elsewhere a setup peak can hide the job's)")
    if not args.no_save:
        write_results(RESULTS, results)
        print(f"wrote {RESULTS}")
    return 0

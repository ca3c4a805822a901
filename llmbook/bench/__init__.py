"""Benchmarks: each module prints ratios against a named reference measured in the same run."""

BENCHMARKS = ("tokenizer", "train", "sample", "kernels", "quality", "smollm", "finetune", "finetune_costs")


def add_model_arguments(parser, *, context_length: int, batch_size: int) -> None:
    """The device, thread and model-shape flags that the train and sample benchmarks share."""
    import torch

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--context-length", type=int, default=context_length)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=batch_size)


def configure_from_args(args):
    """Apply `--threads` and return (torch.device, ModelConfig) from the `add_model_arguments` flags."""
    import torch

    from llmbook.model import ModelConfig

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = ModelConfig(
        vocab_size=args.vocab_size, context_length=args.context_length, d_model=args.d_model,
        n_layers=args.n_layers, n_heads=args.n_heads,
    )  # fmt: skip
    return torch.device(args.device), config


def print_environment(results: dict) -> None:
    """One line from a results header (`run_metadata`): the device, threads and library versions."""
    print(
        f"device {results['device']} ({results['device_type']}, {results['threads']} threads), "
        f"torch {results['torch']}, transformers {results['transformers']}"
    )


def device_description(device) -> str:
    """The GPU's name, or the CPU model and core count (for the results JSON)."""
    import os
    import platform
    from pathlib import Path

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores visible"


def time_interleaved(variants: dict, rounds: int, work_per_call: float, device) -> dict[str, dict]:
    """Call every variant once per round and return its work per second (e.g. tokens/s), per statistic:

    "median" (the typical round), "best" (the round least disturbed by other jobs: timeit's rule of thumb),
    "per_cpu_second" (median work per second of this process's CPU time) and "all_rounds" (every sample).
    The order alternates each round so no variant always runs right after the same neighbour, and a busy
    machine slows all of them alike. A variant must finish its work before returning (GPU work is
    synchronised around each call).
    """
    import statistics
    import time

    import torch

    device = torch.device(device)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(rounds):
        for name in list(variants) if round_index % 2 == 0 else list(reversed(variants)):
            synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            variants[name]()
            synchronize()
            wall[name].append(work_per_call / (time.perf_counter() - start))
            cpu[name].append(work_per_call / (time.process_time() - cpu_start))
    return {
        "median": {name: statistics.median(values) for name, values in wall.items()},
        "best": {name: max(values) for name, values in wall.items()},
        "per_cpu_second": {name: statistics.median(values) for name, values in cpu.items()},
        "all_rounds": wall,
    }


def write_results(path, results: dict) -> None:
    """Write a benchmark's results to `path` as indented JSON (other values as str), making its folder."""
    import json
    from pathlib import Path

    from llmbook.data import atomic_write

    text = json.dumps(results, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_if_asked(path, results: dict) -> None:
    """`write_results` and say so, when a path was given (a benchmark's --out); nothing otherwise."""
    if path:
        write_results(path, results)
        print(f"wrote {path}")


def run_metadata(benchmark: str, device) -> dict:
    """Who measured what, where and when: the header every results JSON starts with."""
    import datetime

    import torch

    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_description(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers_version,
    }

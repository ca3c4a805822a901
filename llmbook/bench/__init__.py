"""Benchmarks: each module prints ratios against a named reference measured in the same run."""

BENCHMARKS = ("tokenizer", "train", "sample", "kernels", "quality")


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


def write_results(path, results: dict) -> None:
    """Write a benchmark's results to `path` as indented JSON (other values as str), making its folder."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")


def run_metadata(benchmark: str, device) -> dict:
    """Who measured what, where and when: the header every results JSON starts with."""
    import datetime

    import torch

    from llmbook.bench.train import device_description

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

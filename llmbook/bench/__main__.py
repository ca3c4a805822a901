"""Entry point: `python -m llmbook.bench NAME [args]` runs benchmark NAME (see `--help`)."""

import importlib
import sys

from llmbook.bench import BENCHMARKS


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m llmbook.bench {" + ",".join(BENCHMARKS) + "} [options]")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"llmbook.bench.{name}")
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())

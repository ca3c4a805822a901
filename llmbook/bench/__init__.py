"""Benchmarks: each module prints ratios against a named reference measured in the same run."""

BENCHMARKS = ("tokenizer", "train", "sample", "kernels", "quality")

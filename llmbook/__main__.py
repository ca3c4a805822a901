"""Command line: `python -m llmbook {prepare,train,sample} ...` (also installed as `llmbook`).

    python -m llmbook prepare --text tinyshakespeare --train-bpe 2048 --out runs/shakespeare/data
    python -m llmbook train --train-data runs/shakespeare/data/train.bin --val-data .../val.bin \\
        --tokenizer runs/shakespeare/data/tokenizer --model.vocab_size 2048 --steps 2000 \\
        --checkpoint-dir runs/shakespeare/ckpt
    torchrun --nproc_per_node=2 -m llmbook train --config run.json        # the same run on 2 processes
    python -m llmbook sample --checkpoint runs/shakespeare/ckpt --prompt "ROMEO:" --top-p 0.9
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def load_tokenizer(spec: str):
    """ "gpt2" (the GPT-2 files via llmbook.data) or a directory written by `Tokenizer.save`."""
    from llmbook.tokenizer import Tokenizer, gpt2_tokenizer

    if spec == "gpt2":
        return gpt2_tokenizer()
    if Path(spec).is_dir():
        return Tokenizer.load(spec)
    raise ValueError(f"tokenizer must be 'gpt2' or a directory written by Tokenizer.save, got {spec!r}")


def _read_text(name_or_path: str) -> str:
    from llmbook import data

    if Path(name_or_path).is_file():
        return Path(name_or_path).read_text(encoding="utf-8")
    return data.load_text(name_or_path)


def main_prepare(args: argparse.Namespace) -> int:
    from llmbook.tokenizer import Tokenizer, train_bpe
    from llmbook.train import prepare_splits, split_text

    text = _read_text(args.text)
    out = Path(args.out)
    if args.train_bpe is not None:
        if args.tokenizer is not None:
            raise ValueError("pass either --tokenizer or --train-bpe, not both")
        # Learn merges on the training part only, so validation text stays unseen.
        train_text, _ = split_text(text, args.val_fraction)
        vocab, merges = train_bpe(train_text, args.train_bpe)
        tokenizer = Tokenizer(vocab, merges)
        tokenizer_spec = str(tokenizer.save(out / "tokenizer"))
    else:
        tokenizer_spec = args.tokenizer or "gpt2"
        tokenizer = load_tokenizer(tokenizer_spec)
    train_path, val_path = prepare_splits(text, tokenizer, out, args.val_fraction)
    print(json.dumps({"train_data": str(train_path), "val_data": str(val_path), "tokenizer": tokenizer_spec}))
    return 0


def main_sample(args: argparse.Namespace) -> int:
    from llmbook.sample import generate
    from llmbook.train import load_model, read_checkpoint_metadata

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.checkpoint, device=device)
    spec = args.tokenizer
    if spec is None:
        bundled = Path(args.checkpoint) / "tokenizer"
        train_config = read_checkpoint_metadata(args.checkpoint)["config"].get("train") or {}
        spec = str(bundled) if bundled.is_dir() else train_config.get("tokenizer")
    if spec is None:
        raise ValueError("the checkpoint does not say which tokenizer it uses; pass --tokenizer")
    tokenizer = load_tokenizer(spec)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    prompt_ids = tokenizer.encode(args.prompt)
    for index in range(args.num_samples):
        ids = generate(
            model, prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, stop_ids=args.stop_id, use_cache=not args.no_cache, generator=generator,
        )  # fmt: skip
        if args.num_samples > 1:
            print(f"--- sample {index + 1} ---")
        print(tokenizer.decode(ids))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from llmbook.train import add_train_arguments

    parser = argparse.ArgumentParser(prog="python -m llmbook", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="tokenize a corpus into train.bin / val.bin (uint16)")
    prepare.add_argument("--text", required=True, help="a llmbook.data name (tinyshakespeare) or a text file")
    prepare.add_argument("--tokenizer", help="'gpt2' (default) or a Tokenizer.save directory")
    prepare.add_argument("--train-bpe", type=int, metavar="VOCAB_SIZE", help="train a byte-level BPE first")
    prepare.add_argument("--out", required=True, help="output directory")
    prepare.add_argument("--val-fraction", type=float, default=0.1)

    train = commands.add_parser("train", help="train a TransformerLM (resumes from --checkpoint-dir)")
    add_train_arguments(train)

    sample = commands.add_parser("sample", help="generate text from a checkpoint")
    sample.add_argument("--checkpoint", required=True, help="checkpoint directory (or .safetensors file)")
    sample.add_argument("--prompt", default="\n")
    sample.add_argument("--max-new-tokens", type=int, default=200)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-k", type=int, default=None)
    sample.add_argument("--top-p", type=float, default=None)
    sample.add_argument(
        "--stop-id", type=int, action="append", default=[], help="stop at this id (repeatable)"
    )
    sample.add_argument("--num-samples", type=int, default=1)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--tokenizer", help="override the checkpoint's tokenizer ('gpt2' or a directory)")
    sample.add_argument("--device", default=None)
    sample.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step")
    return parser


def main(argv: list[str] | None = None) -> int:
    from llmbook.train import main_train

    args = build_parser().parse_args(argv)
    try:
        handler = {"prepare": main_prepare, "train": main_train, "sample": main_sample}[args.command]
        return handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

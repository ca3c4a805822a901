"""Command line: `python -m llmbook {prepare,train,sample,chat,finetune,grade} ...` (also `llmbook`).

    python -m llmbook prepare --text tinyshakespeare --train-bpe 2048 --out runs/shakespeare/data
    python -m llmbook train --train-data runs/shakespeare/data/train.bin --val-data .../val.bin \\
        --tokenizer runs/shakespeare/data/tokenizer --model.vocab_size 2048 --steps 2000 \\
        --checkpoint-dir runs/shakespeare/ckpt
    torchrun --nproc_per_node=2 -m llmbook train --config run.json        # the same run on 2 processes
    python -m llmbook sample --checkpoint runs/shakespeare/ckpt --prompt "ROMEO:" --top-p 0.9
    python -m llmbook chat --temperature 0.7 --top-p 0.9      # SmolLM2-135M-Instruct, offline
    python -m llmbook finetune sft --task add3 --out runs/add3-sft     # LoRA SFT of SmolLM2 (resumable)
    python -m llmbook finetune rl --from runs/add3-sft --out runs/add3-rl   # then GRPO on its adapters
    python -m llmbook chat --adapter runs/add3-rl            # chat with the fine-tuned model
    python -m llmbook grade submissions/ --time-limit 600   # exercise notebooks -> grades.csv, ...

Each subcommand is one `@command(name, help, add_arguments)` over its `run(args) -> exit code`; the
package modules are imported inside `run`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, the function adding its flags, and the function running it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register the decorated `run(args) -> int` as subcommand `name`."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(help, add_arguments, run)
        return run

    return register


def load_tokenizer(spec: str):
    """ "gpt2" (the GPT-2 files via llmbook.data) or a directory written by `Tokenizer.save`."""
    from llmbook.tokenizer import Tokenizer, gpt2_tokenizer

    if spec == "gpt2":
        return gpt2_tokenizer()
    if Path(spec).is_dir():
        return Tokenizer.load(spec)
    raise ValueError(f"tokenizer must be 'gpt2' or a directory written by Tokenizer.save, got {spec!r}")


# ----------------------------------------------------------------------------------------------------
# prepare


def _read_text(name_or_path: str) -> str:
    """The text of a file or llmbook.data resource; a file that is not UTF-8 is a ValueError naming it."""
    from llmbook import data

    if not Path(name_or_path).is_file():
        return data.load_text(name_or_path)
    try:
        return Path(name_or_path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"--text {name_or_path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
            f"{err.start}); convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _integer(text: str) -> int:
    """An argparse type: a whole number written as one ("1e3" and "2.0" are refused, not rounded)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    """An argparse type: a finite real number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", required=True, help="a llmbook.data name (tinyshakespeare) or a text file")
    parser.add_argument("--tokenizer", help="'gpt2' (default) or a Tokenizer.save directory")
    parser.add_argument(
        "--train-bpe", type=_integer, metavar="VOCAB_SIZE", help="train a byte-level BPE first"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--val-fraction", type=_number, default=0.1)


@command("prepare", "tokenize a corpus into train.bin / val.bin (uint16)", add_prepare_arguments)
def main_prepare(args: argparse.Namespace) -> int:
    from llmbook.bpe import train_bpe
    from llmbook.errors import check_int
    from llmbook.tokenizer import Tokenizer
    from llmbook.tokens import MAX_TOKEN_ID, prepare_splits, split_text

    # 256 single bytes at least; at most what a uint16 token file can store.
    check_int("prepare", "train_bpe", args.train_bpe, minimum=256, maximum=MAX_TOKEN_ID + 1, optional=True)
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


# ----------------------------------------------------------------------------------------------------
# train


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for `python -m llmbook train`: a JSON config file and/or one flag per config field."""
    from llmbook.model import ModelConfig
    from llmbook.train_config import TrainConfig

    parser.add_argument("--config", help="JSON file with TrainConfig fields (model fields under 'model')")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":  # a plain switch, with its --no- form: --overwrite, --no-resume
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "betas":
            parser.add_argument(flag, dest=f.name, type=float, nargs=2, default=None)
        elif "str" in str(f.type):  # paths and names stay strings even when they look like numbers
            parser.add_argument(flag, dest=f.name, type=str, default=None)
        else:
            parser.add_argument(flag, dest=f.name, type=_parse_scalar, default=None)
    for f in dataclasses.fields(ModelConfig):
        parser.add_argument("--model." + f.name, dest="model." + f.name, type=_parse_scalar, default=None)


def _parse_scalar(text: str) -> Any:
    """Parse a flag value as JSON (numbers, true/false, null), then as a float ("inf", "1e-3"), else keep
    the raw string; the config's own checks then say what the field expects."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _read_config_file(path: str) -> dict:
    """The JSON object in a --config file (a missing file, bad JSON or a non-object is a ValueError)."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"--config: no such file {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(values, dict):
        raise ValueError(
            f"--config {path} holds a JSON {type(values).__name__}; it must be an object of TrainConfig "
            'fields, e.g. {"train_data": "train.bin", "model": {"vocab_size": 2048}}'
        )
    if not isinstance(values.get("model", {}), dict):
        raise ValueError(f"--config {path}: 'model' must be an object of ModelConfig fields")
    return values


def config_from_args(args: argparse.Namespace):
    """Merge a --config JSON file with flags (flags win) into a TrainConfig."""
    from llmbook.train_config import TrainConfig

    values: dict[str, Any] = _read_config_file(args.config) if args.config else {}
    model_values = dict(values.get("model") or {})
    for name, value in vars(args).items():
        if value is None or name in ("config", "print_config", "command"):
            continue
        if name.startswith("model."):
            model_values[name.removeprefix("model.")] = value
        else:
            values[name] = value
    values["model"] = model_values
    if "train_data" not in values:
        raise ValueError("no training data: pass --train-data FILE (see `python -m llmbook prepare`)")
    return TrainConfig.from_dict(values)


@command("train", "train a TransformerLM (resumes from --checkpoint-dir)", add_train_arguments)
def main_train(args: argparse.Namespace) -> int:
    from llmbook.train import train

    config = config_from_args(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    history = train(config)
    if int(os.environ.get("RANK", "0")) == 0 and history.eval_step:
        print(f"final step {history.eval_step[-1]}: train loss {history.train_loss[-1]:.4f} nats/token")
    return 0


# ----------------------------------------------------------------------------------------------------
# sample


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (or .safetensors file)")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--max-new-tokens", type=_integer, default=200)
    parser.add_argument("--temperature", type=_number, default=1.0)
    parser.add_argument("--top-k", type=_integer, default=None)
    parser.add_argument("--top-p", type=_number, default=None)
    parser.add_argument(
        "--stop-id", type=_integer, action="append", default=[], help="stop at this id (repeatable)"
    )
    parser.add_argument("--num-samples", type=_integer, default=1)
    parser.add_argument("--seed", type=_integer, default=0)
    parser.add_argument("--tokenizer", help="override the checkpoint's tokenizer ('gpt2' or a directory)")
    parser.add_argument(
        "--device", default=None, help="'auto' (default: cuda when available), 'cpu', 'cuda:0'"
    )
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step")


@command("sample", "generate text from a checkpoint", add_sample_arguments)
def main_sample(args: argparse.Namespace) -> int:
    from llmbook.checkpoint import load_model, read_checkpoint_metadata
    from llmbook.distributed import usable_device
    from llmbook.errors import MAX_SEED, check_int
    from llmbook.sample import generate

    check_int("sample", "num_samples", args.num_samples)
    check_int("sample", "seed", args.seed, minimum=0, maximum=MAX_SEED)
    device = usable_device(args.device or "auto")
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


def add_grade_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="folder of exercise notebooks (*.ipynb, searched recursively)")
    parser.add_argument(
        "--out",
        help="where to write grades.csv, summary.csv, hints.csv, messages/ and executed/ "
        "(default: FOLDER/grading, never graded itself)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=600.0,
        help="seconds allowed for all of a notebook's cells together",
    )


@command(
    "grade",
    "run a folder of exercise notebooks, each sandboxed; verdicts judged outside them",
    add_grade_arguments,
)
def main_grade(args: argparse.Namespace) -> int:
    from llmbook.exercises.grade import main_grade as grade_folder

    return grade_folder(args.folder, args.out, args.time_limit)


# ----------------------------------------------------------------------------------------------------
# chat


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a Llama GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--adapter", default=None,
        help="LoRA adapters to load onto the model: a finished `finetune` run folder or its adapter file",
    )  # fmt: skip
    parser.add_argument(
        "--max-length", type=int, default=None,
        help="tokens the conversation's KV cache holds (default: 8192, or the model's context if shorter)",
    )  # fmt: skip


@command("chat", "chat with SmolLM2 (or another Llama GGUF) in the terminal", add_chat_arguments)
def main_chat(args: argparse.Namespace) -> int:
    from llmbook import gguf
    from llmbook.chat import ChatSession, chat_loop, load_chat_template

    file = gguf.read_gguf(args.model or gguf.smollm2_path())
    template = load_chat_template(file)  # a bad template is refused before the model loads
    tokenizer = gguf.load_tokenizer(file)
    if args.adapter is not None:
        from llmbook.finetune import adapter_file, load_finetuned
        from llmbook.lora import merge

        adapters = adapter_file(args.adapter)  # a missing file or unfinished run: refused before loading
    model = gguf.load_model(file.path)
    if args.adapter is not None:
        merge(load_finetuned(adapters, model))  # merged: replies cost what the base model's cost
    name = file.metadata.get("general.name")  # from the file: printed only if it is plain text
    name = name if isinstance(name, str) and name.isprintable() else file.path.name
    print(f"{name}: type a message; Ctrl-C stops a reply, "
          "/reset starts over, Ctrl-D or /quit ends")  # fmt: skip
    session = ChatSession(model, tokenizer, template, system_prompt=args.system, max_length=args.max_length)
    chat_loop(session, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_p=args.top_p, seed=args.seed)  # fmt: skip
    return 0


# ----------------------------------------------------------------------------------------------------
# finetune


def _config_flags(parser: argparse.ArgumentParser, config_class) -> None:
    """One flag per field of an `SFTConfig` / `RLConfig` (default None: the config's own default)."""
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "targets":
            parser.add_argument(
                flag, dest=f.name, default=None, type=lambda text: tuple(text.split(",")),
                help="comma-separated layer names (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)",
            )  # fmt: skip
        elif f.name == "grad_clip":
            parser.add_argument(flag, dest=f.name, default=None, type=_number, help="(0: no clipping)")
        elif "str" in str(f.type):
            parser.add_argument(flag, dest=f.name, type=str, default=None)
        elif "int" in str(f.type):
            parser.add_argument(flag, dest=f.name, type=_integer, default=None)
        else:
            parser.add_argument(flag, dest=f.name, type=_number, default=None)


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    from llmbook.finetune import RLConfig, SFTConfig

    stages = parser.add_subparsers(dest="stage", required=True)
    sft = stages.add_parser("sft", help="LoRA supervised fine-tuning of SmolLM2 on a task's train split")
    rl = stages.add_parser("rl", help="GRPO on the adapters of a finished SFT run (--from)")
    rl.add_argument("--from", dest="start", required=True, help="a finished SFT run folder or adapter file")
    for stage, config_class in ((sft, SFTConfig), (rl, RLConfig)):
        stage.add_argument("--out", required=True, help="the run folder (resumed when it holds this run)")
        stage.add_argument("--threads", type=_integer, default=None, help="torch CPU threads")
        _config_flags(stage, config_class)


@command("finetune", "fine-tune SmolLM2 with LoRA: sft, then rl (resumes from --out)", add_finetune_arguments)
def main_finetune(args: argparse.Namespace) -> int:
    from llmbook.errors import check_int
    from llmbook.finetune import RLConfig, SFTConfig, run_rl, run_sft

    check_int("finetune", "threads", args.threads, optional=True)
    config_class = SFTConfig if args.stage == "sft" else RLConfig
    names = {f.name for f in dataclasses.fields(config_class)}
    values = {name: value for name, value in vars(args).items() if name in names and value is not None}
    if values.get("grad_clip") == 0:
        values["grad_clip"] = None
    config = config_class(**values)  # validated before the model loads
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def show(record: dict) -> None:
        numbers = " ".join(f"{key} {value:.4g}" for key, value in record.items() if key != "step")
        print(f"{args.stage} step {record['step']}/{config.steps}: {numbers}", flush=True)

    if args.stage == "sft":
        result = run_sft(config, args.out, callback=show)
    else:
        result = run_rl(config, args.out, args.start, callback=show)
    summary = {"stage": args.stage, "out": args.out, "adapters": str(result.adapter_file),
               "steps_run": result.steps_run, "steps": config.steps}  # fmt: skip
    print(json.dumps(summary))
    return 0


# ----------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line on stderr (like every other user error) and exit code 2,
    and values such as -1e-45 and -inf read as the negative numbers they are, not as flags."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse's own pattern knows -1 and -.5 only; a value it does not match is taken for a flag.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.I)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """One subparser per registered command."""
    parser = _Parser(prog="python -m llmbook", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        cmd.add_arguments(subparsers.add_parser(name, help=cmd.help))
    return parser


# Function arguments whose flag is not their name with dashes: `generate(stop_ids=...)` is --stop-id.
_ARGUMENT_FLAGS = {"stop_ids": "--stop-id", "prompt_ids": "--prompt"}


def _flag_of(field: str) -> str:
    """The command-line flag of a config field ("max_lr" -> "--max-lr", "n_heads" -> "--model.n_heads")."""
    from llmbook.model import ModelConfig
    from llmbook.train_config import TrainConfig

    if field in _ARGUMENT_FLAGS:
        return _ARGUMENT_FLAGS[field]
    name = field.removeprefix("model.")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if field.startswith("model.") or (
        name not in train_fields and name in {f.name for f in dataclasses.fields(ModelConfig)}
    ):
        return f"--model.{name}"
    return "--" + name.replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A user error (bad flag value, missing or damaged file, a run that diverged)
    is one line on stderr and exit code 2; anything else is a bug and keeps its traceback."""
    from llmbook.errors import ConfigError
    from llmbook.train_config import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except ConfigError as err:
        print(f"error: {_flag_of(err.field)}: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

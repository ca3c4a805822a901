"""The command line answers a user error with one line naming the flag or file and exit code 2 (issue 17)."""

import json

import pytest
import torch
from test_train import _token_files

import llmbook.train
from llmbook.__main__ import main as cli_main

BAD_TRAIN_FLAGS = [
    (["--steps", "abc"], "--steps"),
    (["--steps", "2.5"], "--steps"),
    (["--max-lr", "inf"], "--max-lr"),
    (["--max-lr", "nan"], "--max-lr"),
    (["--max-lr", "-1"], "--max-lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seed", "x"], "--seed"),
    (["--dtype", "float16"], "--dtype"),
    (["--model.n_heads", "3"], "--model.d_model"),
    (["--model.tie_embeddings", "no"], "--model.tie_embeddings"),
    (["--model.kernels", "yes"], "--model.kernels"),
    (["--model.norm_eps", "nan"], "--model.norm_eps"),
    (["--model.d_ff", "64.5"], "--model.d_ff"),
    (["--model.heads", "2"], None),  # argparse: unknown flag
    (["--betas", "0.9"], None),  # argparse: needs two values
]


@pytest.mark.parametrize(("flags", "named"), BAD_TRAIN_FLAGS)
def test_a_bad_train_flag_is_one_line_naming_it_and_exit_code_2(tmp_path, capsys, flags, named):
    train_path, _ = _token_files(tmp_path)
    argv = ["train", "--train-data", str(train_path), "--no-progress", "--print-config", *flags]
    try:
        code = cli_main(argv)
    except SystemExit as exit:  # argparse's own errors: usage line, exit 2, no traceback
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    if named is not None:
        assert err.startswith(f"error: {named}: ") and err.count("\n") == 1


def test_a_json_list_as_config_names_the_file(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(["train_data", "x.bin"]))
    assert cli_main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "JSON list" in err and err.count("\n") == 1


def test_a_config_file_with_bad_json_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text('{"train_data": "x.bin",\n "steps": }')
    assert cli_main(["train", "--config", str(config)]) == 2
    assert f"{config}, line 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--config", "no/such/run.json"],
        ["train", "--train-data", "no/such/train.bin", "--no-progress"],
        ["sample", "--checkpoint", "no/such/checkpoint"],
        ["prepare", "--text", "no-such-corpus", "--out", "out"],
    ],
)
def test_a_missing_file_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch):
    train_path, _ = _token_files(tmp_path)

    def broken(config, callback=None):
        raise RuntimeError("a bug inside the training loop")

    monkeypatch.setattr(llmbook.train, "train", broken)
    with pytest.raises(RuntimeError, match="a bug inside"):
        cli_main(["train", "--train-data", str(train_path), "--model.vocab_size", "64"])


def test_llmbook_cache_pointing_at_a_file_names_the_setting(tmp_path, monkeypatch, capsys):
    not_a_folder = tmp_path / "cache.txt"
    not_a_folder.write_text("")
    monkeypatch.setenv("LLMBOOK_CACHE", str(not_a_folder))
    monkeypatch.delenv("LLMBOOK_DATA", raising=False)
    from llmbook.data import cache_dir

    with pytest.raises(NotADirectoryError, match=r"\$LLMBOOK_CACHE.*cache.txt.*not a folder"):
        cache_dir()
    assert cli_main(["prepare", "--text", "tinyshakespeare", "--out", str(tmp_path / "o")]) == 2
    assert "$LLMBOOK_CACHE" in capsys.readouterr().err


# ---- issue 29: every numeric flag of prepare/train/sample at its boundaries --------------------------

# The tiny run the probes start from; each probe adds the flags it tests (the last value of a flag wins).
TINY_TRAIN = ["--no-progress", "--model.vocab_size", "64", "--model.context_length", "8", "--model.d_model",
              "16", "--model.n_layers", "1", "--model.n_heads", "2", "--batch-size", "4", "--steps", "2",
              "--warmup-steps", "1"]  # fmt: skip

TRAIN_PROBES = [
    (["--seed", "1e20"], "--seed"),
    (["--seed", str(10**20)], "--seed"),
    (["--seed", str(2**63)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--device", "banana"], "--device"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device"),
    (["--steps", "5", "--warmup-steps", "10"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--steps", "1e-45"], "--steps"),
    (["--batch-size", str(10**9)], "--batch-size"),
    (["--batch-size", "-1"], "--batch-size"),
    (["--max-lr", "0"], "--max-lr"),
    (["--max-lr", "1e20", "--min-lr", "1e21"], "--min-lr"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--cosine-steps", "0"], "--cosine-steps"),
    (["--eval-interval", "0"], "--eval-interval"),
    (["--eval-batches", "nan"], "--eval-batches"),
    (["--checkpoint-interval", "-1"], "--checkpoint-interval"),
    (["--bytes-per-token", "inf"], "--bytes-per-token"),
    (["--weight-decay", "-1e-45"], "--weight-decay"),
    (["--eps", "0"], "--eps"),
    (["--grad-clip", "0"], "--grad-clip"),
    (["--muon-lr", "-inf"], "--muon-lr"),
    (["--muon-momentum", "1"], "--muon-momentum"),
    (["--betas", "0.9", "nan"], "--betas"),
    (["--model.vocab_size", "10"], "--model.vocab_size"),  # the token files hold id 39
    (["--model.vocab_size", str(10**20)], "--model.vocab_size"),
    (["--model.context_length", str(2**40)], "--model.context_length"),
    (["--model.d_model", str(10**11)], "--model.d_model"),
    (["--model.n_layers", str(10**11)], "--model.n_layers"),
    (["--model.d_ff", str(10**11)], "--model.d_ff"),
    (["--model.n_heads", "0"], "--model.n_heads"),
    (["--model.dropout", "1"], "--model.dropout"),
    (["--model.rope_theta", "-1e-45"], "--model.rope_theta"),
]


def _exit_code(argv) -> int:
    try:
        return cli_main(argv)
    except SystemExit as exit:  # argparse's errors
        return exit.code


def _one_named_line(capsys, code, flag):
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"error: {flag}: ") or err.startswith(f"error: argument {flag}: "), err


@pytest.mark.parametrize(("flags", "flag"), TRAIN_PROBES)
def test_train_probe_is_one_line_naming_the_flag(tmp_path, capsys, flags, flag):
    train_path, _ = _token_files(tmp_path)
    argv = ["train", "--train-data", str(train_path), "--checkpoint-dir", str(tmp_path / "ck"), *TINY_TRAIN]
    _one_named_line(capsys, _exit_code(argv + flags), flag)
    assert not (tmp_path / "ck" / "checkpoint.safetensors").exists()


def test_overwrite_is_a_plain_switch_like_resume(tmp_path, capsys):
    train_path, _ = _token_files(tmp_path)
    argv = ["train", "--train-data", str(train_path), "--checkpoint-dir", str(tmp_path / "ck"), *TINY_TRAIN]
    assert cli_main(argv) == 0
    assert cli_main(argv + ["--no-resume", "--steps", "3"]) == 2  # would replace the first run
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli_main(argv + ["--no-resume", "--overwrite", "--steps", "3"]) == 0


def test_train_on_a_text_file_is_refused_naming_it(tmp_path, capsys):
    text = tmp_path / "tinyshakespeare.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 100)
    argv = ["train", "--train-data", str(text), *TINY_TRAIN, "--model.vocab_size", "50257"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(text) in err and "holds text, not token ids" in err


def test_a_token_file_without_its_sidecar_needs_allow_missing_sidecar(tmp_path, capsys):
    train_path, _ = _token_files(tmp_path)
    (tmp_path / "train.bin.json").unlink()
    argv = ["train", "--train-data", str(train_path), *TINY_TRAIN]
    assert cli_main(argv) == 2
    assert "--allow-missing-sidecar" in capsys.readouterr().err
    assert cli_main(argv + ["--allow-missing-sidecar"]) == 0


@pytest.fixture(scope="module")
def sample_checkpoint(tmp_path_factory):
    """A tiny trained checkpoint with a byte-level tokenizer beside it (vocabulary 256)."""
    from llmbook.bpe import train_bpe
    from llmbook.tokenizer import Tokenizer
    from llmbook.tokens import prepare_tokens

    folder = tmp_path_factory.mktemp("sample")
    tokenizer = Tokenizer(*train_bpe("hello world, hello sampler", 256))
    tokenizer.save(folder / "tokenizer")
    prepare_tokens("hello world, hello sampler " * 40, tokenizer, folder / "train.bin")
    argv = ["train", "--train-data", str(folder / "train.bin"), "--checkpoint-dir", str(folder / "ck"),
            "--tokenizer", str(folder / "tokenizer"), *TINY_TRAIN, "--model.vocab_size", "256"]  # fmt: skip
    assert cli_main(argv) == 0
    return folder / "ck"


SAMPLE_PROBES = [
    (["--seed", "1e20"], "--seed"),
    (["--seed", str(10**20)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--stop-id", "1e20"], "--stop-id"),
    (["--stop-id", str(10**20)], "--stop-id"),
    (["--stop-id", "256"], "--stop-id"),
    (["--stop-id", "-1"], "--stop-id"),
    (["--device", "banana"], "--device"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device"),
    (["--temperature", "-1e-45"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--max-new-tokens", str(10**12)], "--max-new-tokens"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--max-new-tokens", "1e3"], "--max-new-tokens"),
    (["--top-k", "0"], "--top-k"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "nan"], "--top-p"),
    (["--num-samples", "0"], "--num-samples"),
    (["--prompt", ""], "--prompt"),
]


@pytest.mark.parametrize(("flags", "flag"), SAMPLE_PROBES)
def test_sample_probe_is_one_line_naming_the_flag(sample_checkpoint, capsys, flags, flag):
    code = _exit_code(["sample", "--checkpoint", str(sample_checkpoint), "--max-new-tokens", "4", *flags])
    _one_named_line(capsys, code, flag)


@pytest.mark.parametrize("temperature", ["1e-45", "5e-324", "1e-300", "1e300", "0"])
def test_sample_at_extreme_temperatures_still_samples(sample_checkpoint, capsys, temperature):
    argv = ["sample", "--checkpoint", str(sample_checkpoint), "--max-new-tokens", "5", "--prompt", "hello"]
    assert cli_main(argv + ["--temperature", temperature]) == 0
    assert capsys.readouterr().out.startswith("hello")


PREPARE_PROBES = [
    (["--val-fraction", "0"], "--val-fraction"),
    (["--val-fraction", "1"], "--val-fraction"),
    (["--val-fraction", "1e-45"], "--val-fraction"),  # the validation text would be empty
    (["--val-fraction", "0.9999999"], "--val-fraction"),  # the training text would be empty
    (["--val-fraction", "nan"], "--val-fraction"),
    (["--train-bpe", "0"], "--train-bpe"),
    (["--train-bpe", "255"], "--train-bpe"),
    (["--train-bpe", str(10**20)], "--train-bpe"),
    (["--train-bpe", "1e20"], "--train-bpe"),
]


@pytest.mark.parametrize(("flags", "flag"), PREPARE_PROBES)
def test_prepare_probe_is_one_line_naming_the_flag(tmp_path, capsys, flags, flag):
    text = tmp_path / "small.txt"
    text.write_text("the cat sat on the mat. " * 100)
    code = _exit_code(["prepare", "--text", str(text), "--out", str(tmp_path / "o"), *flags])
    _one_named_line(capsys, code, flag)


def test_prepare_on_a_file_that_is_not_utf8_names_the_file(tmp_path, capsys):
    text = tmp_path / "latin1.txt"
    text.write_bytes("café au lait\n".encode("latin-1") * 50)
    assert cli_main(["prepare", "--text", str(text), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(text) in err and "not UTF-8" in err

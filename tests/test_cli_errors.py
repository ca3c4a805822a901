"""The command line answers a user error with one line naming the flag or file and exit code 2 (issue 17)."""

import json

import pytest
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

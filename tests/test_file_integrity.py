"""Loading a file checks it is what it claims to be: checkpoints, token files, tokenizer files (issue 17)."""

import json
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

from llmbook import data
from llmbook.checkpoint import CHECKPOINT_FILE, load_checkpoint, load_model, save_checkpoint
from llmbook.errors import CorruptFileError, RunMismatchError
from llmbook.model import ModelConfig, TransformerLM
from llmbook.tokenizer import Tokenizer
from llmbook.tokens import load_tokens, prepare_tokens

SMALL = dict(vocab_size=64, context_length=16, d_model=16, n_layers=2, n_heads=2)


def _saved(tmp_path, **overrides):
    torch.manual_seed(0)
    config = ModelConfig(**(SMALL | overrides))
    return save_checkpoint(tmp_path / "ck", TransformerLM(config), step=3, config=config)


def _flip_byte(file, offset):
    raw = bytearray(file.read_bytes())
    raw[offset] ^= 0x01
    file.write_bytes(bytes(raw))


# ---- checkpoints ---------------------------------------------------------------------------------


def test_a_checkpoint_with_one_flipped_tensor_byte_is_refused(tmp_path):
    file = _saved(tmp_path)
    size = file.stat().st_size
    for offset in (size - 1, size - 1000, size // 2 + 17):  # inside the tensor data, after the header
        _saved(tmp_path)
        _flip_byte(file, offset)
        with pytest.raises(CorruptFileError, match=r"tensor data does not match.*checksum") as caught:
            load_model(tmp_path / "ck")
        assert str(file) in str(caught.value)


def test_a_checkpoint_with_a_damaged_step_in_its_metadata_is_refused(tmp_path):
    file = _saved(tmp_path)
    raw = file.read_bytes()
    file.write_bytes(raw.replace(b'\\"step\\": 3', b'\\"step\\": 9', 1))
    assert file.read_bytes() != raw
    with pytest.raises(CorruptFileError, match="metadata_sha256"):
        load_checkpoint(file)


@pytest.mark.parametrize("difference", [dict(n_heads=4), dict(positions="learned"), dict(norm="layer")])
def test_a_checkpoint_is_refused_by_a_same_shaped_model_with_another_config(tmp_path, difference):
    _saved(tmp_path)
    field, value = next(iter(difference.items()))
    other = TransformerLM(ModelConfig(**(SMALL | difference)))
    with pytest.raises(RunMismatchError, match=rf"ck/{CHECKPOINT_FILE}.*model\.{field}=.*model\.{field}="):
        load_checkpoint(tmp_path / "ck", model=other)


def test_a_checkpoint_loads_into_a_model_differing_only_in_dropout(tmp_path):
    _saved(tmp_path)
    load_checkpoint(tmp_path / "ck", model=TransformerLM(ModelConfig(**SMALL, dropout=0.1)))


def test_a_truncated_checkpoint_names_the_path_and_what_it_should_be(tmp_path):
    file = _saved(tmp_path)
    raw = file.read_bytes()
    for cut in (4, 100, len(raw) // 2, len(raw) - 1):
        file.write_bytes(raw[:cut])
        with pytest.raises(CorruptFileError) as caught:
            load_model(file)
        message = str(caught.value)
        assert str(file) in message and "save_checkpoint" in message


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_given_as_a_checkpoint_says_pickles_are_never_loaded(tmp_path, writer):
    file = tmp_path / "model.safetensors"
    state = TransformerLM(ModelConfig(**SMALL)).state_dict()
    if writer == "pickle":
        file.write_bytes(pickle.dumps({"step": 1}))
    else:
        torch.save(state, file)
    with pytest.raises(CorruptFileError, match=r"pickle.*never loads") as caught:
        load_model(file)
    assert str(file) in str(caught.value)


# ---- token files ---------------------------------------------------------------------------------


def _token_file(tmp_path, n=1000):
    ids = np.random.default_rng(0).integers(1, 500, size=n)
    prepare_tokens(ids, None, tmp_path / "t.bin")
    return tmp_path / "t.bin"


def test_a_token_file_cut_short_against_its_sidecar_is_refused(tmp_path):
    path = _token_file(tmp_path)
    path.write_bytes(path.read_bytes()[:1200])
    with pytest.raises(CorruptFileError, match=r"holds 600 tokens but its sidecar t.bin.json says 1000"):
        load_tokens(path)


def test_an_int32_token_file_is_not_read_as_uint16(tmp_path):
    path = tmp_path / "ids32.bin"
    np.random.default_rng(0).integers(0, 500, size=1000).astype(np.int32).tofile(path)
    with pytest.raises(CorruptFileError, match=r"ids32.bin looks like int32"):
        load_tokens(path)


def test_a_sidecar_saying_int32_is_refused(tmp_path):
    path = _token_file(tmp_path)
    sidecar = tmp_path / "t.bin.json"
    sidecar.write_text(json.dumps(json.loads(sidecar.read_text()) | {"dtype": "int32"}))
    with pytest.raises(CorruptFileError, match="int32"):
        load_tokens(path)


@pytest.mark.parametrize(("content", "problem"), [(b"", "is empty"), (b"\x01\x00\x02", "3 bytes")])
def test_empty_or_odd_sized_token_files_name_the_file(tmp_path, content, problem):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(CorruptFileError, match=rf"bad.bin.*{problem}|bad.bin {problem}"):
        load_tokens(path)


def test_a_token_sidecar_with_broken_json_names_it(tmp_path):
    path = _token_file(tmp_path)
    (tmp_path / "t.bin.json").write_text("{")
    with pytest.raises(CorruptFileError, match=r"t.bin.json is not valid JSON"):
        load_tokens(path)


# ---- tokenizer files -----------------------------------------------------------------------------


def test_a_truncated_gpt2_vocab_bpe_is_refused_at_every_cut(tmp_path):
    payload = data.path("gpt2_vocab_bpe").read_bytes()
    encoder = data.path("gpt2_encoder_json")
    cuts = random.Random(0).sample(range(1, len(payload) - 1), 20)
    for cut in cuts:
        (tmp_path / "vocab.bpe").write_bytes(payload[:cut])
        with pytest.raises((CorruptFileError, ValueError)) as caught:
            Tokenizer.from_gpt2_files(tmp_path / "vocab.bpe", encoder)
        assert "vocab.bpe" in str(caught.value)


def test_a_saved_tokenizer_with_a_half_empty_merges_file_is_refused(tmp_path):
    from llmbook.bpe import train_bpe

    vocab, merges = train_bpe("the cat sat on the mat with the hat " * 20, 300)
    Tokenizer(vocab, merges).save(tmp_path / "tok")
    shutil.copytree(tmp_path / "tok", tmp_path / "half")
    lines = (tmp_path / "tok" / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    (tmp_path / "half" / "vocab.bpe").write_text("\n".join(lines[: len(lines) // 2]), encoding="utf-8")
    Tokenizer.load(tmp_path / "tok")  # the intact copy loads
    with pytest.raises(CorruptFileError, match=r"half/vocab.bpe has \d+ merges, but \d+ tokens"):
        Tokenizer.load(tmp_path / "half")


def test_a_merges_file_without_its_header_is_refused(tmp_path):
    from llmbook.bpe import train_bpe

    vocab, merges = train_bpe("the cat sat on the mat " * 20, 270)
    Tokenizer(vocab, merges).save(tmp_path / "tok")
    merges_file = tmp_path / "tok" / "vocab.bpe"
    merges_file.write_text(merges_file.read_text(encoding="utf-8").split("\n", 1)[1], encoding="utf-8")
    with pytest.raises(CorruptFileError, match=r"line 1: expected the '#version: 0.2' header"):
        Tokenizer.load(tmp_path / "tok")


# ---- edited files: a sidecar or checkpoint metadata that breaks its schema (issue 29) -----------------


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ({"n_bytes": "54000"}, "'n_bytes' must be int or null, got '54000'"),
        ({"n_tokens": "1000"}, "'n_tokens' must be int, got '1000'"),
        ({"n_tokens": True}, "'n_tokens' must be int"),
        ({"n_tokens": 1000.0}, "'n_tokens' must be int"),
        ({"n_tokens": -5}, "'n_tokens' must be >= 1"),
        ({"n_bytes": 0}, "'n_bytes' must be >= 1"),
        ({"vocab_size": 10**6}, "'vocab_size' must be >= 1 and <= 65536"),
        ({"dtype": 16}, "'dtype' must be str"),
        ({"n_tokns": 1000}, r"unknown field\(s\) \['n_tokns'\]"),
    ],
)
def test_an_edited_sidecar_names_the_file_and_the_field(tmp_path, edit, named):
    path = _token_file(tmp_path)
    sidecar = tmp_path / "t.bin.json"
    sidecar.write_text(json.dumps(json.loads(sidecar.read_text()) | edit))
    with pytest.raises(CorruptFileError, match=rf"t.bin.json.*{named}"):
        load_tokens(path)


def test_a_sidecar_without_n_tokens_is_refused(tmp_path):
    path = _token_file(tmp_path)
    sidecar = tmp_path / "t.bin.json"
    sidecar.write_text(json.dumps({"dtype": "uint16"}))
    with pytest.raises(CorruptFileError, match=r"t.bin.json lacks the field 'n_tokens'"):
        load_tokens(path)


def test_a_token_file_without_its_sidecar_is_refused_unless_allowed(tmp_path):
    path = _token_file(tmp_path)
    (tmp_path / "t.bin.json").unlink()
    with pytest.raises(CorruptFileError, match=r"t.bin has no sidecar t.bin.json.*allow_missing_sidecar"):
        load_tokens(path)
    assert len(load_tokens(path, allow_missing_sidecar=True)) == 1000


@pytest.mark.parametrize("text", ["First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40,
                                  "Ça déjà vu, naïve façade — 日本語のテキスト。\n" * 40])  # fmt: skip
def test_text_given_as_a_token_file_is_refused_even_when_a_missing_sidecar_is_allowed(tmp_path, text):
    path = tmp_path / "input.txt"
    raw = text.encode("utf-8")
    path.write_bytes(raw[: len(raw) // 2 * 2])  # an even size, as a uint16 file would have
    for allow in (False, True):
        with pytest.raises(CorruptFileError, match=r"input.txt holds text, not token ids.*llmbook prepare"):
            load_tokens(path, allow_missing_sidecar=allow)


def test_real_token_ids_are_not_mistaken_for_text(tmp_path):
    from llmbook.tokenizer import gpt2_tokenizer

    text = data.load_text("tinyshakespeare")[:20000]
    prepare_tokens(text, gpt2_tokenizer(), tmp_path / "gpt2.bin")
    assert len(load_tokens(tmp_path / "gpt2.bin")) > 1000


def _rewrite_metadata(file, edit) -> None:
    """Edit a checkpoint's metadata with `edit(metadata)` and recompute its checksum, as a determined
    editor would: the file then passes every checksum."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from llmbook.checkpoint import metadata_checksum

    with safe_open(file, framework="pt") as handle:
        metadata = json.loads(handle.metadata()["llmbook"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    edit(metadata)
    metadata["metadata_sha256"] = metadata_checksum(metadata)
    save_file(tensors, file, metadata={"llmbook": json.dumps(metadata)})


def _set(path: str, value):
    """An edit setting metadata[path] ("config.model.d_ff") to value."""

    def edit(metadata):
        *parents, last = path.split(".")
        target = metadata
        for key in parents:
            target = target[key]
        target[last] = value

    return edit


def _history(**fields):
    """An edit giving the checkpoint a history (an empty run's) with `fields` changed or added."""
    from llmbook.train_config import History

    return _set("history", History().to_dict() | fields)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (_set("config.model.heads", 4), r"config.model has unknown key\(s\) \['heads'\]"),
        (_set("aliases", ["lm_head.weight"]), "aliases must be a JSON object"),
        (_set("aliases", {"lm_head.weight": "nope"}), r"aliases.lm_head.weight names the tensor 'nope'"),
        (_history(bogus=[]), r"history has unknown key\(s\) \['bogus'\]"),
        (_history(loss="1.5"), "history.loss must be a list"),
        (_history(loss=["1.5"]), "history.loss must hold numbers"),
        (_set("step", "3"), "step must be an integer >= 0"),
        (_set("step", -1), "step must be an integer >= 0"),
        (_set("config.model.d_model", "16"), r"config.model.d_model ModelConfig.d_model must be an integer"),
        (_set("config.model.n_heads", 0), r"config.model.n_heads ModelConfig.n_heads must be >= 1"),
        (_set("config", [1, 2]), "config must be a JSON object"),
        (_set("data_sha256", 5), "data_sha256 must be a JSON object"),
    ],
)
def test_checkpoint_metadata_edited_with_checksums_recomputed_is_refused_naming_the_field(
    tmp_path, edit, named
):
    file = _saved(tmp_path, tie_embeddings=True)
    _rewrite_metadata(file, edit)
    with pytest.raises(CorruptFileError, match=named) as caught:
        load_model(tmp_path / "ck")
    assert str(file) in str(caught.value)


def test_checkpoint_metadata_edited_to_a_huge_context_is_refused_before_any_allocation(tmp_path):
    file = _saved(tmp_path)
    _rewrite_metadata(file, _set("config.model.context_length", 2**40))
    with pytest.raises(ValueError, match=r"context_length=1099511627776.*needs at least .* GiB.*free"):
        load_model(tmp_path / "ck")


def test_checkpoint_metadata_edited_to_another_shape_is_refused_as_damaged(tmp_path):
    file = _saved(tmp_path)
    _rewrite_metadata(file, _set("config.model.vocab_size", 128))
    with pytest.raises(CorruptFileError, match=r"tensors do not fit the model its config describes"):
        load_model(tmp_path / "ck")

"""Fine-tuning runs (llmbook.finetune) on a tiny random model with SmolLM2's tokenizer and chat template:
SFT learns, runs resume bit-equal, a folder of another run is refused, RL moves only the adapters, and
the command line answers mistakes with one line."""

import dataclasses

import pytest
import torch
from conftest import tiny_model

from llmbook import gguf
from llmbook.__main__ import main as cli_main
from llmbook.errors import ConfigError, OverwriteError, RunMismatchError
from llmbook.finetune import (
    ADAPTER_FILE,
    RUN_FILE,
    RLConfig,
    SFTConfig,
    read_run,
    run_rl,
    run_sft,
)
from llmbook.lora import adapter_state, lora_layers

TINY_SFT = SFTConfig(task="add2", steps=6, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1, rank=4,
                     alpha=8.0, save_every=2)  # fmt: skip
TINY_RL = RLConfig(task="add2", steps=4, prompts_per_step=2, group_size=4, max_new_tokens=4, lr=1e-2,
                   kl_coef=0.1, save_every=2)  # fmt: skip


def longer_is_better(_problem, reply: str, _finished: bool) -> float:
    """A toy reward a random model earns unevenly, so its groups have advantages to follow."""
    return len(reply) / 20


@pytest.fixture(scope="module")
def smollm2_text():
    file = gguf.read_gguf(gguf.smollm2_path())
    return gguf.load_tokenizer(file), file.metadata["tokenizer.chat_template"]


def fresh(smollm2_text):
    """A tiny model with SmolLM2's vocabulary (the same weights each call), its tokenizer and template."""
    tokenizer, template = smollm2_text
    return tiny_model(vocab_size=len(tokenizer.vocab), context_length=128), tokenizer, template


class Crash(Exception):
    pass


def crash_at(step: int):
    def callback(record):
        if record["step"] == step:
            raise Crash

    return callback


def test_sft_loss_decreases_on_a_tiny_task(smollm2_text, tmp_path):
    config = dataclasses.replace(TINY_SFT, steps=12, save_every=12)
    losses = run_sft(config, tmp_path / "run", *fresh(smollm2_text)).history["loss"]
    # A random model starts near ln(vocab) = 10.8 nats; its frozen 32-wide tied embedding bounds how far
    # rank-4 adapters can take it, but every batch is new, so a drop is learning, not memorising.
    assert sum(losses[-3:]) / 3 < losses[0] - 0.2, losses


def test_an_interrupted_sft_run_resumes_to_the_same_adapters(smollm2_text, tmp_path):
    whole = run_sft(TINY_SFT, tmp_path / "whole", *fresh(smollm2_text))
    with pytest.raises(Crash):
        run_sft(TINY_SFT, tmp_path / "cut", *fresh(smollm2_text), callback=crash_at(5))
    assert read_run(tmp_path / "cut").step == 4  # the failed run kept its last good checkpoint
    assert not (tmp_path / "cut" / ADAPTER_FILE).exists()
    resumed = run_sft(TINY_SFT, tmp_path / "cut", *fresh(smollm2_text))
    assert resumed.steps_run == 2
    for name, tensor in adapter_state(whole.model).items():
        assert torch.equal(tensor, adapter_state(resumed.model)[name]), name
    assert resumed.history["loss"] == whole.history["loss"]


def test_an_interrupted_rl_run_resumes_to_the_same_adapters(smollm2_text, tmp_path):
    sft = run_sft(dataclasses.replace(TINY_SFT, steps=2), tmp_path / "sft", *fresh(smollm2_text))
    whole = run_rl(
        TINY_RL, tmp_path / "whole", sft.adapter_file, *fresh(smollm2_text), reward=longer_is_better
    )
    with pytest.raises(Crash):
        run_rl(TINY_RL, tmp_path / "cut", sft.adapter_file, *fresh(smollm2_text), callback=crash_at(3),
               reward=longer_is_better)  # fmt: skip
    resumed = run_rl(
        TINY_RL, tmp_path / "cut", tmp_path / "sft", *fresh(smollm2_text), reward=longer_is_better
    )
    assert resumed.steps_run == 2
    # The sampling generator's state is part of the checkpoint: the resumed run draws the same answers.
    assert resumed.history["reward"] == whole.history["reward"]
    for name, tensor in adapter_state(whole.model).items():
        assert torch.equal(tensor, adapter_state(resumed.model)[name]), name


def test_a_run_folder_made_with_another_config_is_refused_and_left_as_it_was(smollm2_text, tmp_path):
    short = dataclasses.replace(TINY_SFT, steps=2)
    run_sft(short, tmp_path / "run", *fresh(smollm2_text))
    before = (tmp_path / "run" / RUN_FILE).read_bytes()
    with pytest.raises(RunMismatchError, match="lr: 0.01 there, 0.02 here"):
        run_sft(dataclasses.replace(short, lr=2e-2), tmp_path / "run", *fresh(smollm2_text))
    run_sft(short, tmp_path / "start", *fresh(smollm2_text))
    with pytest.raises(RunMismatchError, match="holds a sft run, not a rl run"):
        run_rl(TINY_RL, tmp_path / "run", tmp_path / "start", *fresh(smollm2_text))
    assert (tmp_path / "run" / RUN_FILE).read_bytes() == before
    # A folder whose adapters did not come from a run of this module is not overwritten either.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ADAPTER_FILE).write_bytes(b"someone's adapters")
    with pytest.raises(OverwriteError):
        run_sft(short, tmp_path / "other", *fresh(smollm2_text))
    assert (tmp_path / "other" / ADAPTER_FILE).read_bytes() == b"someone's adapters"


def test_a_finished_run_returns_at_once_without_training(smollm2_text, tmp_path):
    short = dataclasses.replace(TINY_SFT, steps=2)
    first = run_sft(short, tmp_path / "run", *fresh(smollm2_text))
    before = (tmp_path / "run" / RUN_FILE).read_bytes()
    seen = []
    again = run_sft(short, tmp_path / "run", *fresh(smollm2_text), callback=seen.append)
    assert again.steps_run == 0 and seen == []
    assert (tmp_path / "run" / RUN_FILE).read_bytes() == before
    for name, tensor in adapter_state(first.model).items():
        assert torch.equal(tensor, adapter_state(again.model)[name]), name


def test_rl_updates_only_the_adapters(smollm2_text, tmp_path):
    sft = run_sft(dataclasses.replace(TINY_SFT, steps=2), tmp_path / "sft", *fresh(smollm2_text))
    model, tokenizer, template = fresh(smollm2_text)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    started = {name: t.clone() for name, t in adapter_state(sft.model).items()}
    one_step = dataclasses.replace(TINY_RL, steps=1)
    result = run_rl(
        one_step, tmp_path / "rl", sft.adapter_file, model, tokenizer, template, reward=longer_is_better
    )
    for name, param in result.model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    after = adapter_state(result.model)
    assert any(not torch.equal(after[name], started[name]) for name in started)
    assert set(result.history) >= {"reward", "completion_length", "kl", "clipped_fraction", "loss"}
    assert all(not layer.merged for layer in lora_layers(result.model).values())


def test_configs_refuse_bad_values_naming_the_field():
    for field, value in [("rank", 0), ("lr", 0.0), ("task", "add7"), ("targets", ("qproj",)),
                         ("warmup_steps", 99), ("min_lr", 1.0)]:  # fmt: skip
        with pytest.raises(ConfigError) as error:
            SFTConfig(**{field: value})
        assert error.value.field == field
    for field, value in [("group_size", 1), ("normalisation", "mean"), ("clip_epsilon", 1.5)]:
        with pytest.raises(ConfigError) as error:
            RLConfig(**{field: value})
        assert error.value.field == field


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["finetune", "sft", "--out", "RUN", "--rank", "0"], "--rank"),
        (["finetune", "sft", "--out", "RUN", "--task", "add7"], "--task"),
        (["finetune", "sft", "--out", "RUN", "--steps", "2.5"], "--steps"),
        (["finetune", "rl", "--out", "RUN", "--group-size", "1", "--from", "SFT"], "--group-size"),
        (["finetune", "rl", "--out", "RUN"], "--from"),
        (["finetune", "sft"], "--out"),
        (["finetune", "dpo", "--out", "RUN"], "dpo"),
    ],
)
def test_finetune_flag_errors_are_one_line_naming_the_flag(tmp_path, capsys, monkeypatch, argv, named):
    monkeypatch.chdir(tmp_path)
    try:
        code = cli_main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "RUN").exists()


def test_chat_refuses_an_adapter_made_for_another_model(smollm2_text, tmp_path, capsys):
    run_sft(dataclasses.replace(TINY_SFT, steps=1), tmp_path / "tiny", *fresh(smollm2_text))
    assert cli_main(["chat", "--adapter", str(tmp_path / "tiny")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another model" in err, err
    (tmp_path / "empty").mkdir()
    assert cli_main(["chat", "--adapter", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has not finished" in err, err

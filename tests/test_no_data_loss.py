"""A run never destroys another run's checkpoint, keeps no useless one and leaves no debris (issue 17);
two runs never share a checkpoint folder (issue 29)."""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_train import TRAIN_MODEL, _config

from llmbook.__main__ import main as cli_main
from llmbook.checkpoint import (
    CHECKPOINT_FILE,
    LOCK_OWNER_ENV,
    hold_checkpoint_dir,
    load_checkpoint,
    load_model,
    read_checkpoint_metadata,
)
from llmbook.data import atomic_write
from llmbook.errors import OverwriteError, RunLockedError, RunMismatchError
from llmbook.launch import CONFIG_FILE, train_processes
from llmbook.tokens import prepare_tokens
from llmbook.train import train
from llmbook.train_config import DivergedError, NonFiniteLossError


def test_no_resume_refuses_to_replace_another_runs_checkpoint(tmp_path):
    first = _config(tmp_path, steps=8, checkpoint_dir=str(tmp_path / "ck"))
    train(first)
    other_model = tiny_config(**(TRAIN_MODEL | dict(n_heads=4)))
    other = dataclasses.replace(first, model=other_model, steps=4, resume=False)
    with pytest.raises(OverwriteError, match=r"another run's checkpoint \(step 8\).*--overwrite"):
        train(other)
    assert read_checkpoint_metadata(tmp_path / "ck")["step"] == 8  # untouched


def test_no_resume_with_overwrite_replaces_the_checkpoint(tmp_path):
    first = _config(tmp_path, steps=8, checkpoint_dir=str(tmp_path / "ck"))
    train(first)
    train(dataclasses.replace(first, steps=4, resume=False, overwrite=True))
    assert read_checkpoint_metadata(tmp_path / "ck")["step"] == 4


def test_cli_no_resume_into_a_used_checkpoint_dir_exits_2_without_touching_it(tmp_path, capsys):
    config = _config(tmp_path, steps=4, checkpoint_dir=str(tmp_path / "ck"))
    train(config)
    before = (tmp_path / "ck" / CHECKPOINT_FILE).read_bytes()
    argv = ["train", "--train-data", config.train_data, "--checkpoint-dir", str(tmp_path / "ck"),
            "--no-resume", "--steps", "2", "--warmup-steps", "1", "--no-progress", "--model.vocab_size", "64",
            "--model.context_length", "8", "--model.d_model", "32", "--model.n_layers", "1"]  # fmt: skip
    assert cli_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "ck" / CHECKPOINT_FILE).read_bytes() == before


def test_resume_refuses_different_training_data(tmp_path):
    config = _config(tmp_path, steps=4, cosine_steps=8, checkpoint_dir=str(tmp_path / "ck"))
    train(config)
    ids = np.random.default_rng(1).integers(0, 64, size=3600)
    prepare_tokens(ids, None, config.train_data)  # same name, same size, other tokens
    with pytest.raises(RunMismatchError, match="sha256.*other data"):
        train(dataclasses.replace(config, steps=8))


def test_a_nan_at_step_one_does_not_point_to_a_checkpoint_that_does_not_exist(tmp_path):
    config = _config(
        tmp_path, steps=6, max_lr=1e30, min_lr=0.0, warmup_steps=1, cosine_steps=10,
        checkpoint_dir=str(tmp_path / "ck"), grad_clip=None,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError) as caught:
        train(config)
    message = str(caught.value)
    assert "no checkpoint of this run exists yet" in message and "last good" not in message
    assert not (tmp_path / "ck" / CHECKPOINT_FILE).exists()


def test_a_huge_but_finite_loss_stops_the_run_keeping_the_last_good_checkpoint(tmp_path):
    # lr 100 from step 3 on: the loss jumps to ~1e5 (finite, no NaN), weights grow without bound.
    config = _config(
        tmp_path, steps=12, max_lr=100.0, min_lr=100.0, warmup_steps=0, checkpoint_dir=str(tmp_path / "ck"),
        checkpoint_interval=1, grad_clip=None,
    )  # fmt: skip
    with pytest.raises(DivergedError, match="diverged") as caught:
        train(config)
    assert "no checkpoint of this run exists yet" in str(caught.value) or "last good" in str(caught.value)
    if (tmp_path / "ck" / CHECKPOINT_FILE).exists():
        model = load_model(tmp_path / "ck")
        assert max(p.abs().max().item() for p in model.parameters()) < 1e3


def test_weights_blown_up_to_1e11_are_never_saved_as_a_good_checkpoint(tmp_path):
    config = _config(tmp_path, steps=8, checkpoint_dir=str(tmp_path / "ck"), checkpoint_interval=4)

    def blow_up_at_the_end(step, model, history):
        if step == 8:  # the final save follows this evaluation directly
            with torch.no_grad():
                model.blocks[0].ffn.down_proj.weight.mul_(1e11)

    with pytest.raises(DivergedError, match=r"largest \|weight\|.*step 4"):
        train(config, callback=blow_up_at_the_end)
    checkpoint = load_checkpoint(tmp_path / "ck")
    assert checkpoint.step == 4
    assert max(t.abs().max().item() for t in checkpoint.model_state.values()) < 1e3


_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from llmbook.data import atomic_write

    def slow(tmp):
        Path(tmp).write_bytes(b"half a checkpoint")
        print("writing", flush=True)
        time.sleep(60)

    atomic_write(sys.argv[1], slow)
""")


def test_a_sigkill_during_a_write_leaves_a_temporary_file_that_the_next_write_removes(tmp_path):
    target = tmp_path / "checkpoint.safetensors"
    target.write_bytes(b"previous")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(target)], stdout=subprocess.PIPE, env=env
    )
    assert writer.stdout.readline().strip() == b"writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and target.read_bytes() == b"previous"
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"next"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]
    assert target.read_bytes() == b"next"


def test_a_temporary_file_of_a_live_writer_is_left_alone(tmp_path):
    target = tmp_path / "tokens.bin"
    # The parent of this test process is alive: its temporary file may still be being written.
    live = tmp_path / f".tokens.bin.{os.getppid()}.0123456789abcdef0123456789abcdef.tmp"
    live.write_bytes(b"in progress")
    unrelated = tmp_path / ".other.bin.1.0123456789abcdef0123456789abcdef.tmp"
    unrelated.write_bytes(b"another file's")
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"ids"))
    assert live.exists() and unrelated.exists()


# ---- one run per checkpoint folder (issue 29) ------------------------------------------------------

_HOLDER = textwrap.dedent("""
    import sys, time
    from llmbook.checkpoint import hold_checkpoint_dir

    with hold_checkpoint_dir(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
""")


def _hold_in_another_process(folder) -> subprocess.Popen:
    """A live process holding `folder` as a training run does (returns once it holds it)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(LOCK_OWNER_ENV, None)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, env=env)
    assert holder.stdout.readline().strip() == b"held"
    return holder


def test_a_second_run_on_a_held_checkpoint_folder_is_refused_and_a_killed_holder_leaves_nothing_stuck(
    tmp_path,
):
    config = _config(tmp_path, steps=4, checkpoint_dir=str(tmp_path / "ck"))
    holder = _hold_in_another_process(tmp_path / "ck")
    try:
        with pytest.raises(RunLockedError, match=rf"{tmp_path / 'ck'} is in use.*pid {holder.pid}"):
            train(config)
        assert not (tmp_path / "ck" / CHECKPOINT_FILE).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train(config)  # the OS dropped the killed holder's lock
    assert read_checkpoint_metadata(tmp_path / "ck")["step"] == 4
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [CHECKPOINT_FILE]


def test_cli_a_second_trainer_on_one_folder_exits_2_and_the_first_runs_checkpoint_survives(tmp_path, capsys):
    config = _config(tmp_path, steps=4, checkpoint_dir=str(tmp_path / "ck"))
    train(config)
    before = (tmp_path / "ck" / CHECKPOINT_FILE).read_bytes()
    argv = ["train", "--train-data", config.train_data, "--checkpoint-dir", str(tmp_path / "ck"),
            "--no-resume", "--overwrite", "--seed", "2", "--steps", "2", "--warmup-steps", "1",
            "--no-progress",
            "--model.vocab_size", "64", "--model.context_length", "8", "--model.d_model", "16",
            "--model.n_layers", "1", "--model.n_heads", "2"]  # fmt: skip
    holder = _hold_in_another_process(tmp_path / "ck")  # the first trainer, still running
    try:
        assert cli_main(argv) == 2
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "in use by another training run" in err and str(tmp_path / "ck") in err
    assert (tmp_path / "ck" / CHECKPOINT_FILE).read_bytes() == before


def test_train_processes_refuses_a_held_folder_before_writing_into_it(tmp_path):
    config = _config(tmp_path, steps=4, checkpoint_dir=str(tmp_path / "ck"))
    holder = _hold_in_another_process(tmp_path / "ck")
    try:
        with pytest.raises(RunLockedError, match="in use by another training run"):
            train_processes(config, processes=2)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not (tmp_path / "ck" / CONFIG_FILE).exists()


def test_the_lock_is_shared_only_with_processes_its_own_launcher_started(tmp_path, monkeypatch):
    holder = _hold_in_another_process(tmp_path / "ck")
    try:
        monkeypatch.setenv(LOCK_OWNER_ENV, str(holder.pid + 1))  # another launcher's pid: refused
        with pytest.raises(RunLockedError):
            with hold_checkpoint_dir(tmp_path / "ck"):
                pass
        monkeypatch.setenv(LOCK_OWNER_ENV, str(holder.pid))  # started by the holder: shares its hold
        with hold_checkpoint_dir(tmp_path / "ck"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_run_refused_before_writing_leaves_no_checkpoint_folder_behind(tmp_path):
    config = _config(tmp_path, steps=4, checkpoint_dir=str(tmp_path / "runs" / "ck"))
    bad = dataclasses.replace(config, model=tiny_config(**(TRAIN_MODEL | dict(vocab_size=10))))
    with pytest.raises(ValueError, match="model.vocab_size=10"):
        train(bad)  # the token files hold ids up to 63
    assert not (tmp_path / "runs" / "ck").exists()

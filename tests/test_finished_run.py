"""`llmbook.train.finished_run`: chapter 9 reuses chapter 8's finished run only when safe and the same."""

import dataclasses
import shutil

import pytest
import torch
from test_train import _config

from llmbook.checkpoint import CHECKPOINT_FILE, hold_checkpoint_dir, load_model, read_checkpoint_metadata
from llmbook.train import finished_run, train


class CountingRun:
    """A stand-in for `train` that counts its calls and trains for real."""

    def __init__(self):
        self.calls = 0

    def __call__(self, config):
        self.calls += 1
        return train(config)


def _finished_elsewhere(tmp_path):
    """A finished run in tmp_path/other, and the config of the same run pointed at tmp_path/own."""
    other = _config(tmp_path / "data", steps=4, checkpoint_dir=str(tmp_path / "other"))
    train(other)
    return other, dataclasses.replace(other, checkpoint_dir=str(tmp_path / "own"))


def test_a_finished_run_of_the_same_config_is_copied_not_retrained(tmp_path):
    other, own = _finished_elsewhere(tmp_path)
    run = CountingRun()
    folder = finished_run(own, tmp_path / "other", run=run)
    assert run.calls == 0
    assert folder == tmp_path / "own" and read_checkpoint_metadata(folder)["step"] == 4
    mine, theirs = load_model(folder).state_dict(), load_model(tmp_path / "other").state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize(
    "change",
    [dict(steps=6), dict(max_lr=5e-3), dict(seed=1)],
    ids=["more steps", "another learning rate", "another seed"],
)
def test_a_run_of_another_config_is_not_reused(tmp_path, change):
    _, own = _finished_elsewhere(tmp_path)
    run = CountingRun()
    folder = finished_run(dataclasses.replace(own, **change), tmp_path / "other", run=run)
    assert run.calls == 1
    assert read_checkpoint_metadata(folder)["step"] == change.get("steps", 4)


def test_an_unfinished_run_is_not_reused(tmp_path):
    other, own = _finished_elsewhere(tmp_path)
    run = CountingRun()
    finished_run(dataclasses.replace(own, steps=8, cosine_steps=8), tmp_path / "other", run=run)
    assert run.calls == 1  # the other folder stopped at step 4 of 8 (same schedule otherwise)


def test_a_run_being_written_is_not_touched(tmp_path):
    _, own = _finished_elsewhere(tmp_path)
    run = CountingRun()
    with hold_checkpoint_dir(tmp_path / "other"):  # as a training run holds its folder
        finished_run(own, tmp_path / "other", run=run)
    assert run.calls == 1


def test_a_damaged_copy_is_not_trusted(tmp_path):
    _, own = _finished_elsewhere(tmp_path)
    file = tmp_path / "other" / CHECKPOINT_FILE
    data = bytearray(file.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the last tensor
    file.write_bytes(bytes(data))
    run = CountingRun()
    finished_run(own, tmp_path / "other", run=run)
    assert run.calls == 1


def test_its_own_finished_run_is_used_again_and_another_checkpoint_there_is_not_replaced(tmp_path):
    other, own = _finished_elsewhere(tmp_path)
    shutil.copytree(tmp_path / "other", tmp_path / "own")
    run = CountingRun()
    assert finished_run(own, tmp_path / "nowhere", run=run) == tmp_path / "own"
    assert run.calls == 0
    with pytest.raises(ValueError, match="max_lr"):  # train refuses to resume another run's checkpoint
        finished_run(dataclasses.replace(own, max_lr=5e-3), tmp_path / "other", run=run)
    assert read_checkpoint_metadata(tmp_path / "own")["config"]["train"]["max_lr"] == other.max_lr

import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open

import llmbook.checkpoint as checkpoint_module
from llmbook.__main__ import main as cli_main
from llmbook.checkpoint import CHECKPOINT_FILE, load_checkpoint, load_model, save_checkpoint
from llmbook.launch import CONFIG_FILE, train_processes
from llmbook.loss import linear_cross_entropy
from llmbook.model import ModelConfig, TransformerLM
from llmbook.optim import AdamW, linear_schedule
from llmbook.tokenizer import Tokenizer
from llmbook.tokens import get_batch, load_tokens, prepare_tokens, split_text, token_file_metadata
from llmbook.train import train
from llmbook.train_config import NonFiniteLossError, TrainConfig

# The tests' tiny model (tests/conftest.py), smaller still: the training tests run many steps.
TRAIN_MODEL = dict(vocab_size=64, context_length=8, d_model=16, n_heads=2, tie_embeddings=True)


def _token_files(tmp_path: Path) -> tuple[Path, Path]:
    # A noisy repeating pattern: learnable, but not trivially.
    rng = np.random.default_rng(0)
    ids = np.tile(np.arange(40), 100)
    noisy = rng.random(ids.size) < 0.1
    ids[noisy] = rng.integers(0, 64, size=noisy.sum())
    prepare_tokens(ids[:3600], None, tmp_path / "train.bin")
    prepare_tokens(ids[3600:], None, tmp_path / "val.bin")
    return tmp_path / "train.bin", tmp_path / "val.bin"


def _config(tmp_path: Path, **overrides) -> TrainConfig:
    train_path, val_path = _token_files(tmp_path)
    values = dict(
        model=tiny_config(**TRAIN_MODEL),
        train_data=str(train_path),
        val_data=str(val_path),
        batch_size=4,
        steps=8,
        max_lr=1e-2,
        warmup_steps=2,
        eval_interval=4,
        eval_batches=1,
        progress=False,
    )
    return TrainConfig(**(values | overrides))


# ---- data ----------------------------------------------------------------------------------------


def test_get_batch_targets_are_inputs_shifted_by_one(tmp_path):
    tokens = prepare_tokens(np.arange(1000) % 500, None, tmp_path / "t.bin")
    x, y = get_batch(tokens, 6, 10, "cpu", torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (6, 10) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):
        start = int(np.flatnonzero(np.asarray(tokens) == int(row_x[0]))[0])  # ids are unique within 500
        assert torch.equal(row_x, torch.from_numpy(np.asarray(tokens[start : start + 10], dtype=np.int64)))
        assert int(row_y[-1]) == int(tokens[start + 10])


def test_get_batch_is_reproducible_from_the_generator(tmp_path):
    tokens = prepare_tokens(np.arange(5000) % 64, None, tmp_path / "t.bin")
    first = get_batch(tokens, 4, 8, "cpu", torch.Generator().manual_seed(3))
    second = get_batch(tokens, 4, 8, "cpu", torch.Generator().manual_seed(3))
    third = get_batch(tokens, 4, 8, "cpu", torch.Generator().manual_seed(4))
    assert torch.equal(first[0], second[0]) and not torch.equal(first[0], third[0])


def test_get_batch_rejects_a_file_shorter_than_the_context(tmp_path):
    tokens = prepare_tokens(np.arange(8), None, tmp_path / "t.bin")
    with pytest.raises(ValueError, match="context_length=8"):
        get_batch(tokens, 1, 8, "cpu", torch.Generator())


def test_prepare_tokens_writes_uint16_with_byte_count(tmp_path):
    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [])
    text = "héllo, wörld"
    tokens = prepare_tokens(text, tokenizer, tmp_path / "t.bin")
    assert tokens.dtype == np.uint16
    assert list(tokens) == list(text.encode("utf-8"))
    assert (tmp_path / "t.bin").stat().st_size == 2 * len(text.encode("utf-8"))
    metadata = token_file_metadata(tmp_path / "t.bin")
    assert metadata["n_bytes"] == len(text.encode("utf-8")) == metadata["n_tokens"]
    assert list(load_tokens(tmp_path / "t.bin")) == list(tokens)


def test_prepare_tokens_rejects_ids_that_do_not_fit_uint16(tmp_path):
    with pytest.raises(ValueError, match="65535"):
        prepare_tokens([1, 65536], None, tmp_path / "t.bin")

    class HugeVocab:
        vocab_size = 100_000

        def encode(self, text):
            return [0]

    with pytest.raises(ValueError, match="100000"):
        prepare_tokens("text", HugeVocab(), tmp_path / "t.bin")
    with pytest.raises(TypeError, match="tokenizer"):
        prepare_tokens("text", None, tmp_path / "t.bin")
    assert not (tmp_path / "t.bin").exists()


# ---- checkpoints ---------------------------------------------------------------------------------


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = TransformerLM(tiny_config(**TRAIN_MODEL))
    optimizer = AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 8))
    model(ids).sum().backward()
    optimizer.step()
    return model, optimizer


def test_checkpoint_round_trips_model_optimizer_and_rng_without_pickle(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer(0)
    rng = torch.Generator().manual_seed(7).get_state()
    file = save_checkpoint(tmp_path, model, optimizer, step=5, config=model.config, rng_states={"data": rng})
    assert file == tmp_path / CHECKPOINT_FILE
    with safe_open(file, framework="pt") as handle:  # a real safetensors file
        assert "model.tok_embeddings.weight" in handle.keys()
        assert "model.lm_head.weight" not in handle.keys()  # tied: stored once

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    fresh, fresh_optimizer = _model_and_optimizer(1)
    checkpoint = load_checkpoint(tmp_path, fresh, fresh_optimizer)
    assert checkpoint.step == 5 and checkpoint.model_config == model.config
    assert fresh.lm_head.weight is fresh.tok_embeddings.weight  # loading kept the tie
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values(), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in ("step", "exp_avg", "exp_avg_sq"))
    assert torch.equal(checkpoint.rng_states["data"], rng)
    assert torch.equal(load_model(tmp_path).lm_head.weight, model.lm_head.weight)


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer(0)
    save_checkpoint(tmp_path, model, optimizer, step=1)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()

    def crash_mid_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model, optimizer, step=2)
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]  # no temporary left behind
    assert load_checkpoint(tmp_path).step == 1


# ---- the training loop ---------------------------------------------------------------------------


def test_training_lowers_the_loss_and_reports_bits_per_byte(tmp_path):
    config = _config(tmp_path, steps=60, eval_interval=30, bytes_per_token=2.0, max_lr=3e-2)
    history = train(config)
    assert history.step == list(range(60)) and len(history.loss) == 60
    assert history.eval_step == [0, 30, 60]
    assert history.train_loss[0] == pytest.approx(math.log(64), abs=0.1)  # untrained: ~uniform
    assert history.val_loss[-1] < history.val_loss[0] - 1.0
    assert history.val_bpb[-1] == pytest.approx(history.val_loss[-1] / (2.0 * math.log(2)))
    assert history.lr[0] == 0.0 and history.lr[2] == pytest.approx(3e-2)  # warm-up, then the peak


def test_resuming_reproduces_the_uninterrupted_losses_bit_for_bit(tmp_path):
    # Dropout makes the global RNG part of the state a checkpoint must carry.
    model = tiny_config(**(TRAIN_MODEL | dict(dropout=0.1)))
    straight = train(_config(tmp_path / "a", model=model, steps=8, cosine_steps=8))
    first_half = _config(
        tmp_path / "b", model=model, steps=4, cosine_steps=8, checkpoint_dir=str(tmp_path / "ck")
    )
    train(first_half)
    resumed = train(dataclasses.replace(first_half, steps=8))
    assert resumed.step == straight.step == list(range(8))
    assert resumed.loss == straight.loss  # exact float equality
    assert resumed.grad_norm == straight.grad_norm


def test_muon_runs_train_and_resume_bit_for_bit_with_the_muon_state_in_the_checkpoint(tmp_path):
    model = tiny_config(**(TRAIN_MODEL | dict(qk_norm=True, ffn="relu2", tie_embeddings=False)))
    options = dict(model=model, optimizer="muon", muon_lr=4e-2, cosine_steps=8)
    straight = train(_config(tmp_path / "a", steps=8, **options))
    assert straight.loss[-1] < straight.loss[0]
    first_half = _config(tmp_path / "b", steps=4, checkpoint_dir=str(tmp_path / "ck"), **options)
    train(first_half)
    saved = load_checkpoint(tmp_path / "ck")
    assert saved.optimizer_state["param_groups"][0]["use_muon"] is True
    assert any("momentum_buffer" in state for state in saved.optimizer_state["state"].values())
    resumed = train(dataclasses.replace(first_half, steps=8))
    assert resumed.loss == straight.loss  # exact float equality
    adamw = train(_config(tmp_path / "c", steps=8, model=model, cosine_steps=8))
    assert adamw.loss[2:] != straight.loss[2:]  # the optimizer switch did switch the optimizer


def test_resume_refuses_a_checkpoint_made_for_another_config(tmp_path):
    config = _config(tmp_path, steps=2, checkpoint_dir=str(tmp_path / "ck"))
    train(config)
    with pytest.raises(ValueError, match="model.d_model"):
        train(dataclasses.replace(config, model=tiny_config(**(TRAIN_MODEL | dict(d_model=32)))))
    with pytest.raises(ValueError, match="max_lr"):
        train(dataclasses.replace(config, max_lr=0.5))
    with pytest.raises(ValueError, match="cosine_steps"):  # more steps would change the schedule
        train(dataclasses.replace(config, steps=4))
    with pytest.raises(ValueError, match="lr_decay"):
        train(dataclasses.replace(config, lr_decay="linear"))


def test_a_linear_decay_follows_linear_schedule(tmp_path):
    history = train(_config(tmp_path, steps=6, warmup_steps=2, min_lr=0.0, lr_decay="linear"))
    assert history.lr == [linear_schedule(step, 1e-2, 0.0, 2, 6) for step in range(6)]
    assert history.lr[3] == pytest.approx(0.75e-2)  # a quarter of the way down (the cosine: 0.85e-2)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on a CPU needs a C++ compiler")
def test_compile_true_trains_to_the_eager_losses(tmp_path):
    # torch.compile traces the same model (the per-forward RotaryAngles included) and gives the same numbers.
    config = _config(tmp_path, steps=4)
    eager = train(config)
    compiled = train(dataclasses.replace(config, compile=True))
    np.testing.assert_allclose(compiled.loss, eager.loss, rtol=1e-5, atol=0)


def test_a_nonfinite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    # warm-up to an absurd peak: step 1 updates with lr 1e29 and the weights blow up.
    config = _config(
        tmp_path, steps=6, max_lr=1e30, min_lr=0.0, warmup_steps=10, cosine_steps=10,
        checkpoint_dir=str(tmp_path / "ck"), checkpoint_interval=1, grad_clip=None,
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="last good"):
        train(config)
    checkpoint = load_checkpoint(tmp_path / "ck")
    assert checkpoint.step >= 1
    assert all(torch.isfinite(t).all() for t in checkpoint.model_state.values())
    model = load_model(tmp_path / "ck")
    x, y = get_batch(load_tokens(config.train_data), 4, 8, "cpu", torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [CHECKPOINT_FILE]


def test_a_nan_training_loss_raises_before_its_step_is_checkpointed(tmp_path, monkeypatch):
    calls = []

    def nan_on_fourth_training_step(hidden, weight, targets, softcap=None):
        loss = linear_cross_entropy(hidden, weight, targets, softcap=softcap)
        if hidden.requires_grad:  # training forward (evaluation runs without gradients)
            calls.append(1)
            if len(calls) == 4:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(TransformerLM, "head_loss", staticmethod(nan_on_fourth_training_step))
    config = _config(tmp_path, steps=8, checkpoint_dir=str(tmp_path / "ck"), checkpoint_interval=1)
    with pytest.raises(NonFiniteLossError, match="training loss is nan at step 3"):
        train(config)
    checkpoint = load_checkpoint(tmp_path / "ck")
    assert checkpoint.step == 2 and len(checkpoint.history.loss) == 2


def test_callback_can_stop_the_run_early(tmp_path):
    seen = []

    def stop_at_four(step, model, history):
        seen.append(step)
        return step >= 4

    history = train(_config(tmp_path, steps=100, eval_interval=2), callback=stop_at_four)
    assert seen == [0, 2, 4] and len(history.loss) == 4


def test_train_config_rejects_bad_values():
    model = tiny_config(**TRAIN_MODEL)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(model=model, train_data="x", batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(model=model, train_data="x", dtype="float16")
    # cosine_steps follows steps when not set, so the error names steps
    with pytest.raises(ValueError, match=r"steps \(10\) must be >= warmup_steps"):
        TrainConfig(model=model, train_data="x", warmup_steps=50, steps=10)
    with pytest.raises(ValueError, match="cosine_steps"):
        TrainConfig(model=model, train_data="x", warmup_steps=50, steps=100, cosine_steps=10)
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"model": {}, "train_data": "x", "stepz": 3})


def test_cli_trains_from_a_json_config_and_samples_text(tmp_path, capsys):
    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [])
    tokenizer.save(tmp_path / "tok")
    text = "to be or not to be, that is the question. " * 40
    prepare_tokens(text, tokenizer, tmp_path / "train.bin")
    config = {
        "model": dataclasses.asdict(tiny_config(**(TRAIN_MODEL | dict(vocab_size=256)))),
        "train_data": str(tmp_path / "train.bin"),
        "tokenizer": str(tmp_path / "tok"),
        "batch_size": 4,
        "steps": 3,
        "warmup_steps": 1,
        "eval_batches": 1,
    }
    (tmp_path / "run.json").write_text(json.dumps(config))
    ckpt = str(tmp_path / "ck")
    argv = ["train", "--config", str(tmp_path / "run.json"), "--checkpoint-dir", ckpt, "--no-progress"]
    assert cli_main(argv + ["--model.d_model", "32"]) == 0
    assert load_checkpoint(ckpt).model_config.d_model == 32  # the flag overrode the file
    assert (tmp_path / "ck" / "tokenizer" / "vocab.bpe").is_file()  # bundled for sampling
    capsys.readouterr()
    assert cli_main(["sample", "--checkpoint", ckpt, "--prompt", "to be", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("to be") and len(out.rstrip("\n").encode("utf-8", "replace")) >= 5


def test_cli_prepare_splits_a_text_file_and_trains_a_tokenizer(tmp_path, capsys):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200))
    (tmp_path / "corpus.txt").write_text(text)
    argv = [
        "prepare",
        "--text",
        str(tmp_path / "corpus.txt"),
        "--train-bpe",
        "300",
        "--out",
        str(tmp_path / "d"),
    ]
    assert cli_main(argv) == 0
    paths = json.loads(capsys.readouterr().out)
    tokenizer = Tokenizer.load(paths["tokenizer"])
    assert tokenizer.vocab_size == 300
    train_ids, val_ids = load_tokens(paths["train_data"]), load_tokens(paths["val_data"])
    assert tokenizer.decode(list(train_ids)) + tokenizer.decode(list(val_ids)) == text
    # The same split as chapter 8 and the quality benchmark: the last tenth of the characters.
    assert tokenizer.decode(list(val_ids)) == split_text(text)[1] == text[int(len(text) * 0.9) :]
    assert token_file_metadata(paths["val_data"])["n_bytes"] == len(tokenizer.decode(list(val_ids)).encode())


# ---- distributed ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two fresh Python processes importing torch: ~10-20 s on a busy 2-core machine
@pytest.mark.parametrize("launcher", ["torchrun", "train_processes"])
def test_two_ddp_processes_match_one_process_with_the_same_global_batch(tmp_path, launcher, capsys):
    config = _config(tmp_path, steps=5, eval_interval=5, checkpoint_dir=str(tmp_path / "ddp"))
    if launcher == "torchrun":  # the command a reader types
        (tmp_path / "run.json").write_text(json.dumps(config.to_dict()))
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", "-m", "llmbook", "train", "--config", str(tmp_path / "run.json"),
        ]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        distributed = load_checkpoint(tmp_path / "ddp").history
    else:  # what chapter 8 calls: the same command, started and read back for you
        distributed = train_processes(dataclasses.replace(config, progress=True), processes=2)
        assert distributed.loss == load_checkpoint(tmp_path / "ddp").history.loss
        assert "step 5: train" in capsys.readouterr().out  # rank 0's evaluation lines are echoed
        assert (tmp_path / "ddp" / CONFIG_FILE).is_file()
    single = train(dataclasses.replace(config, checkpoint_dir=None))
    # Each process averages its half of the batch and the all-reduce averages the halves: the same
    # number as one mean over the whole batch, up to float32 rounding in a different order.
    np.testing.assert_allclose(distributed.loss, single.loss, rtol=1e-5, atol=0)
    np.testing.assert_allclose(distributed.train_loss, single.train_loss, rtol=1e-5, atol=0)
    assert single.loss[-1] < single.loss[0]  # the 5 compared steps did train


def test_the_training_loss_goes_to_the_triton_kernel_when_the_model_asks_for_kernels(monkeypatch):
    from llmbook import kernels

    reached_kernel = []

    def kernel_stand_in(hidden, weight, targets, ignore_index):
        reached_kernel.append(hidden.dtype)
        return kernels.linear_cross_entropy_reference(hidden, weight, targets, ignore_index)

    monkeypatch.setattr(kernels, "available", lambda tensor: True)  # as on a GPU with Triton
    monkeypatch.setattr(kernels, "linear_cross_entropy", kernel_stand_in)
    config = ModelConfig(vocab_size=16, context_length=4, d_model=8, n_layers=1, n_heads=2, kernels=True)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 4, 8, generator=generator).to(torch.bfloat16)
    weight = torch.randn(16, 8, generator=generator).to(torch.bfloat16)
    targets = torch.randint(0, 16, (2, 4), generator=generator)

    # head_loss is what forward(ids, targets) turns the final hidden states into the loss with.
    loss = TransformerLM(config).head_loss(hidden, weight, targets)
    assert reached_kernel == [torch.bfloat16]  # bf16 hidden states reach the kernel without a float32 copy
    logits = torch.nn.functional.linear(hidden, weight).float()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, expected)

    reached_kernel.clear()
    plain = TransformerLM(dataclasses.replace(config, kernels=False))
    torch.testing.assert_close(plain.head_loss(hidden, weight, targets), loss)
    assert reached_kernel == []


def test_train_processes_refuses_what_it_cannot_run_and_reports_a_failed_run(tmp_path):
    config = _config(tmp_path, steps=2, eval_interval=2, checkpoint_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train_processes(dataclasses.replace(config, checkpoint_dir=None))
    with pytest.raises(ValueError, match="batch_size=4 must be divisible by processes=3"):
        train_processes(dataclasses.replace(config, batch_size=4), processes=3)
    with pytest.raises(ValueError, match="processes must be a positive integer"):
        train_processes(config, processes=0)


@pytest.mark.slow  # starts torchrun
def test_train_processes_raises_with_the_error_of_a_failed_run_and_keeps_the_other_checkpoint(tmp_path):
    config = _config(tmp_path, steps=2, eval_interval=2, checkpoint_dir=str(tmp_path / "run"))
    train(config)  # a finished run's checkpoint
    before = (tmp_path / "run" / CHECKPOINT_FILE).read_bytes()
    other = dataclasses.replace(config, resume=False)  # would replace it without overwrite=True
    with pytest.raises(RuntimeError, match="(?s)failed.*--overwrite"):
        train_processes(other, processes=2)
    assert (tmp_path / "run" / CHECKPOINT_FILE).read_bytes() == before

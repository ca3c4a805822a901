"""The measuring helpers of `python -m llmbook.bench finetune_costs` on a tiny model: exact parameter,
optimizer-state and gradient counts, the peak-memory reset, bits per byte on a general text, and one
mode of training; the benchmark itself (SmolLM2, minutes) is not run here."""

import math

import pytest
import torch
from conftest import tiny_model

from llmbook.bench.finetune_costs import (
    general_bits_per_byte,
    gradient_bytes,
    measure_training,
    optimizer_state_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    trainable_parameters,
)
from llmbook.bpe import train_bpe
from llmbook.lora import add_lora
from llmbook.model import count_parameters
from llmbook.optim import AdamW, param_groups
from llmbook.tokenizer import Tokenizer

EOT = "<|endoftext|>"
# d_model 32, 4 heads of 8, 2 key/value heads (k and v give 16 numbers), a SwiGLU of width 64.
SHAPE = {"n_kv_heads": 2, "d_ff": 64}


def _lora(rank: int = 2, **overrides):
    return add_lora(
        tiny_model(**(SHAPE | overrides)), rank, 2.0 * rank, generator=torch.Generator().manual_seed(0)
    )


def _batch(vocab: int = 97, shape=(3, 10)):
    ids = torch.randint(0, vocab, (shape[0], shape[1] + 1), generator=torch.Generator().manual_seed(0))
    targets = ids[:, 1:].clone()
    targets[:, :4] = -100  # a prompt the loss skips, as in SFT
    return ids[:, :-1], targets


def test_lora_trains_rank_times_in_plus_out_numbers_per_layer_counted_by_hand():
    # Per block, rank 2: q (32+32), k (32+16), v (32+16), o (32+32), gate (32+64), up (32+64),
    # down (64+32), each times 2: 128 + 96 + 96 + 128 + 192 + 192 + 192 = 1024; two blocks.
    assert trainable_parameters(_lora(rank=2)) == 2048
    assert trainable_parameters(_lora(rank=4)) == 4096


def test_full_fine_tuning_trains_every_parameter_and_a_tied_head_once():
    model = tiny_model(**SHAPE, tie_embeddings=True)
    assert trainable_parameters(model) == count_parameters(model)
    untied = tiny_model(**SHAPE)
    assert trainable_parameters(untied) - trainable_parameters(model) == 97 * 32  # the head's own table


def test_adamw_state_is_two_moments_per_trainable_number_in_the_parameters_dtype():
    for model, bytes_per_number in ((_lora(), 4), (tiny_model(**SHAPE).double(), 8)):
        optimizer = AdamW(param_groups(model, weight_decay=0.0), lr=1e-3)
        assert optimizer_state_bytes(optimizer) == 0  # AdamW makes its moments at the first step
        inputs, targets = _batch()
        model(inputs, targets).backward()
        assert gradient_bytes(model) == bytes_per_number * trainable_parameters(model)
        optimizer.step()
        assert optimizer_state_bytes(optimizer) == 2 * bytes_per_number * trainable_parameters(model)


def test_gradients_of_frozen_weights_are_not_counted():
    model = _lora()
    inputs, targets = _batch()
    model(inputs, targets).backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert gradient_bytes(model) == 4 * 2048


def test_the_peak_resident_size_is_reset_then_sees_a_new_allocation():
    if not reset_peak_rss():
        pytest.skip("resetting the peak resident size needs Linux's /proc/self/clear_refs")
    start = rss_bytes()
    assert peak_rss_bytes() <= start + 8 * 2**20  # the reset brought the peak down to about now
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written (so resident)
    if rss_bytes() - start < 60 * 2**20:  # the allocator reused pages already resident: nothing new to see
        pytest.skip("the allocation reused resident memory, so the resident size did not grow")
    assert peak_rss_bytes() - start >= 60 * 2**20
    del block


@pytest.fixture(scope="module")
def bpe_tokenizer() -> Tokenizer:
    vocab, merges = train_bpe("the cat sat on the mat with the hat " * 20, 270, special_tokens=[EOT])
    return Tokenizer(vocab, merges, special_tokens=[EOT])


TEXT = "the cat sat on the hat; the mat sat on the cat, ünïcode too"


def test_general_bits_per_byte_is_the_models_loss_over_every_byte_of_the_text(bpe_tokenizer):
    model = tiny_model(vocab_size=300, context_length=64)
    ids = [bpe_tokenizer.special_tokens[EOT], *bpe_tokenizer.encode(TEXT)]
    assert len(ids) - 1 < len(TEXT.encode("utf-8"))  # merged tokens: bytes and tokens differ
    with torch.no_grad():
        nats = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])).item()
    expected = nats * (len(ids) - 1) / (math.log(2) * len(TEXT.encode("utf-8")))
    assert general_bits_per_byte(model, bpe_tokenizer, TEXT) == pytest.approx(expected, rel=1e-6)


def test_without_a_start_token_the_first_tokens_bytes_are_not_counted(bpe_tokenizer):
    model = tiny_model(vocab_size=300, context_length=64)
    ids = bpe_tokenizer.encode(TEXT)
    with torch.no_grad():
        nats = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])).item()
    n_bytes = len(TEXT.encode("utf-8")) - len(bpe_tokenizer.decode_bytes(ids[:1]))
    expected = nats * (len(ids) - 1) / (math.log(2) * n_bytes)
    found = general_bits_per_byte(model, bpe_tokenizer, TEXT, start_token=None)
    assert found == pytest.approx(expected, rel=1e-6)


def test_general_bits_per_byte_refuses_a_start_token_the_tokenizer_lacks(bpe_tokenizer):
    model = tiny_model(vocab_size=300, context_length=64)
    with pytest.raises(ValueError, match=r"start_token '<\|im_start\|>' is not a special token"):
        general_bits_per_byte(model, bpe_tokenizer, TEXT, start_token="<|im_start|>")


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_measure_training_reports_exact_counts_and_one_time_per_timed_step(mode):
    model = tiny_model(**SHAPE)
    n_all = count_parameters(model)
    inputs, targets = _batch()
    record = measure_training(mode, model, inputs, targets, steps=3, warmup=2, rank=2, alpha=4.0)
    trainable = 2048 if mode == "lora" else n_all
    assert record["trainable_parameters"] == trainable
    assert record["total_parameters"] == n_all + (2048 if mode == "lora" else 0)
    assert record["optimizer_state_bytes"] == 8 * trainable
    assert record["gradient_bytes"] == 4 * trainable
    assert len(record["seconds_all_steps"]) == 3 and record["seconds_per_step"] > 0
    assert record["peak_rss_bytes"] > 0


def test_measure_training_refuses_an_unknown_mode():
    inputs, targets = _batch()
    with pytest.raises(ValueError, match=r"mode must be one of \('lora', 'full'\), got 'qlora'"):
        measure_training("qlora", tiny_model(), inputs, targets, steps=1, warmup=1, rank=2, alpha=4.0)


def test_the_benchmark_is_registered_and_refuses_bad_flags_before_loading_anything(capsys):
    from llmbook.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["finetune_costs", "--k", "1"])
    assert exit_info.value.code == 2
    assert "--k must be at least 2" in capsys.readouterr().err


def test_both_sides_of_the_transformers_comparison_do_the_same_work():
    pytest.importorskip("peft")
    from types import SimpleNamespace

    from llmbook.bench.finetune_costs import _peft_model, _rollout_variants, _training_variants
    from llmbook.lora import LLAMA_TARGETS

    ours = tiny_model(**SHAPE, context_length=64)
    theirs = _peft_model(ours, 2, 4.0, LLAMA_TARGETS).train()
    add_lora(ours, 2, 4.0, LLAMA_TARGETS, torch.Generator().manual_seed(0))
    inputs, targets = _batch()
    first = {name: step() for name, step in _training_variants(ours.train(), theirs, inputs, targets).items()}
    assert first["llmbook"] == pytest.approx(first["transformers+peft"], abs=1e-5)  # the same model and batch
    sampling = _rollout_variants(
        ours, theirs, [[1, 2, 3], [4, 5]], SimpleNamespace(k=3, new_tokens=5, temperature=1.0)
    )
    assert {name: sample() for name, sample in sampling.items()} == {"llmbook": 30, "transformers+peft": 30}

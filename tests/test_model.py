"""Tests for llmbook.model: config validation, the block variants, KV-cache decoding, counting and loading."""

import dataclasses
import math

import pytest
import torch
from conftest import tiny_config, tiny_model
from torch.utils.flop_counter import FlopCounterMode

from llmbook.model import (
    PARAMETER_GROUPS,
    ModelConfig,
    TransformerBlock,
    TransformerLM,
    count_parameters,
    flops_per_token,
    load_weights,
    state_dict_spec,
)
from llmbook.norms import LayerNorm, RMSNorm


def random_ids(batch: int, seq: int, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


VARIANTS = {
    "llama": {},
    "gqa_tied": dict(n_kv_heads=2, tie_embeddings=True),
    "mqa": dict(n_kv_heads=1),
    "gpt2_style": dict(norm="layer", positions="learned", ffn="gelu"),
    "post_norm": dict(norm="layer", norm_position="post", positions="sinusoidal", ffn="silu"),
    "no_norm_no_positions": dict(norm="none", positions="none"),
    "modern": dict(qk_norm=True, ffn="relu2", logit_softcap=15.0, n_kv_heads=2),
}


def test_default_config_is_llama_style():
    config = ModelConfig()
    choices = (config.norm, config.norm_position, config.positions, config.ffn)
    assert choices == ("rms", "pre", "rope", "swiglu")
    model = TransformerLM(tiny_config())
    assert isinstance(model.blocks[0].attn_norm, RMSNorm) and model.pos_embeddings is None
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())


def test_config_resolves_kv_heads_and_ffn_width_by_rule():
    config = tiny_config()
    assert config.kv_heads == 4 and config.head_dim == 8
    assert config.ffn_dim == 96  # ceil(8/3 * 32) = 86 -> next multiple of 32
    assert dataclasses.replace(config, ffn="gelu").ffn_dim == 128  # 4 * d_model, re-derived
    assert tiny_config(d_ff=50).ffn_dim == 50


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(norm="batch"), "norm"),
        (dict(norm_position="sandwich"), "norm_position"),
        (dict(positions="alibi"), "positions"),
        (dict(ffn="relu"), "ffn"),
        (dict(n_heads=5), "d_model"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(dropout=1.5), "dropout"),
        (dict(logit_softcap=0.0), "logit_softcap"),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        tiny_config(**overrides)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_returns_logits_for_every_position(variant):
    config = tiny_config(**VARIANTS[variant])
    logits = tiny_model(config)(random_ids(3, 10))
    assert logits.shape == (3, 10, 97)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_is_causal(variant):
    model = tiny_model(tiny_config(**VARIANTS[variant]))
    ids = random_ids(1, 12)
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    torch.testing.assert_close(model(ids)[:, :8], model(changed)[:, :8])
    assert not torch.allclose(model(ids)[:, 8:], model(changed)[:, 8:])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incremental_decoding_with_kv_cache_equals_full_forward(variant):
    model = tiny_model(tiny_config(**VARIANTS[variant]))
    ids = random_ids(2, 14)
    full = model(ids)
    cache = model.make_kv_cache(batch_size=2)
    pieces = [model(ids[:, :5], kv_cache=cache)]  # prefill with s > 1
    assert cache.length == 5
    pieces += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(5, 11)]  # decode with s = 1
    pieces.append(model(ids[:, 11:], kv_cache=cache))  # a later chunk of 3
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_and_reset():
    model = tiny_model(tiny_config())
    cache = model.make_kv_cache(batch_size=1, max_length=6)
    assert cache.keys[0].shape == (1, 4, 6, 8)
    model(random_ids(1, 5), kv_cache=cache)
    with pytest.raises(ValueError, match="max_length=6"):
        model(random_ids(1, 2), kv_cache=cache)
    assert cache.length == 5  # a refused forward leaves the cache as it was
    cache.reset()
    torch.testing.assert_close(model(random_ids(1, 6), kv_cache=cache), model(random_ids(1, 6)))


def test_rope_kv_cache_may_run_past_context_length():
    model = tiny_model(tiny_config(context_length=8))
    ids = random_ids(1, 12)
    cache = model.make_kv_cache(1, max_length=12)
    first = model(ids[:, :8], kv_cache=cache)
    rest = model(ids[:, 8:], kv_cache=cache)
    assert rest.shape == (1, 4, 97) and torch.isfinite(rest).all()
    torch.testing.assert_close(first, model(ids[:, :8]))
    with pytest.raises(ValueError, match="learned positions"):
        tiny_model(tiny_config(positions="learned", context_length=8)).make_kv_cache(1, max_length=12)


def test_forward_rejects_bad_ids_with_specific_messages():
    model = tiny_model(tiny_config())
    with pytest.raises(ValueError, match="token id 97 is out of range for vocab_size=97"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exceeds context_length=24"):
        model(random_ids(1, 25))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"ids\[None\]"):
        model(torch.tensor([1, 2, 3]))


def test_post_norm_block_normalizes_after_each_residual():
    config = tiny_config(norm="layer", norm_position="post")
    torch.manual_seed(0)
    block = TransformerBlock(config).eval()
    x = torch.randn(2, 5, 32)
    after_attention = block.attn_norm(x + block.attn(x))
    expected = block.ffn_norm(after_attention + block.ffn(after_attention))
    torch.testing.assert_close(block(x), expected)
    # Every output vector is LayerNorm-ed: zero mean (gain 1, bias 0 at init).
    torch.testing.assert_close(block(x).mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)


def test_pre_norm_block_adds_sublayer_outputs_to_the_residual():
    torch.manual_seed(0)
    block = TransformerBlock(tiny_config()).eval()
    x = torch.randn(2, 5, 32)
    h = x + block.attn(block.attn_norm(x))
    torch.testing.assert_close(block(x), h + block.ffn(block.ffn_norm(h)))


def test_norm_none_uses_identity():
    model = tiny_model(tiny_config(norm="none"))
    assert isinstance(model.blocks[0].attn_norm, torch.nn.Identity)
    assert isinstance(model.final_norm, torch.nn.Identity)
    assert isinstance(tiny_model(tiny_config(norm="layer")).final_norm, LayerNorm)


def test_initialization_scales_residual_projections():
    torch.manual_seed(0)
    model = TransformerLM(tiny_config(d_model=128, n_heads=4, n_layers=8, vocab_size=512))
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert model.blocks[3].attn.o_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.blocks[3].ffn.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.blocks[3].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.blocks[0].attn_norm.weight, torch.ones(128))


def test_same_seed_gives_same_model_and_tied_head_shares_the_embedding():
    a, b = tiny_model(tiny_config(tie_embeddings=True)), tiny_model(tiny_config(tie_embeddings=True))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert a.lm_head.weight is a.tok_embeddings.weight


def test_dropout_is_active_only_in_training_mode():
    model = tiny_model(tiny_config(dropout=0.5))
    ids = random_ids(2, 8)
    torch.testing.assert_close(model(ids), model(ids))
    model.train()
    assert not torch.allclose(model(ids), model(ids))


def test_count_parameters_by_hand():
    config = tiny_config()
    d, f, v, layers = 32, 96, 97, 2
    per_block = 4 * d * d + 3 * d * f + 2 * d
    untied = v * d + layers * per_block + d + v * d
    assert count_parameters(tiny_model(config)) == untied
    assert count_parameters(tiny_model(config), exclude_embeddings=True) == untied - v * d
    tied = tiny_model(tiny_config(tie_embeddings=True))
    assert count_parameters(tied) == untied - v * d  # the shared matrix is counted once
    assert count_parameters(tied, exclude_embeddings=True) == layers * per_block + d
    gqa = tiny_model(tiny_config(n_kv_heads=1))
    assert count_parameters(gqa) == untied - layers * 2 * (d * d - d * 8)


def test_count_parameters_excludes_learned_position_table():
    config = tiny_config(positions="learned")
    model = tiny_model(config)
    with_positions = count_parameters(model)
    assert with_positions - count_parameters(tiny_model(tiny_config())) == 24 * 32
    assert count_parameters(model, exclude_embeddings=True) == with_positions - 24 * 32 - 97 * 32


@pytest.mark.parametrize("variant", ["llama", "gqa_tied", "gpt2_style"])
def test_flops_per_token_matches_torch_flop_counter(variant):
    # FlopCounterMode counts every matmul (2 FLOPs per multiply-add) and nothing elementwise, which is
    # exactly what flops_per_token models, so the two agree exactly. The plain attention path is used
    # because FlopCounterMode does not count PyTorch's fused CPU attention kernel.
    config = tiny_config(**VARIANTS[variant])
    model = tiny_model(config)
    for block in model.blocks:
        block.attn.use_sdpa = False
    seq = 16
    with FlopCounterMode(display=False) as counter:
        model(random_ids(2, seq))
    measured_per_token = counter.get_total_flops() / (2 * seq)
    assert measured_per_token == flops_per_token(config, seq_len=seq)


def test_flops_per_token_is_about_twice_the_parameters_for_short_sequences():
    config = ModelConfig(vocab_size=1000, context_length=8, d_model=512, n_layers=4, n_heads=8)
    matmul_params = count_parameters(TransformerLM(config), exclude_embeddings=True) - 9 * 512  # minus norms
    attention = 4 * 4 * 8 * 512
    assert flops_per_token(config) == 2 * matmul_params + attention


def test_state_dict_spec_lists_exactly_the_model_parameters():
    for overrides in VARIANTS.values():
        config = tiny_config(**overrides)
        model = tiny_model(config)
        spec = state_dict_spec(config)
        assert [name for name, _, _ in spec] == [name for name, _ in model.named_parameters()]
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        assert all(shapes[name] == shape for name, shape, _ in spec)
        assert all(meaning for _, _, meaning in spec)


def test_state_dict_spec_can_describe_one_block_generically():
    names = [name for name, _, _ in state_dict_spec(tiny_config(), expand_layers=False)]
    assert "blocks.{i}.attn.q_proj.weight" in names and "blocks.0.attn.q_proj.weight" not in names


def test_load_weights_round_trips_a_state_dict():
    for overrides in (VARIANTS["llama"], VARIANTS["gqa_tied"]):
        source, target = tiny_model(seed=1, **overrides), tiny_model(seed=2, **overrides)
        load_weights(target, source.state_dict())
        ids = random_ids(2, 6)
        torch.testing.assert_close(target(ids), source(ids))


def test_load_weights_names_missing_unexpected_and_misshaped_keys():
    model = tiny_model(tiny_config())
    state = dict(model.state_dict())
    del state["blocks.1.ffn.up_proj.weight"]
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3)
    state["final_norm.weight"] = torch.zeros(31)
    with pytest.raises(ValueError) as error:
        load_weights(model, state)
    message = str(error.value)
    assert "missing keys: ['blocks.1.ffn.up_proj.weight']" in message
    assert "unexpected keys: ['blocks.0.attn.qkv.weight']" in message
    assert "final_norm.weight: expected shape (32,), got (31,)" in message


def test_load_weights_rejects_untied_head_for_tied_config():
    model = tiny_model(tiny_config(tie_embeddings=True))
    state = dict(model.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="ties them"):
        load_weights(model, state)


def test_bfloat16_model_runs_with_cache_and_stays_close_to_float32():
    model = tiny_model(tiny_config(n_kv_heads=2))
    ids = random_ids(2, 9)
    reference = model(ids)
    low = tiny_model(tiny_config(n_kv_heads=2)).to(torch.bfloat16)
    cache = low.make_kv_cache(2)
    assert cache.keys[0].dtype == torch.bfloat16
    logits = torch.cat([low(ids[:, :6], kv_cache=cache), low(ids[:, 6:], kv_cache=cache)], dim=1)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_forward_accepts_any_integer_id_dtype(dtype):
    model = tiny_model(tiny_config())
    ids = random_ids(2, 5, vocab=97)
    torch.testing.assert_close(model(ids.to(dtype)), model(ids))


def test_logit_softcap_is_cap_times_tanh_of_the_uncapped_logits():
    capped = tiny_model(tiny_config(logit_softcap=2.0))
    plain = tiny_model(tiny_config())  # same seed: the same weights, no cap
    plain.lm_head.weight.data.mul_(200.0)  # large logits, so the cap bites
    capped.lm_head.weight.data.copy_(plain.lm_head.weight)
    ids = random_ids(2, 9)
    uncapped = plain(ids)
    assert uncapped.abs().max() > 4.0
    torch.testing.assert_close(capped(ids), 2.0 * torch.tanh(uncapped / 2.0))
    assert capped(ids).abs().max() <= 2.0  # tanh rounds to exactly 1 in float32 far out


def test_qk_norm_gives_every_query_and_key_head_unit_rms_before_rope():
    model = tiny_model(tiny_config(qk_norm=True))
    attn = model.blocks[0].attn
    seen = {}
    hooks = [
        norm.register_forward_hook(lambda module, args, out, name=name: seen.__setitem__(name, out))
        for name, norm in (("q", attn.q_norm), ("k", attn.k_norm))
    ]
    model(random_ids(2, 7))
    for hook in hooks:
        hook.remove()
    for name in "qk":
        assert seen[name].shape == (2, 4, 7, 8)  # (batch, heads, seq, head_dim)
        rms = seen[name].square().mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-2, rtol=0)  # eps 1e-5 vs tiny q, k
    # Scaling the query projection by 7 changes almost nothing downstream: the norm removes the scale
    # (up to its eps); without QK-norm the same scaling sharpens every attention pattern.
    changes = []
    for qk_norm in (True, False):
        model = tiny_model(tiny_config(qk_norm=qk_norm))
        ids = random_ids(1, 6)
        before = model(ids)
        model.blocks[0].attn.q_proj.weight.data.mul_(7.0)
        changes.append((model(ids) - before).abs().max().item())
    assert changes[0] < 1e-3 and changes[1] > 10 * changes[0], changes


# ---- the training contract -------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"logit_softcap": 5.0}, {"positions": "learned"}])
def test_forward_with_targets_returns_the_mean_loss_over_targets_not_minus_100(overrides):
    model = tiny_model(**overrides)
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(2))
    targets[0, :4] = -100
    targets[2, 7:] = -100
    logits = model(ids)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss = model(ids, targets)
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    kept = targets != -100  # the mean is over the kept positions only
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[kept], targets[kept]))


def test_forward_with_targets_rejects_a_wrong_target_shape():
    model = tiny_model()
    with pytest.raises(ValueError, match="targets must be shaped as ids"):
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize(
    ("overrides", "tables"),
    [({}, ["lm_head.weight"]), ({"tie_embeddings": True}, []),
     ({"positions": "learned", "norm": "layer", "qk_norm": True, "tie_embeddings": True},
      ["pos_embeddings.weight"])],
)  # fmt: skip
def test_parameter_groups_put_every_trainable_parameter_in_exactly_one_group(overrides, tables):
    model = tiny_model(**overrides)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {kind: [names[id(p)] for p in params] for kind, params in model.parameter_groups().items()}
    assert list(groups) == list(PARAMETER_GROUPS)
    assert sorted(n for members in groups.values() for n in members) == sorted(names.values())
    assert groups["tables"] == tables and groups["embeddings"] == ["tok_embeddings.weight"]
    assert groups["adapters"] == []
    assert all(n.startswith("blocks.") and n.endswith("proj.weight") for n in groups["matrices"])
    assert len(groups["matrices"]) == 2 * 7
    assert all(n.endswith(("norm.weight", "norm.bias")) for n in groups["gains"])


def test_parameter_groups_leave_out_frozen_parameters_and_refuse_an_unclassified_one():
    model = tiny_model()
    model.blocks[0].attn.q_proj.weight.requires_grad_(False)
    matrices = model.parameter_groups()["matrices"]
    assert all(p is not model.blocks[0].attn.q_proj.weight for p in matrices) and len(matrices) == 13
    model.extra = torch.nn.Linear(3, 3)  # a 2-D weight outside the blocks: no group says what it is
    with pytest.raises(AssertionError, match="extra.weight belongs to no group"):
        model.parameter_groups()


def test_an_empty_batch_is_refused_by_name(tiny_model):
    with pytest.raises(ValueError, match="batch >= 1"):
        tiny_model()(torch.zeros(0, 5, dtype=torch.long))

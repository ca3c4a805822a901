"""Behaviours a mutation run (mutmut, issue 29) found unpinned: defaults, the accepted side of each
boundary, and paths no other test took. Each test is named after what it pins."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmbook.attention import KVCache, MultiHeadSelfAttention, grouped_attention
from llmbook.attention import scaled_dot_product_attention as sdpa
from llmbook.errors import ConfigError
from llmbook.ffn import GeluMLP, swiglu_hidden_dim
from llmbook.loss import bits_per_byte, cross_entropy
from llmbook.norms import LayerNorm, RMSNorm, rms_norm
from llmbook.position import (
    LearnedPositions,
    RotaryEmbedding,
    SinusoidalPositions,
    interleaved_to_half_split,
    rope_frequencies,
)


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---- norms ---------------------------------------------------------------------------------------


def test_rms_norm_default_eps_is_1e_minus_5():
    # On inputs of size 1e-3 the eps matters, so another default would show.
    x, weight = _randn(3, 16, scale=1e-3).double(), _randn(16, seed=1).double()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
    torch.testing.assert_close(rms_norm(x, weight), expected, rtol=1e-12, atol=0)
    assert RMSNorm(16).eps == LayerNorm(16).eps == 1e-5


def test_layer_norm_without_bias_has_no_bias_and_only_scales():
    layer = LayerNorm(8, bias=False)
    assert layer.bias is None and [name for name, _ in layer.named_parameters()] == ["weight"]
    x = _randn(2, 8)
    expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(layer(x), expected)


def test_layer_norm_returns_bfloat16_for_bfloat16_input_and_gain():
    out = LayerNorm(8).to(torch.bfloat16)(_randn(2, 8).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16


# ---- ffn -----------------------------------------------------------------------------------------


def test_gelu_mlp_defaults_to_exact_gelu_without_biases():
    mlp = GeluMLP(8, 16)
    assert mlp.activation_name == "gelu"
    assert {name for name, _ in mlp.named_parameters()} == {"up_proj.weight", "down_proj.weight"}
    x = _randn(3, 8)
    expected = F.linear(F.gelu(F.linear(x, mlp.up_proj.weight)), mlp.down_proj.weight)
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize(("d_model", "expected"), [(3, 8), (4, 11), (1, 3)])
def test_swiglu_hidden_dim_with_multiple_of_one_is_the_plain_ceiling(d_model, expected):
    assert swiglu_hidden_dim(d_model, multiple_of=1) == expected == math.ceil(8 * d_model / 3)


@pytest.mark.parametrize(("d_model", "multiple_of"), [(0, 32), (8, 0), (-1, 32)])
def test_swiglu_hidden_dim_refuses_sizes_below_one(d_model, multiple_of):
    with pytest.raises(ConfigError):
        swiglu_hidden_dim(d_model, multiple_of)


# ---- loss ----------------------------------------------------------------------------------------


def test_cross_entropy_with_every_target_ignored_is_nan_as_documented():
    assert math.isnan(cross_entropy(_randn(3, 5), torch.full((3,), -100)).item())


def test_cross_entropy_over_a_one_token_vocabulary_with_ignored_rows_is_zero():
    # The ignored rows are looked up at a safe index, which must exist even when the vocabulary is 1.
    loss = cross_entropy(_randn(3, 1), torch.tensor([0, -100, 0]))
    assert loss.item() == 0.0
    assert math.isnan(cross_entropy(_randn(2, 1), torch.tensor([-100, -100])).item())


def test_cross_entropy_refuses_integer_logits():
    with pytest.raises(TypeError, match="floating-point"):
        cross_entropy(torch.ones(3, 5, dtype=torch.long), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(("targets", "bad"), [([0, 5, 1], 5), ([0, -3, 7], -3), ([9, 1, 1], 9)])
def test_cross_entropy_names_the_target_outside_the_vocabulary(targets, bad):
    with pytest.raises(ValueError, match=rf"target id {bad} is outside the vocabulary \[0, 5\)"):
        cross_entropy(_randn(3, 5), torch.tensor(targets))


def test_bits_per_byte_of_no_tokens_is_zero():
    assert bits_per_byte(2.5, 0, 10) == 0.0


# ---- attention -----------------------------------------------------------------------------------


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_self_attention_is_causal_by_default(use_sdpa):
    torch.manual_seed(0)
    layer = MultiHeadSelfAttention(16, 4, use_sdpa=use_sdpa)
    x = _randn(1, 5, 16)
    changed = x.clone()
    changed[:, -1] += 1.0  # only the last token changes
    out, out_changed = layer(x), layer(changed)
    torch.testing.assert_close(out[:, :-1], out_changed[:, :-1])
    assert not torch.allclose(out[:, -1], out_changed[:, -1])


def test_grouped_attention_with_one_head_is_causal():
    q, k, v = _randn(1, 1, 4, 8), _randn(1, 1, 4, 8, seed=1), _randn(1, 1, 4, 8, seed=2)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(grouped_attention(q, k, v), expected)


def test_plain_attention_accepts_a_padding_mask_broadcast_over_queries():
    q, k, v = _randn(2, 3, 8), _randn(2, 4, 8, seed=1), _randn(2, 4, 8, seed=2)
    padding = torch.tensor([[True, True, True, False], [True, True, False, False]])[:, None, :]  # (2, 1, 4)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=padding)
    torch.testing.assert_close(sdpa(q, k, v, padding), expected)


def test_kv_cache_update_refuses_a_layer_one_past_the_last():
    cache = KVCache(2, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="layer index 2"):
        cache.update(2, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))


@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 3), (1, 2, 1, 4), (2, 1, 1, 4)], ids=["head_dim", "n_kv_heads", "batch"]
)
def test_kv_cache_update_refuses_keys_of_another_shape(shape):
    cache = KVCache(1, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="new keys/values must be"):
        cache.update(0, torch.zeros(shape), torch.zeros(shape))
    with pytest.raises(ValueError, match="new keys/values must be"):
        cache.update(0, torch.zeros(1, 1, 1, 4), torch.zeros(shape))


@pytest.mark.parametrize("field", ["n_layers", "batch_size", "n_kv_heads", "max_length", "head_dim"])
def test_kv_cache_refuses_every_size_below_one(field):
    sizes = {"n_layers": 1, "batch_size": 1, "n_kv_heads": 1, "max_length": 4, "head_dim": 4} | {field: 0}
    with pytest.raises(ConfigError, match=field):
        KVCache(**sizes)


# ---- position ------------------------------------------------------------------------------------


def test_rope_buffers_are_not_in_the_state_dict():
    # They are a formula of theta: a checkpoint (or a transformers one) must not carry them.
    assert RotaryEmbedding(8).state_dict() == {}


def test_rope_defaults_to_theta_10000_and_the_half_split_layout():
    expected = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    torch.testing.assert_close(rope_frequencies(8).double(), expected)
    rotary = RotaryEmbedding(8)
    torch.testing.assert_close(rotary.inv_freq.double(), expected)
    # Half-split: dimension 0 turns into dimension 4 (its pair), not into dimension 1.
    unit = torch.zeros(1, 1, 8)
    unit[..., 0] = 1.0
    rotated = rotary(unit, torch.tensor([1]))
    assert rotated[0, 0, 4].item() == pytest.approx(math.sin(1.0)) and rotated[0, 0, 1].item() == 0.0


def test_rope_rebuilt_after_a_bfloat16_cast_keeps_its_theta():
    rotary = RotaryEmbedding(8, theta=500.0, max_positions=16).to(torch.bfloat16)
    cos, sin = rotary.cos_sin(torch.arange(16))
    reference_cos, reference_sin = RotaryEmbedding(8, theta=500.0, max_positions=16).cos_sin(torch.arange(16))
    torch.testing.assert_close(cos, reference_cos)
    torch.testing.assert_close(sin, reference_sin)


def test_rope_accepts_the_smallest_theta_and_cache():
    rotary = RotaryEmbedding(8, theta=1.0, max_positions=1)
    assert torch.isfinite(rotary(_randn(1, 3, 8), torch.arange(3))).all()


@pytest.mark.parametrize("module", [SinusoidalPositions(8, 4), LearnedPositions(8, 4), RotaryEmbedding(4)])
def test_positions_refuse_bool_positions(module):
    with pytest.raises(TypeError, match="integers"):
        (module.cos_sin if isinstance(module, RotaryEmbedding) else module)(torch.tensor([True, False]))


def test_learned_positions_start_near_zero_with_std_0_02():
    torch.manual_seed(0)
    weight = LearnedPositions(1024, 64).weight
    assert abs(weight.mean().item()) < 1e-3
    assert weight.std().item() == pytest.approx(0.02, rel=0.02)


def test_learned_positions_error_names_the_first_position_past_the_table():
    with pytest.raises(ValueError, match="position 6 is beyond the learned table of 4 positions"):
        LearnedPositions(4, 8)(torch.tensor([1, 6]))


def test_sinusoidal_positions_accept_a_table_of_one_row_and_the_smallest_base():
    table = SinusoidalPositions(1, 4, base=1.0)(torch.arange(3))
    # base 1: every pair turns at one radian per position.
    torch.testing.assert_close(table[:, 0].double(), torch.arange(3).double().sin(), rtol=0, atol=1e-7)


# ---- from the second run ---------------------------------------------------------------------


def test_plain_attention_of_float64_is_computed_in_float64():
    q, k, v = (_randn(2, 3, 8, seed=seed).double() for seed in range(3))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    out = sdpa(q, k, v)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, weights @ v, rtol=1e-13, atol=1e-15)


def test_plain_attention_takes_two_dimensional_inputs():
    q, k, v = _randn(3, 8), _randn(4, 8, seed=1), _randn(4, 5, seed=2)
    torch.testing.assert_close(sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_grouped_attention_refuses_values_of_another_rank():
    with pytest.raises(ValueError, match="batch, heads, seq, head_dim"):
        grouped_attention(_randn(1, 2, 4, 8), _randn(1, 2, 4, 8), _randn(2, 4, 8))


def test_self_attention_with_a_single_head_is_allowed():
    assert MultiHeadSelfAttention(8, 1)(_randn(1, 3, 8)).shape == (1, 3, 8)


def test_kv_cache_advance_moves_the_length_forward():
    cache = KVCache(1, 1, 1, 4, 4)
    cache.advance(3)
    assert cache.length == 3
    with pytest.raises(ValueError, match="overflow"):
        cache.advance(2)


def test_rope_conversion_permutes_a_bias_like_a_weight():
    rows = [0, 2, 1, 3, 4, 6, 5, 7]  # per head of 4: the even dimensions, then the odd ones
    weight = _randn(8, 3)
    assert torch.equal(interleaved_to_half_split(weight, 2), weight[rows])
    assert interleaved_to_half_split(torch.arange(8.0), 2).tolist() == rows


@pytest.mark.parametrize(("shape", "n_heads"), [((6, 4), 2), ((8, 16), 16)], ids=["odd head_dim", "too many"])
def test_rope_conversion_refuses_rows_that_are_not_heads_of_even_width(shape, n_heads):
    with pytest.raises(ValueError, match=r"n_heads \* head_dim"):
        interleaved_to_half_split(_randn(*shape), n_heads)

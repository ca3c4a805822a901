"""Boundary values at the public entry points of the layer modules (issue 29): zero, negative, tiny,
huge, NaN/inf, wrong types, empty batches. Each either works (empty in, empty out) or raises a named
error that says which argument was wrong, never a raw allocator/einsum error, an IndexError from deep
inside, or a silent NaN."""

import math

import numpy as np
import pytest
import torch

from llmbook.attention import KVCache, MultiHeadSelfAttention, causal_mask, grouped_attention
from llmbook.attention import scaled_dot_product_attention as sdpa
from llmbook.embeddings import (
    cooccurrence_counts,
    cosine_similarity_matrix,
    nearest_neighbours,
    pca,
    ppmi,
    randomized_svd,
    svd_embeddings,
)
from llmbook.errors import ConfigError
from llmbook.ffn import GeluMLP, SwiGLU, swiglu_hidden_dim
from llmbook.loss import bits_per_byte, cross_entropy, perplexity
from llmbook.model_config import ModelConfig
from llmbook.norms import LayerNorm, RMSNorm, layer_norm, rms_norm
from llmbook.optim import AdamW, Muon, MuonAdamW
from llmbook.position import (
    LearnedPositions,
    RotaryEmbedding,
    SinusoidalPositions,
    half_split_to_interleaved,
    interleaved_to_half_split,
    rope_frequencies,
    rope_permutation,
)
from llmbook.quant import dequantize, fake_quantize


def _generator():
    return torch.Generator().manual_seed(0)


# ---- constructor and function arguments: a ConfigError naming the argument ----------------------

REFUSED_ARGUMENTS = [
    ("d", lambda: RMSNorm(0)),
    ("d", lambda: LayerNorm(-1)),
    ("d", lambda: RMSNorm(8.0)),
    ("eps", lambda: RMSNorm(8, eps=0.0)),
    ("eps", lambda: LayerNorm(8, eps=-1e-5)),
    ("eps", lambda: RMSNorm(8, eps=1e-300)),  # 0 in float32: a zero row would give 0/0
    ("eps", lambda: LayerNorm(8, eps=math.nan)),
    ("eps", lambda: RMSNorm(8, eps=math.inf)),
    ("eps", lambda: RMSNorm(8, eps="1e-5")),
    ("eps", lambda: rms_norm(torch.zeros(2, 4), torch.ones(4), 1e-300)),
    ("eps", lambda: layer_norm(torch.zeros(2, 4), torch.ones(4), None, 0.0)),
    ("d_model", lambda: SwiGLU(-1, 8)),
    ("d_ff", lambda: SwiGLU(8, 0)),
    ("d_model", lambda: GeluMLP(8.0, 16)),
    ("d_ff", lambda: GeluMLP(8, -1)),
    ("d_model", lambda: swiglu_hidden_dim(1.5)),
    ("d_model", lambda: swiglu_hidden_dim(True)),
    ("q_len", lambda: causal_mask(-1, 3)),
    ("q_len", lambda: causal_mask(1.5, 3)),
    ("d_model", lambda: MultiHeadSelfAttention(-8, 2)),
    ("d_model", lambda: MultiHeadSelfAttention(0, 1)),
    ("layer_idx", lambda: MultiHeadSelfAttention(8, 2, layer_idx=-1)),
    ("max_length", lambda: KVCache(1, 1, 1, 4.5, 4)),
    ("batch_size", lambda: KVCache(1, 0, 1, 4, 4)),
    ("n_new", lambda: KVCache(1, 1, 1, 4, 4).advance(-1)),
    ("max_positions", lambda: LearnedPositions(-1, 8)),
    ("d_model", lambda: LearnedPositions(4, -2)),
    ("d_model", lambda: SinusoidalPositions(4, -2)),
    ("base", lambda: SinusoidalPositions(4, 8, base=0.0)),
    ("base", lambda: SinusoidalPositions(4, 8, base=math.nan)),
    ("head_dim", lambda: RotaryEmbedding(0)),
    ("head_dim", lambda: RotaryEmbedding(-2)),
    ("theta", lambda: RotaryEmbedding(8, theta=math.nan)),
    ("theta", lambda: RotaryEmbedding(8, theta=1e-300)),  # frequencies overflow to inf: NaN angles
    ("max_positions", lambda: RotaryEmbedding(8, max_positions=2.5)),
    ("theta", lambda: rope_frequencies(8, theta=-1.0)),
    ("head_dim", lambda: rope_frequencies(0)),
    ("head_dim", lambda: rope_permutation(0)),
    ("n_heads", lambda: interleaved_to_half_split(torch.randn(8, 4), 0)),
    ("n_heads", lambda: half_split_to_interleaved(torch.randn(8, 4), -1)),
    ("vocab_size", lambda: cooccurrence_counts(torch.zeros(0, dtype=torch.long), -1, 2)),
    ("window", lambda: cooccurrence_counts(torch.tensor([0, 1]), 3, 1.5)),
    ("context_smoothing", lambda: ppmi(torch.rand(3, 3), math.nan)),
    ("context_smoothing", lambda: ppmi(torch.rand(3, 3), -1.0)),
    ("n_oversamples", lambda: randomized_svd(torch.rand(6, 6), 2, _generator(), n_oversamples=-5)),
    ("n_iter", lambda: randomized_svd(torch.rand(6, 6), 2, _generator(), n_iter=-1)),
    ("singular_power", lambda: svd_embeddings(torch.zeros(4, 4), 2, _generator(), singular_power=-1.0)),
    ("eps", lambda: cosine_similarity_matrix(torch.zeros(2, 4), torch.randn(3, 4), eps=0)),
    ("query_id", lambda: nearest_neighbours(torch.randn(5, 3), True, 2)),
    ("n_components", lambda: pca(torch.randn(5, 3), 2.5)),
    ("block_size", lambda: fake_quantize(torch.randn(2, 64), 4, 0)),
    ("block_size", lambda: fake_quantize(torch.randn(2, 64), 4, -32)),
    ("rope_theta", lambda: ModelConfig(rope_theta=1e-300)),
    ("norm_eps", lambda: ModelConfig(norm_eps=1e-300)),
]


@pytest.mark.parametrize(("argument", "call"), REFUSED_ARGUMENTS)
def test_bad_arguments_raise_a_config_error_naming_the_argument(argument, call):
    with pytest.raises(ConfigError, match=rf"\b{argument}\b") as caught:
        call()
    assert caught.value.field == argument


# ---- bad tensors: a ValueError/TypeError saying what was expected ------------------------------

REFUSED_INPUTS = [
    ("last axis of 1", lambda: RMSNorm(1)(torch.tensor(1.0))),
    ("last axis of 1", lambda: LayerNorm(1)(torch.tensor(1.0))),
    ("d_model=1", lambda: SwiGLU(1, 2)(torch.tensor(1.0))),
    ("d_model=1", lambda: GeluMLP(1, 2)(torch.tensor(1.0))),
    ("d_model=8", lambda: SwiGLU(8, 16)(torch.randn(2, 7))),
    ("d_model=8", lambda: GeluMLP(8, 16)(torch.randn(2, 7))),
    ("vocabulary axis", lambda: cross_entropy(torch.randn(3, 0), torch.zeros(3, dtype=torch.long))),
    ("d_k of at least 1", lambda: sdpa(torch.randn(2, 3, 0), torch.randn(2, 3, 0), torch.randn(2, 3, 4))),
    ("multiple of the key/value heads", lambda: grouped_attention(*_heads(3, 2))),
    ("multiple of the key/value heads", lambda: grouped_attention(*_heads(3, 0))),
    ("multiple of the key/value heads", lambda: grouped_attention(*_heads(2, 4))),
    (r"\(batch, heads, seq, head_dim\)", lambda: grouped_attention(*(torch.randn(2, 5, 8),) * 3)),
    ("beyond RoPE's limit", lambda: RotaryEmbedding(8)(torch.randn(1, 1, 8), torch.tensor([2**31]))),
    ("n_heads \\* head_dim", lambda: interleaved_to_half_split(torch.randn(8, 4), 16)),
    ("finite and non-negative", lambda: ppmi(torch.tensor([[math.nan, 1.0], [1.0, 1.0]]))),
    ("finite and non-negative", lambda: ppmi(torch.tensor([[math.inf, 1.0], [1.0, 1.0]]))),
    ("2-D matrix", lambda: randomized_svd(torch.zeros(4), 1, _generator())),
    ("rank", lambda: randomized_svd(torch.rand(6, 6), 2.5, _generator())),
    ("same d", lambda: cosine_similarity_matrix(torch.zeros(2, 4), torch.randn(3, 5))),
    ("table", lambda: nearest_neighbours(torch.zeros(5), 0, 1)),
    (r"\(n, d\)", lambda: pca(torch.randn(5), 1)),
    ("finite", lambda: fake_quantize(torch.full((1, 32), math.nan), 4)),
    ("finite", lambda: fake_quantize(torch.tensor([[math.inf] + [0.0] * 31]), 4)),
    ("float64", lambda: fake_quantize(torch.tensor([[3e38, -3e38] + [0.0] * 30]), 4)),
    ("non-negative integer sizes", lambda: dequantize(torch.zeros(4, dtype=torch.uint8), 0, (-1,))),
    ("non-negative integer sizes", lambda: dequantize(torch.zeros(4, dtype=torch.uint8), 0, (-1, -1))),
    ("uint8", lambda: dequantize(torch.zeros(1, dtype=torch.float32), 0, (1,))),
    ("uint8", lambda: dequantize([0, 0, 0, 0], 0, (1,))),
    ("finite n_tokens", lambda: bits_per_byte(1.0, 1, math.inf)),
    ("finite n_tokens", lambda: bits_per_byte(1.0, math.inf, 1)),
    ("finite n_tokens", lambda: bits_per_byte(1.0, math.nan, 1)),
    ("numbers", lambda: bits_per_byte(1.0, True, 1)),
]


def _heads(q_heads, kv_heads):
    return torch.randn(1, q_heads, 4, 8), torch.randn(1, kv_heads, 4, 8), torch.randn(1, kv_heads, 4, 8)


@pytest.mark.parametrize(("message", "call"), REFUSED_INPUTS)
def test_bad_inputs_raise_a_clear_value_or_type_error(message, call):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


# ---- inputs at the edge that must work ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
@pytest.mark.parametrize("layer", [RMSNorm(8), LayerNorm(8), SwiGLU(8, 16), GeluMLP(8, 16)])
def test_empty_batches_and_sequences_pass_through_the_layers(layer, shape):
    assert layer(torch.randn(*shape)).shape == shape


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("shape", [(0, 3, 16), (2, 0, 16)])
def test_attention_of_an_empty_batch_or_sequence_is_empty(shape, use_sdpa):
    layer = MultiHeadSelfAttention(16, 4, 2, use_sdpa=use_sdpa)
    assert layer(torch.randn(*shape)).shape == shape


def test_rms_norm_of_float64_is_computed_in_float64():
    # float64 keeps its precision (and its range: entries whose squares overflow float32 normalise).
    x = torch.tensor([[1e30, -1e30, 1e30, 1e30]], dtype=torch.float64)
    torch.testing.assert_close(rms_norm(x, torch.ones(4, dtype=torch.float64)), x / 1e30, rtol=1e-15, atol=0)
    x = torch.randn(3, 16, dtype=torch.float64)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(RMSNorm(16).double()(x), expected, rtol=1e-14, atol=0)
    centred = x - x.mean(-1, keepdim=True)
    expected = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(LayerNorm(16).double()(x), expected, rtol=1e-12, atol=1e-14)


def test_smallest_float32_eps_keeps_a_zero_row_finite():
    tiny = torch.finfo(torch.float32).tiny
    assert torch.equal(RMSNorm(8, eps=tiny)(torch.zeros(2, 8)), torch.zeros(2, 8))
    assert torch.equal(LayerNorm(8, eps=tiny)(torch.zeros(2, 8)), torch.zeros(2, 8))


def test_cross_entropy_of_an_empty_sequence_is_nan_like_all_ignored_targets():
    # The mean over no targets is 0/0; only the vocabulary axis may not be empty.
    loss = cross_entropy(torch.randn(2, 0, 5), torch.zeros(2, 0, dtype=torch.long))
    assert math.isnan(loss.item())


def test_cross_entropy_accepts_narrow_integer_targets():
    logits = torch.randn(3, 5, generator=_generator())
    targets = torch.tensor([1, 2, 3])
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert torch.equal(cross_entropy(logits, targets.to(dtype)), cross_entropy(logits, targets))


def test_perplexity_beyond_the_float_range_is_inf_for_floats_and_tensors():
    assert perplexity(1000.0) == math.inf
    assert perplexity(torch.tensor(1000.0)) == math.inf
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))


def test_bits_per_byte_takes_a_bytes_per_token_ratio_and_numpy_counts():
    assert bits_per_byte(math.log(2), 1, 0.5) == pytest.approx(2.0)
    assert bits_per_byte(math.log(2), np.int64(4), np.int64(2)) == pytest.approx(2.0)


def test_plain_attention_in_float16_does_not_overflow_its_scores():
    # q·k = 8 · 300² = 720,000 > float16's 65,504: the scores must not become inf (softmax(inf) = NaN).
    q = torch.full((1, 3, 8), 300.0, dtype=torch.float16)
    v = torch.randn(1, 3, 4, generator=_generator()).half()
    out = sdpa(q, q, v)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, sdpa(q.float(), q.float(), v.float()).half())


def test_kv_cache_length_cannot_be_moved_backwards():
    cache = KVCache(1, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="n_new"):
        cache.advance(-1)
    assert cache.length == 0


def test_sinusoidal_positions_far_beyond_the_table_are_computed_without_growing_it():
    positions = SinusoidalPositions(4, 8)
    far = positions(torch.tensor([2**40]))
    angle = 2**40 * 10000.0 ** (-2 / 8)  # dims 2 and 3: the second frequency
    assert far[0, 2].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert far[0, 3].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert positions.table.shape == (4, 8)


def test_rope_accepts_the_last_exact_float32_position():
    rotary = RotaryEmbedding(8, max_positions=4)
    last = torch.tensor([2**24 - 1])
    x = torch.randn(1, 1, 8, generator=_generator())
    angles = (2**24 - 1) * rope_frequencies(8).double()
    expected_first = x[0, 0, 0] * angles[0].cos() - x[0, 0, 4] * angles[0].sin()
    assert rotary(x, last)[0, 0, 0].item() == pytest.approx(expected_first.item(), abs=1e-3)


def test_fake_quantize_of_float64_holds_ranges_beyond_float32():
    weight = torch.tensor([[3e38, -3e38] + [0.0] * 30], dtype=torch.float64)
    out = fake_quantize(weight, 8)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    assert out[0, 0].item() == pytest.approx(3e38) and out[0, 1].item() == pytest.approx(-3e38)


def test_fake_quantize_of_empty_weights_is_empty():
    assert fake_quantize(torch.zeros(0, 64), 4).shape == (0, 64)
    assert fake_quantize(torch.zeros(2, 0), 4).shape == (2, 0)


# ---- optimizer constructors ----------------------------------------------------------------------

OPTIMIZERS = {
    "AdamW": lambda **kw: AdamW([torch.nn.Parameter(torch.randn(4, 4))], **kw),
    "Muon": lambda **kw: Muon([torch.nn.Parameter(torch.randn(4, 4))], **kw),
    "MuonAdamW": lambda **kw: MuonAdamW(
        [
            {"params": [torch.nn.Parameter(torch.randn(4, 4))], "use_muon": True},
            {"params": [torch.nn.Parameter(torch.randn(4))], "use_muon": False},
        ],
        **kw,
    ),
}
BAD_HYPERPARAMETERS = [
    ("lr", math.inf),
    ("lr", math.nan),
    ("lr", -1.0),
    ("lr", "1e-3"),
    ("lr", True),
    ("weight_decay", math.inf),
    ("weight_decay", -0.1),
    ("eps", 0.0),
    ("eps", -1.0),
    ("eps", math.inf),
    ("eps", math.nan),
]


@pytest.mark.parametrize(("name", "value"), BAD_HYPERPARAMETERS)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_optimizers_refuse_non_finite_or_out_of_range_hyperparameters(optimizer, name, value):
    with pytest.raises(ConfigError, match=rf"{optimizer}\.{name}\b"):
        OPTIMIZERS[optimizer](**{name: value})


@pytest.mark.parametrize("optimizer", ["AdamW", "MuonAdamW"])
@pytest.mark.parametrize("betas", [(0.9, 1.0), (math.nan, 0.9), (0.9,), (-0.1, 0.9)])
def test_adam_optimizers_refuse_bad_betas(optimizer, betas):
    with pytest.raises(ConfigError, match="betas"):
        OPTIMIZERS[optimizer](betas=betas)


@pytest.mark.parametrize("optimizer", ["Muon", "MuonAdamW"])
@pytest.mark.parametrize("ns_steps", [0, -1, 2.5, 100])
def test_muon_optimizers_refuse_bad_ns_steps_when_built(optimizer, ns_steps):
    with pytest.raises(ConfigError, match="ns_steps"):
        OPTIMIZERS[optimizer](ns_steps=ns_steps)

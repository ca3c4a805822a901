"""Tests for llmbook.attention: plain formula, fused path, PyTorch reference, masks, KV cache."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from llmbook.attention import KVCache, MultiHeadSelfAttention, causal_mask, scaled_dot_product_attention
from llmbook.position import RotaryEmbedding


def make_attention(d_model=32, n_heads=4, n_kv_heads=None, use_sdpa=True, seed=0):
    torch.manual_seed(seed)
    attn = MultiHeadSelfAttention(d_model, n_heads, n_kv_heads=n_kv_heads, use_sdpa=use_sdpa)
    for module in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
        nn.init.normal_(module.weight, std=0.3)
    return attn


def test_causal_mask_is_lower_triangle_for_square_shape():
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(3, 3), expected)


def test_causal_mask_lets_new_queries_see_all_cached_keys():
    # 2 new queries after 3 cached positions: query 0 is position 3, query 1 is position 4.
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)


def test_plain_attention_matches_explicit_softmax_formula():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 8, generator=generator) for _ in range(3))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v), weights @ v)


def test_plain_attention_matches_torch_sdpa_with_mask():
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 6, 8, generator=generator)
    k = torch.randn(2, 3, 9, 8, generator=generator)
    v = torch.randn(2, 3, 9, 5, generator=generator)
    mask = torch.rand(2, 1, 6, 9, generator=generator) > 0.3
    mask[..., 0] = True  # every row sees at least one key
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask), expected)


def test_fully_masked_row_returns_zeros_without_nan_gradients():
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, 3, 4, generator=generator, requires_grad=True)
    k = torch.randn(1, 5, 4, generator=generator, requires_grad=True)
    v = torch.randn(1, 5, 4, generator=generator, requires_grad=True)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    out = scaled_dot_product_attention(q, k, v, mask)
    assert torch.equal(out[0, 1], torch.zeros(4))
    assert out[0, 0].abs().sum() > 0
    out.sum().backward()
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_sdpa_and_plain_paths_agree(n_kv_heads):
    fast = make_attention(n_kv_heads=n_kv_heads, use_sdpa=True)
    plain = make_attention(n_kv_heads=n_kv_heads, use_sdpa=False)
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(4))
    rotary = RotaryEmbedding(8)
    torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast(x, rotary=rotary), plain(x, rotary=rotary), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast(x, causal=False), plain(x, causal=False), atol=1e-5, rtol=1e-5)


def test_paths_agree_on_fully_masked_rows_and_return_zeros_before_output_projection():
    fast, plain = make_attention(use_sdpa=True), make_attention(use_sdpa=False)
    for attn in (fast, plain):
        nn.init.eye_(attn.o_proj.weight)  # so the output shows the attention result itself
    x = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(5))
    # A left-padded batch: sequence 0 has its first two positions padded, so queries 0 and 1 see nothing.
    padding = torch.tensor([[False, False, True, True], [True, True, True, True]])
    mask = padding[:, None, None, :]
    out_fast, out_plain = fast(x, mask=mask), plain(x, mask=mask)
    torch.testing.assert_close(out_fast, out_plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(out_fast[0, :2], torch.zeros(2, 32))
    assert torch.isfinite(out_fast).all() and out_fast[0, 2:].abs().sum() > 0


def test_length_one_sequence_attends_to_itself():
    attn = make_attention()
    x = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(6))
    # With one key, softmax gives weight 1: the output is o_proj(v_proj(x)).
    expected = attn.o_proj(attn.v_proj(x))
    torch.testing.assert_close(attn(x), expected)
    attn.use_sdpa = False
    torch.testing.assert_close(attn(x), expected)


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_matches_torch_multihead_attention_on_same_weights(use_sdpa):
    ours = make_attention(use_sdpa=use_sdpa)
    theirs = nn.MultiheadAttention(32, 4, bias=False, batch_first=True)
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        theirs.out_proj.weight.copy_(ours.o_proj.weight)
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(7))
    forbidden = ~causal_mask(6, 6)  # nn.MultiheadAttention's bool mask marks what may NOT be attended
    expected, _ = theirs(x, x, x, attn_mask=forbidden, need_weights=False)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
    expected_full, _ = theirs(x, x, x, need_weights=False)
    torch.testing.assert_close(ours(x, causal=False), expected_full, atol=1e-5, rtol=1e-5)


def test_causal_attention_ignores_future_tokens():
    attn = make_attention()
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(8))
    changed = x.clone()
    changed[:, 4:] = torch.randn(1, 2, 32)
    torch.testing.assert_close(attn(x)[:, :4], attn(changed)[:, :4])
    assert not torch.allclose(attn(x)[:, 4:], attn(changed)[:, 4:])


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_weights():
    gqa = make_attention(n_kv_heads=2)
    mha = MultiHeadSelfAttention(32, 4)
    head_dim = 8
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            heads = getattr(gqa, name).weight.reshape(2, head_dim, 32)
            # Query heads 0,1 share kv head 0 and heads 2,3 share kv head 1.
            getattr(mha, name).weight.copy_(heads.repeat_interleave(2, dim=0).reshape(32, 32))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-6, rtol=1e-5)
    assert gqa.k_proj.weight.shape == (16, 32)


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_kv_cache_prefill_then_decode_equals_full_forward(use_sdpa, n_kv_heads):
    attn = make_attention(n_kv_heads=n_kv_heads, use_sdpa=use_sdpa)
    rotary = RotaryEmbedding(8)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(10))
    full = attn(x, rotary=rotary)
    cache = KVCache(1, batch_size=2, n_kv_heads=attn.n_kv_heads, max_length=16, head_dim=8)
    pieces = []
    for start, stop in [(0, 4), (4, 5), (5, 7), (7, 8), (8, 9)]:  # prefill, decode, chunk, decode, decode
        pieces.append(attn(x[:, start:stop], rotary=rotary, kv_cache=cache))
        cache.advance(stop - start)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 9


def test_kv_cache_overflow_raises_value_error():
    attn = make_attention()
    cache = KVCache(1, batch_size=1, n_kv_heads=4, max_length=4, head_dim=8)
    attn(torch.randn(1, 3, 32), kv_cache=cache)
    cache.advance(3)
    with pytest.raises(ValueError, match="max_length=4"):
        attn(torch.randn(1, 2, 32), kv_cache=cache)


def test_kv_cache_reset_starts_over():
    attn = make_attention()
    cache = KVCache(1, batch_size=1, n_kv_heads=4, max_length=8, head_dim=8)
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(11))
    first = attn(x, kv_cache=cache)
    cache.advance(5)
    cache.reset()
    assert cache.length == 0
    torch.testing.assert_close(attn(x, kv_cache=cache), first)


def test_d_model_not_divisible_by_n_heads_raises():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MultiHeadSelfAttention(30, 4)


def test_n_heads_not_divisible_by_n_kv_heads_raises():
    with pytest.raises(ValueError, match="divisible by n_kv_heads"):
        MultiHeadSelfAttention(32, 4, n_kv_heads=3)


def test_wrong_input_shape_raises_with_expected_shape():
    attn = make_attention()
    with pytest.raises(ValueError, match=r"\(batch, seq, d_model=32\)"):
        attn(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"\(batch, seq, d_model=32\)"):
        attn(torch.randn(5, 32))


def test_plain_attention_rejects_mismatched_shapes_and_non_bool_masks():
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="last axis d_k"):
        scaled_dot_product_attention(q, torch.randn(2, 5, 7), v)
    with pytest.raises(ValueError, match="as many keys"):
        scaled_dot_product_attention(q, k, torch.randn(2, 6, 3))
    with pytest.raises(TypeError, match="bool"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(4, 5))
    with pytest.raises(ValueError, match="mask must end in"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(4, 4, dtype=torch.bool))


def test_attention_weights_are_causal_rows_that_reproduce_the_output():
    attn = make_attention(n_kv_heads=2)
    rotary = RotaryEmbedding(8)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(12))
    weights = attn.attention_weights(x, rotary=rotary)
    assert weights.shape == (2, 4, 5, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))
    assert torch.equal(weights[..., 0, 1:], torch.zeros(2, 4, 4))  # the first token sees only itself
    v = attn.v_proj(x).reshape(2, 5, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    heads = (weights @ v).transpose(1, 2).reshape(2, 5, 32)
    torch.testing.assert_close(attn.o_proj(heads), attn(x, rotary=rotary), atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    q_len=st.integers(1, 6),
    k_len=st.integers(1, 6),
    d_k=st.integers(1, 9),
    d_v=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_plain_attention_matches_torch_on_random_shapes_and_masks(batch, q_len, k_len, d_k, d_v, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, d_k, generator=generator)
    k = torch.randn(batch, k_len, d_k, generator=generator)
    v = torch.randn(batch, k_len, d_v, generator=generator)
    mask = torch.rand(batch, q_len, k_len, generator=generator) > 0.4
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    expected = expected.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # documented: empty rows give zeros
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask), expected, atol=1e-5, rtol=1e-5)

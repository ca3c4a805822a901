"""Tests for llmbook.position: absolute position tables, RoPE in both layouts, and the weight permutation."""

import math

import pytest
import torch

from llmbook.position import (
    LearnedPositions,
    RotaryEmbedding,
    SinusoidalPositions,
    half_split_to_interleaved,
    interleaved_to_half_split,
    rope_frequencies,
    rope_permutation,
)


def test_sinusoidal_table_matches_the_paper_formula():
    d_model = 6
    table = SinusoidalPositions(10, d_model)(torch.arange(10))
    for pos in (0, 3, 9):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_positions_extend_beyond_max_positions():
    small, large = SinusoidalPositions(4, 8), SinusoidalPositions(64, 8)
    positions = torch.tensor([[0, 5], [17, 40]])
    torch.testing.assert_close(small(positions), large(positions))
    assert small(positions).shape == (2, 2, 8)


def test_sinusoidal_table_is_not_in_the_state_dict():
    assert len(SinusoidalPositions(8, 4).state_dict()) == 0


def test_learned_positions_look_up_rows_and_reject_positions_past_the_table():
    learned = LearnedPositions(5, 3)
    torch.testing.assert_close(learned(torch.tensor([4, 0])), learned.weight[[4, 0]])
    with pytest.raises(ValueError, match="beyond the learned table of 5 positions"):
        learned(torch.tensor([5]))


def test_positions_must_be_integer_tensors():
    with pytest.raises(TypeError, match="integers"):
        RotaryEmbedding(4)(torch.randn(1, 2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=">= 0"):
        LearnedPositions(5, 3)(torch.tensor([-1]))


def test_rope_frequencies_follow_theta_power_law():
    freqs = rope_frequencies(8, theta=100.0)
    expected = torch.tensor([100.0 ** (-2 * i / 8) for i in range(4)])
    torch.testing.assert_close(freqs, expected)


def test_rope_preserves_vector_norms():
    rotary = RotaryEmbedding(16)
    x = torch.randn(2, 3, 10, 16, generator=torch.Generator().manual_seed(0))
    rotated = rotary(x, torch.arange(10))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


def test_rope_at_position_zero_is_identity():
    x = torch.randn(5, 8)
    torch.testing.assert_close(RotaryEmbedding(8)(x, torch.zeros(5, dtype=torch.long)), x)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_scores_depend_only_on_relative_position(interleaved):
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 32, generator=generator), torch.randn(1, 32, generator=generator)
    rotary = RotaryEmbedding(32, interleaved=interleaved)

    def score(m: int, n: int) -> float:
        q_m = rotary(q, torch.tensor([m]))
        k_n = rotary(k, torch.tensor([n]))
        return (q_m * k_n).sum().item()

    for distance in (0, 1, 7):
        scores = [score(start + distance, start) for start in (0, 3, 100, 1000)]
        assert max(scores) - min(scores) < 1e-3, scores
    assert abs(score(5, 0) - score(0, 0)) > 1e-3  # ...and does depend on the distance


def test_interleaved_rotation_pairs_adjacent_dimensions():
    # One pair (head_dim 2): a rotation by angle = position * 1 radian.
    rotary = RotaryEmbedding(2, interleaved=True)
    out = rotary(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    torch.testing.assert_close(out, torch.tensor([[math.cos(1.0), math.sin(1.0)]]))
    # With head_dim 4, interleaved pairs (0, 1) and (2, 3); half-split pairs (0, 2) and (1, 3).
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    inter = RotaryEmbedding(4, interleaved=True)(x, torch.tensor([1]))
    half = RotaryEmbedding(4)(x, torch.tensor([1]))
    assert inter[0, 1].item() == pytest.approx(math.sin(1.0)) and inter[0, 2].item() == 0.0
    assert half[0, 2].item() == pytest.approx(math.sin(1.0)) and half[0, 1].item() == 0.0


def test_rope_permutation_converts_between_layouts():
    head_dim = 8
    perm = rope_permutation(head_dim)
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    x = torch.randn(3, 5, head_dim)
    positions = torch.arange(5)
    half, inter = RotaryEmbedding(head_dim), RotaryEmbedding(head_dim, interleaved=True)
    torch.testing.assert_close(half(x[..., perm], positions), inter(x, positions)[..., perm])


def test_permuted_projection_weights_give_identical_attention_scores():
    n_heads, head_dim, d_model = 2, 8, 12
    generator = torch.Generator().manual_seed(2)
    w_q = torch.randn(n_heads * head_dim, d_model, generator=generator)
    w_k = torch.randn(n_heads * head_dim, d_model, generator=generator)
    x = torch.randn(6, d_model, generator=generator)
    positions = torch.arange(6)

    def scores(w_q, w_k, rotary):
        q = (x @ w_q.T).reshape(6, n_heads, head_dim).transpose(0, 1)
        k = (x @ w_k.T).reshape(6, n_heads, head_dim).transpose(0, 1)
        return rotary(q, positions) @ rotary(k, positions).transpose(-1, -2)

    interleaved_scores = scores(w_q, w_k, RotaryEmbedding(head_dim, interleaved=True))
    w_q_half, w_k_half = interleaved_to_half_split(w_q, n_heads), interleaved_to_half_split(w_k, n_heads)
    half_scores = scores(w_q_half, w_k_half, RotaryEmbedding(head_dim))
    torch.testing.assert_close(half_scores, interleaved_scores, atol=1e-4, rtol=1e-5)
    # The inverse conversion undoes it exactly (and the wrong layout does not give the same scores).
    assert torch.equal(half_split_to_interleaved(interleaved_to_half_split(w_q, n_heads), n_heads), w_q)
    wrong = scores(w_q, w_k, RotaryEmbedding(head_dim))
    assert not torch.allclose(wrong, interleaved_scores, atol=1e-2)


def test_rope_cache_extends_beyond_max_positions():
    small, large = RotaryEmbedding(8, max_positions=4), RotaryEmbedding(8, max_positions=512)
    x = torch.randn(2, 3, 8)
    positions = torch.tensor([2, 100, 300])
    torch.testing.assert_close(small(x, positions), large(x, positions))
    assert small.max_positions >= 301


def test_rope_accepts_per_sequence_positions_for_4d_input():
    rotary = RotaryEmbedding(8)
    x = torch.randn(2, 3, 4, 8)  # (batch, heads, seq, head_dim)
    positions = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    out = rotary(x, positions)
    torch.testing.assert_close(out[1], rotary(x[1], torch.arange(5, 9)))
    torch.testing.assert_close(out[0], rotary(x[0], torch.arange(4)))


def test_rope_keeps_low_precision_dtype():
    x = torch.randn(1, 4, 8, dtype=torch.bfloat16)
    out = RotaryEmbedding(8)(x, torch.arange(4))
    assert out.dtype == torch.bfloat16
    reference = RotaryEmbedding(8)(x.float(), torch.arange(4))
    torch.testing.assert_close(out.float(), reference, atol=1e-2, rtol=1e-2)


def test_rope_rejects_odd_head_dim_and_mismatched_positions():
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="head_dim=8"):
        RotaryEmbedding(8)(torch.randn(3, 6), torch.arange(3))
    with pytest.raises(ValueError, match="seq=3"):
        RotaryEmbedding(8)(torch.randn(3, 8), torch.arange(4))


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_matches_transformers_llama(theta):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    head_dim, n_heads = 16, 3
    config = LlamaConfig(
        hidden_size=head_dim * n_heads,
        num_attention_heads=n_heads,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    hf_rotary = llama.LlamaRotaryEmbedding(config)
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, n_heads, 7, head_dim, generator=generator)
    k = torch.randn(2, n_heads, 7, head_dim, generator=generator)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15, 100]])
    cos, sin = hf_rotary(q, position_ids)
    q_hf, k_hf = llama.apply_rotary_pos_emb(q, k, cos, sin)
    ours = RotaryEmbedding(head_dim, theta=theta, max_positions=64)
    torch.testing.assert_close(ours(q, position_ids), q_hf, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours(k, position_ids), k_hf, atol=1e-6, rtol=1e-5)


def test_rope_rechecks_positions_modified_in_place():
    rotary = RotaryEmbedding(8, max_positions=4)
    x = torch.randn(2, 8)
    positions = torch.tensor([0, 1])
    rotary(x, positions)
    positions += 10  # same tensor object, new values beyond the cache: must still extend it
    torch.testing.assert_close(rotary(x, positions), RotaryEmbedding(8, max_positions=64)(x, positions))
    with pytest.raises(ValueError, match=">= 0"):
        positions -= 20
        rotary(x, positions)


def test_rope_keeps_float32_angles_after_model_is_cast_to_bfloat16():
    rotary = RotaryEmbedding(64, max_positions=4096).to(torch.bfloat16)
    x = torch.randn(1, 1, 64)
    positions = torch.tensor([3000])
    expected = RotaryEmbedding(64, max_positions=4096)(x, positions)
    torch.testing.assert_close(rotary(x, positions), expected)
    assert rotary.cos_cached.dtype == torch.float32


def test_a_model_looks_up_rope_angles_once_per_forward_and_shares_them_with_every_layer(monkeypatch):
    from llmbook.model import ModelConfig, TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=11, context_length=8, d_model=16, n_layers=3, n_heads=2))
    lookups = []
    original = RotaryEmbedding.cos_sin
    monkeypatch.setattr(RotaryEmbedding, "cos_sin", lambda self, p: lookups.append(p) or original(self, p))
    ids = torch.randint(0, 11, (2, 5))
    logits = model(ids)
    assert len(lookups) == 1  # three layers, q and k each: one lookup
    monkeypatch.undo()
    angles = model.rotary.angles(torch.arange(5))
    x = torch.randn(2, 2, 5, 8)
    torch.testing.assert_close(angles(x), model.rotary(x, torch.arange(5)))  # the same rotation
    with pytest.raises(ValueError, match="these angles are for seq=5"):
        angles(torch.randn(2, 2, 4, 8))
    # Angles looked up under inference mode are never reused by a later forward that needs gradients.
    with torch.inference_mode():
        model(ids)
    model(ids).sum().backward()
    assert logits.shape == (2, 5, 11) and model.lm_head.weight.grad is not None

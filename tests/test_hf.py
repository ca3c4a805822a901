"""Tests for llmbook.hf: our model and transformers' Llama agree on logits, both ways, and round-trip."""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from llmbook.hf import from_hf, hf_name, llmbook_name, to_hf  # noqa: E402
from llmbook.model import ModelConfig, TransformerLM, count_parameters, state_dict_spec  # noqa: E402

CONFIGS = {
    "mha_untied": dict(vocab_size=101, context_length=32, d_model=48, n_layers=2, n_heads=4),
    "gqa_tied": dict(
        vocab_size=101, context_length=32, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2,
        tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-6, d_ff=80,
    ),
}
LENGTHS = (1, 5, 11)


def random_model(config: ModelConfig, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    model = TransformerLM(config).eval()
    with torch.no_grad():  # perturb the unit norm gains too, so a wrongly mapped gain cannot hide
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.3 * torch.randn_like(param))
    return model


def padded_batch(vocab_size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the matching attention_mask for sequences of LENGTHS."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    attention_mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        ids[row, :length] = torch.randint(0, vocab_size, (length,), generator=generator)
        attention_mask[row, :length] = 1
    return ids, attention_mask


def assert_same_logits(ours: TransformerLM, theirs: LlamaForCausalLM) -> None:
    ids, attention_mask = padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        hf_logits = theirs(input_ids=ids, attention_mask=attention_mask).logits
        for row, length in enumerate(LENGTHS):
            our_logits = ours(ids[row : row + 1, :length])[0]
            torch.testing.assert_close(our_logits, hf_logits[row, :length], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_to_hf_gives_the_same_logits(name, attn_implementation):
    ours = random_model(ModelConfig(**CONFIGS[name]))
    assert_same_logits(ours, to_hf(ours, attn_implementation=attn_implementation))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_hf_gives_the_same_logits(name):
    config = ModelConfig(**CONFIGS[name])
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attn_implementation="eager",
    )
    torch.manual_seed(2)
    theirs = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0.0, 0.05)
    ours = from_hf(theirs)
    assert ours.config == config
    assert_same_logits(ours, theirs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_leaves_the_state_dict_unchanged(name):
    ours = random_model(ModelConfig(**CONFIGS[name]))
    back = from_hf(to_hf(ours))
    before, after = ours.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert back.config == ours.config


def test_tied_embeddings_stay_tied_in_transformers():
    ours = random_model(ModelConfig(**CONFIGS["gqa_tied"]))
    hf_model = to_hf(ours)
    assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    assert hf_model.config.num_key_value_heads == 2
    assert hf_model.num_parameters() == count_parameters(ours)  # both count the shared matrix once


def test_name_mapping_is_a_bijection_on_every_parameter():
    names = [name for name, _, _ in state_dict_spec(ModelConfig(**CONFIGS["mha_untied"]))]
    assert [llmbook_name(hf_name(name)) for name in names] == names
    assert hf_name("blocks.1.ffn_norm.weight") == "model.layers.1.post_attention_layernorm.weight"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(norm_position="post"), "norm_position"),
        (dict(ffn="gelu"), "ffn"),
        (dict(positions="learned"), "positions"),
        (dict(norm="layer"), "norm"),
        (dict(qk_norm=True), "qk_norm"),
        (dict(logit_softcap=30.0), "logit_softcap"),
    ],
)
def test_to_hf_rejects_configs_llama_cannot_express(overrides, field):
    config = ModelConfig(**(CONFIGS["mha_untied"] | overrides))
    with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
        to_hf(TransformerLM(config))


def test_from_hf_rejects_unsupported_transformers_configs():
    base = dict(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(ValueError, match="attention_bias"):
        from_hf(LlamaForCausalLM(LlamaConfig(**base, attention_bias=True)))
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf(LlamaForCausalLM(LlamaConfig(**base, hidden_act="gelu")))
    linear_rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    scaled = LlamaConfig(**base, rope_parameters=linear_rope)
    with pytest.raises(ValueError, match="rope_type='linear'"):
        from_hf(LlamaForCausalLM(scaled))


def test_greedy_decoding_with_our_kv_cache_matches_transformers_generate():
    ours = random_model(ModelConfig(**CONFIGS["gqa_tied"]))
    theirs = to_hf(ours)
    prompt = torch.tensor([[5, 17, 42, 8], [99, 3, 3, 60]])
    n_new = 6
    with torch.no_grad():
        expected = theirs.generate(prompt, max_new_tokens=n_new, do_sample=False, pad_token_id=0)
        cache = ours.make_kv_cache(batch_size=2)
        tokens = prompt
        logits = ours(prompt, kv_cache=cache)
        for _ in range(n_new):
            next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
            logits = ours(next_token, kv_cache=cache)
    assert torch.equal(tokens, expected)

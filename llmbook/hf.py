"""Convert between `llmbook.model.TransformerLM` and Hugging Face `transformers.LlamaForCausalLM`.

Our default configuration *is* the Llama architecture (pre-norm RMSNorm, half-split RoPE, SwiGLU, no
biases, optional grouped-query attention and tied embeddings), so conversion is a renaming of weights:

=====================================  ==============================================
llmbook                                transformers (Llama)
=====================================  ==============================================
tok_embeddings.weight                  model.embed_tokens.weight
blocks.{i}.attn_norm.weight            model.layers.{i}.input_layernorm.weight
blocks.{i}.attn.{q,k,v,o}_proj.weight  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
blocks.{i}.ffn_norm.weight             model.layers.{i}.post_attention_layernorm.weight
blocks.{i}.ffn.{gate,up,down}_proj     model.layers.{i}.mlp.{gate,up,down}_proj.weight
final_norm.weight                      model.norm.weight
lm_head.weight                         lm_head.weight
=====================================  ==============================================

Both sides use the half-split RoPE layout, so no q/k permutation is needed. Configurations Llama cannot
express (post-norm, LayerNorm, GELU, learned positions, ...) raise a ValueError naming the field.
Residual dropout is a training-time choice that Llama does not have; it is not carried across.
``transformers`` is imported lazily, so the rest of the package works without it.
"""

from dataclasses import replace
from typing import Any

from llmbook.model import ModelConfig, TransformerLM, load_weights

__all__ = ["to_hf", "from_hf", "llama_config", "hf_name", "llmbook_name"]

_REQUIRED = {
    "norm": "rms", "norm_position": "pre", "positions": "rope", "ffn": "swiglu", "qk_norm": False,
    "logit_softcap": None,
}  # fmt: skip

_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def hf_name(name: str) -> str:
    """The transformers Llama name of one of our parameter names."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    prefix, _, rest = name.partition(".")
    index, _, inner = rest.partition(".")
    if prefix == "blocks" and index.isdigit() and inner in _BLOCK_NAMES:
        return f"model.layers.{index}.{_BLOCK_NAMES[inner]}"
    raise ValueError(f"{name!r} has no counterpart in a Llama model")


def llmbook_name(name: str) -> str:
    """Our parameter name for one transformers Llama parameter name (inverse of `hf_name`)."""
    for ours, theirs in _TOP_NAMES.items():
        if name == theirs:
            return ours
    parts = name.split(".", 3)
    inverse = {theirs: ours for ours, theirs in _BLOCK_NAMES.items()}
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in inverse:
        return f"blocks.{parts[2]}.{inverse[parts[3]]}"
    raise ValueError(f"{name!r} is not a parameter of a Llama model that llmbook can represent")


def _check_llama_compatible(config: ModelConfig) -> None:
    for field, needed in _REQUIRED.items():
        value = getattr(config, field)
        if value != needed:
            raise ValueError(
                f"ModelConfig.{field}={value!r} cannot be expressed as a Llama model (Llama needs {needed!r})"
            )


def _rope_config_kwargs(theta: float) -> dict[str, Any]:
    import transformers

    # transformers 5 moved rope_theta into rope_parameters; 4.x takes it as a plain argument.
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": float(theta)}}
    return {"rope_theta": float(theta)}


def llama_config(config: ModelConfig, attn_implementation: str = "eager") -> Any:
    """The `transformers.LlamaConfig` describing the same architecture as ``config``."""
    from transformers import LlamaConfig

    _check_llama_compatible(config)
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation=attn_implementation,
        **_rope_config_kwargs(config.rope_theta),
    )


def to_hf(model: TransformerLM, attn_implementation: str = "eager") -> Any:
    """A `transformers.LlamaForCausalLM` with ``model``'s weights (same dtype and device), in eval mode."""
    from transformers import LlamaForCausalLM

    if not isinstance(model, TransformerLM):
        raise TypeError(f"to_hf expects an llmbook TransformerLM, got {type(model).__name__}")
    hf_config = llama_config(model.config, attn_implementation)
    weight = model.tok_embeddings.weight
    hf_model = LlamaForCausalLM(hf_config).to(device=weight.device, dtype=weight.dtype)
    ours = dict(model.state_dict())
    if model.config.tie_embeddings:
        ours.pop("lm_head.weight", None)  # transformers ties lm_head to embed_tokens itself
    theirs = {hf_name(name): tensor for name, tensor in ours.items()}
    missing, unexpected = hf_model.load_state_dict(theirs, strict=False)
    # A tied HF model reports lm_head.weight as missing although it shares the embedding tensor.
    missing = [name for name in missing if not (model.config.tie_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weight conversion failed: missing {missing}, unexpected {unexpected}")
    if model.config.tie_embeddings and hf_model.lm_head.weight is not hf_model.model.embed_tokens.weight:
        raise ValueError("transformers did not tie lm_head to embed_tokens although tie_word_embeddings=True")
    return hf_model.eval()


def _hf_rope_theta(hf_config: Any) -> float:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r} (RoPE scaling) is not supported; only 'default' RoPE is")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("the transformers config has no rope_theta")
    return float(theta)


def _config_from_hf(hf_config: Any) -> ModelConfig:
    def field(name: str, default: Any = None) -> Any:
        return getattr(hf_config, name, default)

    checks = {
        "hidden_act": (field("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(field("attention_bias", False)), False),
        "mlp_bias": (bool(field("mlp_bias", False)), False),
    }
    for name, (value, needed) in checks.items():
        if value != needed:
            raise ValueError(f"transformers config {name}={value!r} unsupported (llmbook needs {needed!r})")
    n_heads = field("num_attention_heads")
    head_dim = field("head_dim") or field("hidden_size") // n_heads
    if head_dim * n_heads != field("hidden_size"):
        raise ValueError(
            f"transformers config head_dim={head_dim} with num_attention_heads={n_heads} does not equal "
            f"hidden_size={field('hidden_size')}; llmbook needs head_dim = d_model / n_heads"
        )
    config = ModelConfig(
        vocab_size=field("vocab_size"),
        context_length=field("max_position_embeddings"),
        d_model=field("hidden_size"),
        n_layers=field("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=field("num_key_value_heads") or n_heads,
        d_ff=field("intermediate_size"),
        rope_theta=_hf_rope_theta(hf_config),
        norm_eps=field("rms_norm_eps"),
        tie_embeddings=bool(field("tie_word_embeddings", False)),
    )
    # Store None where the value equals our default rule, so a round trip gives back an equal config.
    if config.n_kv_heads == config.n_heads:
        config = replace(config, n_kv_heads=None)
    if config.d_ff == replace(config, d_ff=None).ffn_dim:
        config = replace(config, d_ff=None)
    return config


def from_hf(hf_model: Any) -> TransformerLM:
    """A `TransformerLM` with the weights (dtype and device) of a transformers Llama model, in eval mode."""
    hf_config = getattr(hf_model, "config", None)
    if hf_config is None or not hasattr(hf_model, "state_dict"):
        raise TypeError(f"from_hf expects a transformers LlamaForCausalLM, got {type(hf_model).__name__}")
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "llama":
        raise ValueError(f"from_hf supports model_type='llama', got model_type={model_type!r}")
    config = _config_from_hf(hf_config)
    theirs = hf_model.state_dict()
    ours = {llmbook_name(name): tensor for name, tensor in theirs.items()}
    weight = theirs["model.embed_tokens.weight"]
    model = TransformerLM(config).to(device=weight.device, dtype=weight.dtype)
    load_weights(model, ours)
    return model.eval()


"""`ModelConfig`: every size and design choice of a `llmbook.model.TransformerLM`, checked when made.

Kept apart from the model so that a config can be read, validated and compared (checkpoints, the
training presets, the Hugging Face and GGUF converters) without building layers. Import it as
`from llmbook.model import ModelConfig`, beside the model it describes; it lives here as
`llmbook.train_config.TrainConfig` lives beside the training loop.
"""

from dataclasses import dataclass

from llmbook.errors import ConfigValueError, check_bool, check_choice, check_float, check_int
from llmbook.ffn import swiglu_hidden_dim
from llmbook.norms import check_eps

__all__ = ["ModelConfig"]

_CHOICES = {
    "norm": ("rms", "layer", "none"),
    "norm_position": ("pre", "post"),
    "positions": ("rope", "learned", "sinusoidal", "none"),
    "ffn": ("swiglu", "gelu", "silu", "relu2"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Every size and design choice of a `TransformerLM`; the defaults describe a small Llama-style model.

    ``n_kv_heads=None`` means n_heads (plain multi-head attention); ``d_ff=None`` means the rule for the
    chosen ``ffn``: `swiglu_hidden_dim` (⌈8/3·d_model⌉ rounded up to a multiple of 32) for "swiglu",
    4·d_model for "gelu", "silu" and "relu2" (squared ReLU, relu(x)²). The fields keep what you passed
    (so ``dataclasses.replace(cfg, ffn="gelu")`` re-applies the rule); read the resolved numbers from
    `kv_heads`, `ffn_dim` and `head_dim`.
    ``dropout`` applies to the embedding output and to each sublayer output before it joins the residual.
    ``qk_norm`` RMS-normalises each head's query and key vectors (with learned gains) before RoPE, so the
    attention logits cannot grow without bound; ``logit_softcap`` = c squashes the output logits smoothly
    into (-c, c) with c·tanh(logits / c) (None: no cap).
    ``kernels`` builds the model with `llmbook.kernels.patch` applied: norms, RoPE, attention, SwiGLU and
    the loss run the fused Triton kernels of chapter 7 where they can (CUDA, or Triton's interpreter).
    """

    vocab_size: int = 50257
    context_length: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    norm: str = "rms"
    norm_position: str = "pre"
    positions: str = "rope"
    ffn: str = "swiglu"
    dropout: float = 0.0
    qk_norm: bool = False
    logit_softcap: float | None = None
    kernels: bool = False

    def __post_init__(self) -> None:
        # Frozen: a field changed after construction would bypass these checks (use dataclasses.replace).
        owner = "ModelConfig"
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            check_int(owner, name, getattr(self, name))
        check_int(owner, "n_kv_heads", self.n_kv_heads, optional=True)
        check_int(owner, "d_ff", self.d_ff, optional=True)
        check_float(owner, "rope_theta", self.rope_theta, minimum=1)  # below 1 see llmbook.position
        check_eps(owner, self.norm_eps, name="norm_eps")
        check_float(owner, "dropout", self.dropout, minimum=0, below=1)
        check_float(owner, "logit_softcap", self.logit_softcap, above=0, optional=True)
        check_bool(owner, "tie_embeddings", self.tie_embeddings)
        check_bool(owner, "qk_norm", self.qk_norm)
        check_bool(owner, "kernels", self.kernels)
        for name, allowed in _CHOICES.items():
            check_choice(owner, name, getattr(self, name), allowed)
        if self.d_model % self.n_heads != 0:
            raise ConfigValueError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})",
                "d_model",
            )
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads != 0:
            raise ConfigValueError(
                f"ModelConfig.n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})",
                "n_kv_heads",
            )
        if self.positions == "rope" and self.head_dim % 2 != 0:
            raise ConfigValueError(
                f"ModelConfig.positions='rope' needs an even head_dim, got {self.head_dim}", "positions"
            )
        if self.positions == "sinusoidal" and self.d_model % 2 != 0:
            raise ConfigValueError(
                f"ModelConfig.positions='sinusoidal' needs an even d_model, got {self.d_model}", "positions"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head: d_model // n_heads."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads actually used (n_kv_heads, or n_heads when None)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the feed-forward network actually used (d_ff, or the rule for ``ffn``)."""
        if self.d_ff is not None:
            return self.d_ff
        return swiglu_hidden_dim(self.d_model) if self.ffn == "swiglu" else 4 * self.d_model

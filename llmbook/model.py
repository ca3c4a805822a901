"""The whole decoder-only language model: block, model, and the arithmetic about it.

ids (batch, seq) → token embeddings (+ absolute positions) → n_layers × TransformerBlock → final norm
→ lm_head → logits (batch, seq, vocab). The defaults build a Llama-style model: pre-norm RMSNorm, RoPE
(half-split), SwiGLU, grouped-query capable attention, no biases. Every choice the book ablates is a
`ModelConfig` field (defined in `llmbook.model_config`, imported from here).

Initialisation (GPT-2 / nanoGPT recipe): every linear and embedding weight ~ N(0, 0.02²), biases zero,
norm gains one; the two projections that write into the residual stream (``attn.o_proj`` and
``ffn.down_proj``) use std 0.02/√(2·n_layers), because each block adds two such outputs to the residual
and their sum's variance would otherwise grow with depth. Seed with ``torch.manual_seed`` before building.
"""

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from llmbook.attention import KVCache, MultiHeadSelfAttention
from llmbook.ffn import GeluMLP, SwiGLU
from llmbook.loss import linear_cross_entropy, soft_cap
from llmbook.model_config import ModelConfig
from llmbook.norms import LayerNorm, RMSNorm
from llmbook.position import LearnedPositions, RotaryAngles, RotaryEmbedding, SinusoidalPositions

__all__ = [
    "ModelConfig",
    "TransformerBlock",
    "TransformerLM",
    "Adapter",
    "PARAMETER_GROUPS",
    "count_parameters",
    "flops_per_token",
    "state_dict_spec",
    "load_weights",
]

def _make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rms":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    if config.norm == "layer":
        return LayerNorm(config.d_model, eps=config.norm_eps)
    return nn.Identity()


def _make_ffn(config: ModelConfig) -> nn.Module:
    if config.ffn == "swiglu":
        return SwiGLU(config.d_model, config.ffn_dim)
    return GeluMLP(config.d_model, config.ffn_dim, activation=config.ffn)


class Adapter(nn.Module):
    """A module that adds trainable adapter weights beside weights it leaves as they are (`llmbook.lora`).

    `adapter_parameters()` names the adapter's own tensors: they form the model's "adapters" group.
    """

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter's own parameters (not the wrapped layer's)."""
        raise NotImplementedError(f"{type(self).__name__} must list its adapter parameters")


# The model's parameter groups (`TransformerLM.parameter_groups`), each with what its members are.
PARAMETER_GROUPS = {
    "matrices": "the blocks' weight matrices: maps from hidden vectors to hidden vectors",
    "tables": "an untied LM head and a learned position table: 2-D, one row per token or position",
    "embeddings": "the token-embedding table (rows are looked up, never multiplied)",
    "gains": "norm gains and biases (1-D)",
    "adapters": "adapter weights added beside frozen layers (LoRA's A and B)",
}


class TransformerBlock(nn.Module):
    """One block: attention then feed-forward, each wrapped in a residual connection and a norm.

    pre-norm (default): x = x + attn(attn_norm(x)); x = x + ffn(ffn_norm(x)).
    post-norm (original Transformer): x = attn_norm(x + attn(x)); x = ffn_norm(x + ffn(x)).
    (batch, seq, d_model) -> (batch, seq, d_model).
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn_norm = _make_norm(config)
        qk_norms = [RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None for _ in "qk"]
        self.attn = MultiHeadSelfAttention(
            config.d_model, config.n_heads, n_kv_heads=config.kv_heads, layer_idx=layer_idx,
            q_norm=qk_norms[0], k_norm=qk_norms[1],
        )  # fmt: skip
        self.ffn_norm = _make_norm(config)
        self.ffn = _make_ffn(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Float[Tensor, "batch seq d_model"],
        rotary: RotaryEmbedding | RotaryAngles | None = None,
        positions: Int[Tensor, "*batch seq"] | None = None,
        kv_cache: KVCache | None = None,
    ) -> Float[Tensor, "batch seq d_model"]:
        """Apply the two residual sublayers."""
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.attn_norm(x), rotary, positions, kv_cache))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(x + self.dropout(self.attn(x, rotary, positions, kv_cache)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class TransformerLM(nn.Module):
    """Decoder-only language model: forward(ids (batch, seq)) -> logits (batch, seq, vocab), or with
    ``targets`` (batch, seq) the mean next-token loss over the targets that are not -100.

    ``head_loss(hidden, lm_head_weight, targets, softcap=...)`` is how forward turns final hidden states into
    that loss (`llmbook.loss.linear_cross_entropy`; the fused Triton kernel where `llmbook.kernels.patch`
    was applied, which never holds all the logits at once).
    """

    head_loss = staticmethod(linear_cross_entropy)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.pos_embeddings = LearnedPositions(config.context_length, config.d_model)
        elif config.positions == "sinusoidal":
            self.pos_embeddings = SinusoidalPositions(config.context_length, config.d_model)
        else:
            self.pos_embeddings = None
        # RoPE has no weights, so one module (with its cos/sin cache) serves every layer.
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.rope_theta, config.context_length)
            if config.positions == "rope"
            else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        # Post-norm blocks already end in a norm, so only pre-norm models need a final one.
        self.final_norm = _make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        if config.kernels:
            from llmbook.kernels import patch  # imported only here: Triton is not needed otherwise

            patch(self)

    def reset_parameters(self) -> None:
        """N(0, 0.02²) weights, zero biases, unit gains; residual output projections scaled (module doc)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith("attn.o_proj") or name.endswith("ffn.down_proj")
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual_out else 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding | LearnedPositions):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, RMSNorm | LayerNorm):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def make_kv_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_length`` (default context_length)."""
        config = self.config
        max_length = config.context_length if max_length is None else max_length
        if config.positions == "learned" and max_length > config.context_length:
            raise ValueError(
                f"max_length={max_length} exceeds context_length={config.context_length}, "
                "and learned positions have no vectors beyond it"
            )
        param = self.tok_embeddings.weight
        return KVCache(
            config.n_layers, batch_size, config.kv_heads, max_length, config.head_dim,
            device=param.device, dtype=param.dtype,
        )

    def _check_ids(self, ids: Tensor, kv_cache: KVCache | None) -> None:
        if not isinstance(ids, Tensor):
            raise ValueError(f"ids must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor (torch.long), got dtype {ids.dtype}")
        if ids.ndim != 2 or 0 in ids.shape:
            raise ValueError(
                f"ids must be shaped (batch, seq) with batch >= 1 and seq >= 1, got {tuple(ids.shape)}"
                + ("; add a batch axis with ids[None]" if ids.ndim == 1 else "")
            )
        # aminmax has no uint16 kernel: widen first (forward does the same before the embedding).
        widened = ids if ids.dtype in (torch.int32, torch.int64) else ids.long()
        low, high = torch.stack(torch.aminmax(widened)).tolist()  # one GPU sync for both
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is out of range for vocab_size={self.config.vocab_size}")
        seq = ids.shape[1]
        if kv_cache is None:
            if seq > self.config.context_length:
                raise ValueError(
                    f"sequence length {seq} exceeds context_length={self.config.context_length}; "
                    "crop the input to its last context_length tokens"
                )
            return
        if kv_cache.batch_size != ids.shape[0]:
            raise ValueError(f"ids have batch {ids.shape[0]}, the KV cache holds {kv_cache.batch_size}")
        if kv_cache.n_layers != self.config.n_layers:
            raise ValueError(f"the KV cache has {kv_cache.n_layers} layers, the model {self.config.n_layers}")
        kv_cache.check_room(seq)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters by kind (`PARAMETER_GROUPS`), each in exactly one group, in model order.

        The optimizers read these (`llmbook.optim.param_groups`, `muon_param_groups`), so which weight is a
        matrix, a table or a gain is decided here, by module, not by matching parameter names.
        """
        adapters = {id(p) for m in self.modules() if isinstance(m, Adapter) for p in m.adapter_parameters()}
        tables = [] if self.config.tie_embeddings else [self.lm_head.weight]
        if self.config.positions == "learned":
            tables.append(self.pos_embeddings.weight)
        members = {
            "matrices": {id(p) for p in self.blocks.parameters() if p.ndim == 2} - adapters,
            "tables": {id(p) for p in tables},
            "embeddings": {id(self.tok_embeddings.weight)},
            "gains": {id(p) for p in self.parameters() if p.ndim < 2} - adapters,
            "adapters": adapters,
        }
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in PARAMETER_GROUPS}
        for name, param in self.named_parameters():  # a tied weight is listed once
            if not param.requires_grad:
                continue
            kinds = [kind for kind, ids in members.items() if id(param) in ids]
            if len(kinds) != 1:
                raise AssertionError(f"parameter {name} belongs to {kinds or 'no group'}, not exactly one")
            groups[kinds[0]].append(param)
        return groups

    def forward(
        self,
        ids: Int[Tensor, "batch seq"],
        targets: Int[Tensor, "batch seq"] | None = None,
        kv_cache: KVCache | None = None,
    ) -> Float[Tensor, "batch seq vocab"] | Float[Tensor, ""]:
        """Logits for the next token at every position, or with ``targets`` the mean loss over the targets
        that are not -100 (float32); with a cache, ids continue the cached sequence."""
        hidden = self.final_hidden(ids, kv_cache)
        if targets is not None:
            if targets.shape != ids.shape:
                shapes = f"ids {tuple(ids.shape)}, targets {tuple(targets.shape)}"
                raise ValueError(f"targets must be shaped as ids, got {shapes}")
            return self.head_loss(hidden, self.lm_head.weight, targets, softcap=self.config.logit_softcap)
        return soft_cap(self.lm_head(hidden), self.config.logit_softcap)

    def final_hidden(
        self, ids: Int[Tensor, "batch seq"], kv_cache: KVCache | None = None
    ) -> Float[Tensor, "batch seq d_model"]:
        """The hidden states the LM head reads: after every block and the final norm."""
        self._check_ids(ids, kv_cache)
        if ids.dtype not in (torch.int32, torch.int64):
            ids = ids.long()  # nn.Embedding indexes with int32/int64 only (e.g. uint16 from a memmap)
        offset = kv_cache.length if kv_cache is not None else 0
        positions = torch.arange(offset, offset + ids.shape[1], device=ids.device)
        x = self.tok_embeddings(ids)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(positions).to(x.dtype)
        x = self.dropout(x)
        # RoPE's angles for these positions, looked up once and shared by every layer.
        rotary = self.rotary.angles(positions) if self.rotary is not None else None
        for block in self.blocks:
            x = block(x, rotary, positions, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(ids.shape[1])
        return self.final_norm(x)


def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of trainable numbers in ``model``, each shared (tied) tensor counted once.

    ``exclude_embeddings`` drops the token-embedding table and a learned position table (Kaplan et al.'s
    "non-embedding" count). An untied ``lm_head`` is a matmul and stays counted; a tied one *is* the
    embedding table and is excluded with it.
    """
    excluded: set[int] = set()
    if exclude_embeddings:
        for module in model.modules():
            if isinstance(module, nn.Embedding | LearnedPositions):
                excluded.add(id(module.weight))
    # model.parameters() already yields a tied tensor only once.
    return sum(p.numel() for p in model.parameters() if id(p) not in excluded)


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> int:
    """Forward-pass FLOPs per token at ``seq_len`` (default context_length), counting 2 per multiply-add.

    Counts every matrix multiply: q/k/v/o projections, attention scores (q·k) and the weighted sum of values
    over all ``seq_len`` keys (what a dense masked implementation computes; causal kernels can skip about
    half of it), the feed-forward matrices and the LM head. Excludes the cheap elementwise work: embedding
    lookup, norms, RoPE, softmax, activations, gating products and residual adds (O(d_model) per token,
    under 1% for realistic sizes). A training step costs about 3× this (forward + backward).
    """
    seq_len = config.context_length if seq_len is None else seq_len
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    d_model, d_attn = config.d_model, config.n_heads * config.head_dim
    d_kv = config.kv_heads * config.head_dim
    projections = d_model * d_attn + 2 * d_model * d_kv + d_attn * d_model
    attention = 2 * seq_len * d_attn  # scores (seq_len dot products of head_dim per head) + weighted values
    n_ffn_matrices = 3 if config.ffn == "swiglu" else 2
    ffn = n_ffn_matrices * d_model * config.ffn_dim
    lm_head = d_model * config.vocab_size
    return 2 * (config.n_layers * (projections + attention + ffn) + lm_head)


SpecEntry = tuple[str, tuple[int, ...], str]
_NORM_MEANING = {"rms": "RMSNorm gain", "layer": "LayerNorm gain"}


def _norm_entries(config: ModelConfig, prefix: str, where: str) -> list[SpecEntry]:
    if config.norm == "none":
        return []
    entries = [(f"{prefix}.weight", (config.d_model,), f"{_NORM_MEANING[config.norm]} {where}")]
    if config.norm == "layer":
        entries.append((f"{prefix}.bias", (config.d_model,), f"LayerNorm bias {where}"))
    return entries


def _block_entries(config: ModelConfig, index: str) -> list[SpecEntry]:
    p, d, f = f"blocks.{index}", config.d_model, config.ffn_dim
    q_dim, kv_dim = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    pre = config.norm_position == "pre"
    where = "before attention" if pre else "after attention + residual"
    entries = _norm_entries(config, f"{p}.attn_norm", where)
    entries += [
        (f"{p}.attn.q_proj.weight", (q_dim, d), "query projection, rows = n_heads·head_dim"),
        (f"{p}.attn.k_proj.weight", (kv_dim, d), "key projection, rows = n_kv_heads·head_dim"),
        (f"{p}.attn.v_proj.weight", (kv_dim, d), "value projection, rows = n_kv_heads·head_dim"),
        (f"{p}.attn.o_proj.weight", (d, q_dim), "attention output projection into the residual"),
    ]
    if config.qk_norm:
        entries += [
            (f"{p}.attn.{x}_norm.weight", (config.head_dim,), f"QK-norm: RMSNorm gain of each {what} head")
            for x, what in (("q", "query"), ("k", "key"))
        ]
    entries += _norm_entries(config, f"{p}.ffn_norm", "before the FFN" if pre else "after FFN + residual")
    if config.ffn == "swiglu":
        entries.append((f"{p}.ffn.gate_proj.weight", (f, d), "SwiGLU gate projection (through silu)"))
    entries += [
        (f"{p}.ffn.up_proj.weight", (f, d), "FFN up projection"),
        (f"{p}.ffn.down_proj.weight", (d, f), "FFN down projection into the residual"),
    ]
    return entries


def state_dict_spec(config: ModelConfig, expand_layers: bool = True) -> list[SpecEntry]:
    """The weights a `TransformerLM` with ``config`` has: (name, shape, meaning) in data-flow order.

    With ``expand_layers=False`` one block is listed with ``blocks.{i}.`` names (for a table in the book).
    A tied model lists no ``lm_head.weight``: its LM head *is* ``tok_embeddings.weight``.
    """
    d, vocab = config.d_model, config.vocab_size
    spec: list[SpecEntry] = [("tok_embeddings.weight", (vocab, d), "token embedding table, one row per id")]
    if config.positions == "learned":
        spec.append(("pos_embeddings.weight", (config.context_length, d), "learned position vectors"))
    for index in [str(i) for i in range(config.n_layers)] if expand_layers else ["{i}"]:
        spec += _block_entries(config, index)
    if config.norm_position == "pre":
        spec += _norm_entries(config, "final_norm", "before the LM head")
    if not config.tie_embeddings:
        spec.append(("lm_head.weight", (vocab, d), "LM head: one row of logit weights per vocabulary entry"))
    return spec


def load_weights(model: TransformerLM, state_dict: dict[str, Tensor]) -> None:
    """Copy a plain state dict named as in `state_dict_spec` into ``model``; ValueError on any mismatch.

    Every missing key, unexpected key and wrong shape is listed. For a tied model ``lm_head.weight`` may be
    present (``model.state_dict()`` contains it) but must then equal ``tok_embeddings.weight``.
    """
    spec = {name: shape for name, shape, _ in state_dict_spec(model.config)}
    given = dict(state_dict)
    problems = []
    if model.config.tie_embeddings and "lm_head.weight" in given:
        tied = given.pop("lm_head.weight")
        emb = given.get("tok_embeddings.weight")
        if emb is not None and (tied.shape != emb.shape or not torch.equal(tied.to(emb.device), emb)):
            problems.append("lm_head.weight differs from tok_embeddings.weight, but the config ties them")
    missing = [name for name in spec if name not in given]
    unexpected = [name for name in given if name not in spec]
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    for name, shape in spec.items():
        if name in given and tuple(given[name].shape) != shape:
            problems.append(f"{name}: expected shape {shape}, got {tuple(given[name].shape)}")
    if problems:
        raise ValueError("load_weights: state dict does not match the model:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in given.items():
            params[name].copy_(value)

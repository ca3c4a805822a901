"""Chapter 11 exercises: a LoRA layer, its merge derived, the assistant-only targets to debug, GRPO's
group-normalised advantages and clipped policy loss, and the number of LoRA parameters to predict.
"""

import torch
from torch import nn

from llmbook.exercises.core import Case, draw, exercise
from llmbook.grpo import clipped_policy_loss, group_advantages
from llmbook.lora import LoRALinear, add_lora, lora_layers, merge
from llmbook.model import ModelConfig, TransformerLM
from llmbook.sft import SFTExample

# ----------------------------------------------------------------------------------------------------
# 11.lora_layer and 11.lora_merge: a LoRALinear built from the given tensors is the reference.


def _lora_module(weight, bias, lora_A, lora_B, alpha) -> LoRALinear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.__class__ = LoRALinear
    layer.init_adapter(lora_A.shape[0], alpha)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
        layer.lora_A.copy_(lora_A)
        layer.lora_B.copy_(lora_B)
    return layer


def _lora_forward(x, weight, bias, lora_A, lora_B, alpha):
    with torch.no_grad():
        return _lora_module(weight, bias, lora_A, lora_B, alpha)(x)


def _merged_weight(weight, lora_A, lora_B, alpha):
    layer = _lora_module(weight, None, lora_A, lora_B, alpha)
    holder = nn.ModuleDict({"layer": layer})
    merge(holder)
    return layer.weight.detach().clone()


def _lora_tensors(g, d_in, d_out, rank, bias=True, zero_b=False):
    weight = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    b = torch.randn(d_out, generator=g) if bias else None
    lora_A = torch.randn(rank, d_in, generator=g) / d_in**0.5
    lora_B = torch.zeros(d_out, rank) if zero_b else torch.randn(d_out, rank, generator=g)
    return weight, b, lora_A, lora_B


def _lora_layer_hidden(g):
    d_in, d_out, rank = draw(g, 2, 24), draw(g, 2, 24), draw(g, 1, 6)
    weight, bias, lora_A, lora_B = _lora_tensors(g, d_in, d_out, rank, bias=bool(draw(g, 0, 2)))
    x = torch.randn(draw(g, 1, 4), draw(g, 1, 6), d_in, generator=g)
    yield Case((x, weight, bias, lora_A, lora_B, float(draw(g, 1, 33))), note="random sizes")


@exercise(
    "11.lora_layer",
    reference=_lora_forward,
    forbid=("llmbook.lora.LoRALinear", "llmbook.lora.add_lora"),
    hidden=_lora_layer_hidden,
    hint=(
        "The frozen layer's output plus the low-rank path: x goes through A, then B, then is scaled.",
        "x Wᵀ + b is torch.nn.functional.linear(x, weight, bias) (bias may be None); the adapter adds "
        "linear(linear(x, lora_A), lora_B) times alpha / rank, where rank = lora_A.shape[0].",
    ),
)
def _lora_layer_cases():
    g = torch.Generator().manual_seed(110)
    weight, bias, lora_A, lora_B = _lora_tensors(g, 6, 5, 2, zero_b=True)
    x = torch.randn(3, 6, generator=g)
    yield Case(
        (x, weight, bias, lora_A, lora_B, 4.0),
        expected=_lora_forward(x, weight, bias, lora_A, lora_B, 4.0),
        note="B = 0, as at the start of training: the layer is the frozen one",
    )
    weight, bias, lora_A, lora_B = _lora_tensors(g, 8, 4, 2)
    x = torch.randn(2, 3, 8, generator=g)
    yield Case(
        (x, weight, bias, lora_A, lora_B, 16.0),
        expected=_lora_forward(x, weight, bias, lora_A, lora_B, 16.0),
        note="a (batch, seq, in) input, rank 2, alpha 16",
    )
    weight, _, lora_A, lora_B = _lora_tensors(g, 7, 7, 3, bias=False)
    x = torch.randn(4, 7, generator=g)
    yield Case(
        (x, weight, None, lora_A, lora_B, 3.0),
        expected=_lora_forward(x, weight, None, lora_A, lora_B, 3.0),
        note="no bias (as in Llama's projections), rank 3, alpha = rank: the scale is 1",
    )


def _lora_merge_hidden(g):
    d_in, d_out, rank = draw(g, 2, 24), draw(g, 2, 24), draw(g, 1, 6)
    weight, _, lora_A, lora_B = _lora_tensors(g, d_in, d_out, rank, bias=False)
    yield Case((weight, lora_A, lora_B, float(draw(g, 1, 33))), note="random sizes")


@exercise(
    "11.lora_merge",
    reference=_merged_weight,
    kind="derive",
    forbid=("llmbook.lora.merge", "llmbook.lora.LoRALinear.delta_weight"),
    hidden=_lora_merge_hidden,
    hint=(
        "Write the adapted layer as one linear map: x Wᵀ + s · x Aᵀ Bᵀ = x (W + ΔW)ᵀ. What is ΔW?",
        "x Aᵀ Bᵀ = x (B A)ᵀ, so ΔW = s · B A with s = alpha / rank and rank = lora_A.shape[0]; the merged "
        "weight, shape (out, in), is W + ΔW.",
    ),
)
def _lora_merge_cases():
    g = torch.Generator().manual_seed(111)
    weight, _, lora_A, lora_B = _lora_tensors(g, 6, 4, 2, bias=False)
    yield Case(
        (weight, lora_A, lora_B, 16.0),
        expected=_merged_weight(weight, lora_A, lora_B, 16.0),
        note="rank 2, alpha 16: scale 8",
    )
    weight, _, lora_A, lora_B = _lora_tensors(g, 5, 9, 1, bias=False)
    yield Case(
        (weight, lora_A, lora_B, 1.0),
        expected=_merged_weight(weight, lora_A, lora_B, 1.0),
        note="rank 1: the update is one outer product",
    )
    weight, _, lora_A, lora_B = _lora_tensors(g, 8, 3, 4, bias=False, zero_b=True)
    yield Case(
        (weight, lora_A, lora_B, 8.0),
        expected=_merged_weight(weight, lora_A, lora_B, 8.0),
        note="B = 0: merging changes nothing",
    )


# ----------------------------------------------------------------------------------------------------
# 11.assistant_targets: the targets of one conversation, -100 outside the assistant's tokens.


def _assistant_targets(ids: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    example = SFTExample(ids=ids.tolist(), trained=trained.tolist())
    return torch.tensor(example.targets(), dtype=torch.long)


def _broken_assistant_targets(ids, trained):
    """(seq,) token ids and (seq,) bools (True on the assistant's tokens) -> (seq - 1,) targets."""
    targets = ids[1:].clone()  # position t predicts token t + 1
    targets[~trained[:-1]] = -100  # only the assistant's tokens are learnt
    return targets


def _conversation(g, prompt: int, reply: int, after: int = 1):
    ids = torch.randint(0, 49152, (prompt + reply + after,), generator=g)
    trained = torch.zeros(prompt + reply + after, dtype=torch.bool)
    trained[prompt : prompt + reply] = True
    return ids, trained


def _assistant_targets_hidden(g):
    for _ in range(3):
        ids, trained = _conversation(g, draw(g, 2, 30), draw(g, 1, 8), draw(g, 0, 3))
        yield Case((ids, trained), note="a random conversation")
    ids, trained = _conversation(g, draw(g, 2, 10), draw(g, 1, 4), 1)
    second_ids, second_trained = _conversation(g, draw(g, 2, 10), draw(g, 1, 4), 1)
    yield Case((torch.cat([ids, second_ids]), torch.cat([trained, second_trained])), note="two turns")


@exercise(
    "11.assistant_targets",
    reference=_assistant_targets,
    kind="debug",
    broken=_broken_assistant_targets,
    forbid=("llmbook.sft.SFTExample.targets", "llmbook.sft.pad_batch"),
    hidden=_assistant_targets_hidden,
    hint=(
        "Which token is position t's target, and whose token is it? The mask must describe the target.",
        "targets[t] is ids[t + 1], so it is kept when token t + 1 is the assistant's: the mask that goes "
        "with the targets is trained[1:], not trained[:-1]. As written, the first token of each reply is "
        "never learnt and the token after the reply is.",
        "Look at line 4: `trained[:-1]` says whether the *input* token t is the assistant's, but the "
        "target at position t is token t + 1. Which slice of `trained` lines up with `ids[1:]`?",
    ),
)
def _assistant_targets_cases():
    ids = torch.tensor([1, 9, 9, 2, 7, 5, 3, 8])
    trained = torch.tensor([False, False, False, False, True, True, True, False])
    yield Case(
        (ids, trained),
        expected=_assistant_targets(ids, trained),
        note="a prompt of 4 tokens, a reply of 2 and its end token, then a newline",
    )
    g = torch.Generator().manual_seed(112)
    ids, trained = _conversation(g, 20, 5, 1)
    yield Case((ids, trained), expected=_assistant_targets(ids, trained), note="a longer prompt")
    ids, trained = _conversation(g, 6, 3, 0)
    yield Case(
        (ids, trained),
        expected=_assistant_targets(ids, trained),
        note="the conversation ends with the reply's last token",
    )


# ----------------------------------------------------------------------------------------------------
# 11.group_advantages and 11.clipped_loss: GRPO's pieces, against llmbook.grpo.


def _group_advantages_hidden(g):
    rewards = (torch.rand(draw(g, 1, 5), draw(g, 2, 9), generator=g) < 0.5).float()
    yield Case((rewards, True), note="random 0/1 rewards, divided by the std")
    yield Case((rewards, False), note="random 0/1 rewards, mean only")
    yield Case((torch.randn(3, 4, generator=g), True), note="real-valued rewards")


@exercise(
    "11.group_advantages",
    reference=group_advantages,
    forbid=("llmbook.grpo.group_advantages",),
    hidden=_group_advantages_hidden,
    hint=(
        "Each row is one prompt's group: compare each answer's reward with its own row, not the whole batch.",
        "Subtract each row's mean (dim=1, keepdim=True); with scale_by_std, divide by the row's sample "
        "standard deviation (torch's default, n - 1) plus eps = 1e-4. A row of equal rewards gives zeros.",
    ),
)
def _group_advantages_cases():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    yield Case((rewards, True), expected=group_advantages(rewards, True), note="two prompts, four answers")
    yield Case((rewards, False), expected=group_advantages(rewards, False), note="without the std (Dr. GRPO)")
    same = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    yield Case(
        (same, True),
        expected=group_advantages(same, True),
        note="a group where every answer is right teaches nothing",
    )


def _clipped_loss_hidden(g):
    rows, seq = draw(g, 1, 5), draw(g, 1, 7)
    old = -torch.rand(rows, seq, generator=g) * 3
    new = old + torch.randn(rows, seq, generator=g) * 0.4
    yield Case((new, old, torch.randn(rows, generator=g), 0.1 * draw(g, 1, 4)), note="random ratios")


@exercise(
    "11.clipped_loss",
    reference=clipped_policy_loss,
    forbid=("llmbook.grpo.clipped_policy_loss", "llmbook.grpo.grpo_loss"),
    hidden=_clipped_loss_hidden,
    hint=(
        "The ratio is p / p_old = exp(log_probs - old_log_probs); a row's advantage multiplies its tokens.",
        "loss = -min(ratio · A, clamp(ratio, 1 - epsilon, 1 + epsilon) · A), per token, with A of shape "
        "(batch,) broadcast as (batch, 1).",
    ),
)
def _clipped_loss_cases():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.4, 0.8]]))
    new = torch.log(torch.tensor([[0.5, 0.7, 0.3], [0.1, 0.4, 0.9]]))
    advantages = torch.tensor([1.0, -1.0])
    yield Case(
        (new, old, advantages, 0.2),
        expected=clipped_policy_loss(new, old, advantages, 0.2),
        note="ratios 1, 1.4 and 0.6 for a good answer; 0.5, 1 and 1.125 for a bad one",
    )
    yield Case(
        (old, old, advantages, 0.2),
        expected=clipped_policy_loss(old, old, advantages, 0.2),
        note="the first update: every ratio is 1, the loss is -A per token",
    )
    yield Case(
        (new, old, torch.tensor([0.0, 2.0]), 0.1),
        expected=clipped_policy_loss(new, old, torch.tensor([0.0, 2.0]), 0.1),
        note="epsilon 0.1, a zero advantage",
    )


# ----------------------------------------------------------------------------------------------------
# 11.predict_lora_parameters: the trainable numbers of LoRA on SmolLM2's q and v projections.

SMOLLM2_SHAPE = dict(
    vocab_size=49152,
    context_length=8192,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    d_ff=1536,
    tie_embeddings=True,
)


def lora_trainable_parameters(rank: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> int:
    """Trainable numbers of `llmbook.lora.add_lora` on a model shaped like SmolLM2-135M (built on meta)."""
    with torch.device("meta"):
        model = TransformerLM(ModelConfig(**SMOLLM2_SHAPE))
        add_lora(model, rank=rank, alpha=2 * rank, targets=targets)
    assert all(layer.lora_A.requires_grad for layer in lora_layers(model).values())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@exercise(
    "11.predict_lora_parameters",
    reference=lora_trainable_parameters,
    kind="predict",
    rtol=0.0,
    atol=0.0,
    hint=(
        "Per adapted layer, A is (rank, in) and B is (out, rank). What are in and out for q and for v?",
        "d_model = 576; q maps 576 -> 576; v maps 576 -> 3 key/value heads of 64 = 192. Each layer adds "
        "rank · (in + out) numbers; there are 30 blocks.",
        "8 · (576 + 576) + 8 · (576 + 192) per block, times 30.",
    ),
)
def _predict_lora_parameters_cases():
    yield Case((), expected=lora_trainable_parameters(), note="rank 8 on q_proj and v_proj, exact")

"""GRPO written out (Shao et al., 2024, DeepSeekMath): reinforcement learning from a checkable reward,
as a few small functions and one step that wires them together.

For each prompt the policy samples ``k`` answers (`rollout`); a reward function scores each; an answer's
advantage is its reward against its own group's (`group_advantages`: minus the group mean, and divided by
the group's standard deviation unless ``scale_by_std=False``, as Dr. GRPO argues, Liu et al., 2025). The
loss is PPO's clipped policy-ratio loss per completion token (`clipped_policy_loss`), plus optionally
β · KL to the starting model by the k3 estimator (`kl_k3`), averaged over completion tokens by `masked_mean`
in one of three ways (per sequence as in GRPO, per token of the batch as in DAPO, or over a constant
budget as in Dr. GRPO). No value network: the group is the baseline.

Shapes: ``ids`` (batch, seq) are prompt + completion + padding; per-token tensors are (batch, seq - 1),
aligned with the targets ``ids[:, 1:]`` (the position that *predicts* token t+1 holds its log-prob).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from llmbook.sample import generate

__all__ = [
    "NORMALISATIONS",
    "Rollout",
    "group_advantages",
    "token_log_probs",
    "clipped_policy_loss",
    "kl_k3",
    "masked_mean",
    "rollout",
    "grpo_loss",
    "grpo_step",
]

# How `masked_mean` averages per-token values over a batch's completion tokens.
NORMALISATIONS = {
    "sequence": "each sequence's mean over its own tokens, then the mean over sequences (GRPO)",
    "token": "the sum over every completion token of the batch / their number (DAPO)",
    "constant": "the sum over every completion token / (batch · completion budget), a constant (Dr. GRPO)",
}


def group_advantages(
    rewards: Float[Tensor, "prompts k"], scale_by_std: bool = True, eps: float = 1e-4
) -> Float[Tensor, "prompts k"]:
    """(reward - its group's mean), divided by (the group's standard deviation + eps) if ``scale_by_std``.

    The standard deviation is the sample one (n - 1), as in TRL's GRPOTrainer. A group whose answers all
    got the same reward has advantage 0 everywhere: it says nothing about which answer is better.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(
            f"rewards must be (prompts, k) with k >= 2 answers per prompt, got {tuple(rewards.shape)}"
        )
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def token_log_probs(model: nn.Module, ids: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch seq_minus_1"]:
    """log p(ids[:, t+1] | ids[:, :t+1]) under ``model`` at every position, in float32."""
    logits = model(ids[:, :-1]).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)


def clipped_policy_loss(
    log_probs: Float[Tensor, "batch seq"],
    old_log_probs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, " batch"],
    epsilon: float = 0.2,
) -> Float[Tensor, "batch seq"]:
    """PPO's per-token loss: -min(ratio · A, clip(ratio, 1 - ε, 1 + ε) · A), ratio = p / p_old.

    The clip stops a token's probability being pushed further once it moved more than ε from where the
    sampling policy had it, in the direction the advantage asks for; the min keeps the pessimistic term.
    """
    ratio = torch.exp(log_probs - old_log_probs)
    advantage = rearrange(advantages, "batch -> batch 1")
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * advantage
    return -torch.minimum(unclipped, clipped)


def kl_k3(
    log_probs: Float[Tensor, "batch seq"], ref_log_probs: Float[Tensor, "batch seq"]
) -> Float[Tensor, "batch seq"]:
    """Schulman's k3 estimate of KL(policy ‖ reference) per sampled token: r - log r - 1, r = p_ref / p.

    Unbiased when the tokens are sampled from the policy, and never negative (x - 1 >= log x).
    """
    log_ratio = ref_log_probs - log_probs
    return torch.exp(log_ratio) - log_ratio - 1.0


def masked_mean(
    values: Float[Tensor, "batch seq"], mask: Bool[Tensor, "batch seq"], normalisation: str = "sequence"
) -> Float[Tensor, ""]:
    """The mean of ``values`` over the positions where ``mask`` is True, normalised as `NORMALISATIONS`
    says. A sequence with no completion token adds 0 (and, per sequence, still counts as one sequence)."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {list(NORMALISATIONS)}, got {normalisation!r}")
    mask = mask.to(values.dtype)
    total = values * mask
    if normalisation == "sequence":
        return (total.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if normalisation == "token":
        return total.sum() / mask.sum().clamp(min=1)
    return total.sum() / mask.numel()


@dataclass
class Rollout:
    """k sampled answers per prompt: ``ids`` (prompts·k, seq) prompt + completion, right-padded with
    ``pad_id``; ``completion_mask`` (prompts·k, seq - 1) marks the targets ``ids[:, 1:]`` that are completion
    tokens (up to and with the first stop token); ``completions`` the completion ids of each row."""

    ids: Int[Tensor, "rows seq"]
    completion_mask: Bool[Tensor, "rows seq_minus_1"]
    completions: list[list[int]]
    k: int


@torch.no_grad()
def rollout(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample ``k`` answers to each prompt with `llmbook.sample.generate` and its KV cache.

    Batched over the k answers of one prompt (one (k, prompt_len) batch per prompt): the sampler has no
    padding mask, so prompts of different lengths are not batched together.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 answers per prompt (a group of one has no baseline), got {k}")
    rows: list[list[int]] = []
    completions: list[list[int]] = []
    prompt_lengths: list[int] = []
    stops = set(stop_ids)
    for prompt in prompts:
        batch = repeat(torch.as_tensor(list(prompt), dtype=torch.long), "seq -> k seq", k=k)
        out = generate(
            model, batch, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            stop_ids=stop_ids, generator=generator,
        )  # fmt: skip
        for row in out.tolist():
            completion = row[len(prompt) :]
            ends = [i for i, token in enumerate(completion) if token in stops]
            completion = completion[: ends[0] + 1] if ends else completion  # drop the stop-token padding
            rows.append(list(prompt) + completion)
            completions.append(completion)
            prompt_lengths.append(len(prompt))
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length - 1, dtype=torch.bool)
    for index, (row, start) in enumerate(zip(rows, prompt_lengths, strict=True)):
        ids[index, : len(row)] = torch.tensor(row)
        mask[index, start - 1 : len(row) - 1] = True  # target t+1 is predicted at position t
    return Rollout(ids=ids, completion_mask=mask, completions=completions, k=k)


def grpo_loss(
    log_probs: Float[Tensor, "batch seq"],
    old_log_probs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, " batch"],
    mask: Bool[Tensor, "batch seq"],
    epsilon: float = 0.2,
    ref_log_probs: Float[Tensor, "batch seq"] | None = None,
    kl_coef: float = 0.0,
    normalisation: str = "sequence",
) -> tuple[Float[Tensor, ""], dict[str, float]]:
    """The GRPO objective to minimise: masked mean of the clipped policy loss (+ kl_coef · k3 KL), and
    its parts as numbers (policy loss, KL, fraction of tokens clipped)."""
    per_token = clipped_policy_loss(log_probs, old_log_probs, advantages, epsilon)
    stats = {"policy_loss": masked_mean(per_token, mask, normalisation).item()}
    if ref_log_probs is not None:
        kl = kl_k3(log_probs, ref_log_probs)
        per_token = per_token + kl_coef * kl
        stats["kl"] = masked_mean(kl, mask, normalisation).item()
    ratio = torch.exp(log_probs - old_log_probs).detach()
    clipped = ((ratio < 1 - epsilon) | (ratio > 1 + epsilon)) & mask
    stats["clipped_fraction"] = (clipped.sum() / mask.sum().clamp(min=1)).item()
    return masked_mean(per_token, mask, normalisation), stats


def grpo_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    prompts: Sequence[Sequence[int]],
    reward: Callable[[int, list[int]], float],
    k: int,
    max_new_tokens: int,
    reference: nn.Module | None = None,
    kl_coef: float = 0.0,
    epsilon: float = 0.2,
    scale_by_std: bool = True,
    normalisation: str = "sequence",
    updates_per_rollout: int = 1,
    generator: torch.Generator | None = None,
    **sampling,
) -> dict[str, float]:
    """One GRPO iteration: roll out k answers per prompt, score them with ``reward(prompt_index,
    completion_ids)``, then ``updates_per_rollout`` optimizer steps on the clipped loss; returns statistics.

    With one update per rollout the ratio is 1 and the clip never acts (the loss is then the plain policy
    gradient); with more, the later updates see a policy that moved and the clip bounds how far.
    """
    batch = rollout(model, prompts, k, max_new_tokens, generator=generator, **sampling)
    rewards = torch.tensor(
        [reward(index // k, completion) for index, completion in enumerate(batch.completions)],
        dtype=torch.float32,
    )
    grouped = rearrange(rewards, "(prompts k) -> prompts k", k=k)
    advantages = rearrange(group_advantages(grouped, scale_by_std), "prompts k -> (prompts k)")
    with torch.no_grad():
        old_log_probs = token_log_probs(model, batch.ids)
        ref_log_probs = token_log_probs(reference, batch.ids) if reference is not None else None
    for _ in range(updates_per_rollout):
        loss, stats = grpo_loss(
            token_log_probs(model, batch.ids), old_log_probs, advantages, batch.completion_mask,
            epsilon, ref_log_probs, kl_coef, normalisation,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    lengths = batch.completion_mask.sum(dim=1).float()
    return {
        "reward": rewards.mean().item(),
        "completion_length": lengths.mean().item(),
        "loss": loss.item(),
        **stats,
    }

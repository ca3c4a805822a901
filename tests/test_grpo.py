"""GRPO written out (llmbook.grpo): each piece on a small example computed by hand, the rollout's masks,
and a few GRPO steps on a tiny random model that raise a toy reward."""

import copy
import math

import pytest
import torch
from conftest import tiny_model

from llmbook.grpo import (
    clipped_policy_loss,
    group_advantages,
    grpo_loss,
    grpo_step,
    kl_k3,
    masked_mean,
    rollout,
    token_log_probs,
)
from llmbook.optim import AdamW


def test_group_advantages_by_hand_with_and_without_the_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    # Group 0: mean 0.5, sample std sqrt(4 · 0.25 / 3) = 0.57735; group 1: all equal; group 2: mean 0.75,
    # std sqrt((2.25² + 3 · 0.75²) / 3) = 1.5.
    centred = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [2.25, -0.75, -0.75, -0.75]])
    torch.testing.assert_close(group_advantages(rewards, scale_by_std=False), centred)
    scaled = torch.tensor([[0.5 / 0.57735] * 1 + [-0.5 / 0.57735] * 2 + [0.5 / 0.57735], [0.0] * 4,
                           [1.5, -0.5, -0.5, -0.5]])  # fmt: skip
    torch.testing.assert_close(
        group_advantages(rewards, eps=0.0)[[0, 2]], scaled[[0, 2]], rtol=1e-5, atol=1e-5
    )
    assert torch.equal(group_advantages(rewards)[1], torch.zeros(4))  # no signal in a tied group
    with pytest.raises(ValueError, match="k >= 2"):
        group_advantages(torch.ones(3, 1))


def test_clipped_policy_loss_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.5, 0.7, 0.3, 0.55]]))  # ratios 1, 1.4, 0.6, 1.1
    # Advantage +2: ratio 1.4 is clipped at 1.2 (2.4), ratio 0.6 keeps the smaller 0.6 (1.2), 1.1 -> 2.2.
    expected_pos = -torch.tensor([[2.0, 2.4, 1.2, 2.2]])
    torch.testing.assert_close(clipped_policy_loss(new, old, torch.tensor([2.0]), 0.2), expected_pos)
    # Advantage -1: min(-ratio, -clip(ratio)): 1.4 stays -1.4, 0.6 is clipped to 0.8 -> -0.8.
    expected_neg = torch.tensor([[1.0, 1.4, 0.8, 1.1]])
    torch.testing.assert_close(clipped_policy_loss(new, old, torch.tensor([-1.0]), 0.2), expected_neg)
    # The gradient of a clipped token is zero: it can no longer be pushed further.
    new = new.clone().requires_grad_()
    clipped_policy_loss(new, old, torch.tensor([2.0]), 0.2).sum().backward()
    assert new.grad[0, 1] == 0 and new.grad[0, 0] != 0


def test_kl_k3_by_hand_and_zero_where_the_policies_agree():
    log_p = torch.log(torch.tensor([[0.5, 0.2, 0.4]]))
    log_ref = torch.log(torch.tensor([[0.5, 0.4, 0.1]]))
    # r = p_ref / p: 1, 2, 0.25; r - ln r - 1: 0, 1 - ln 2, -0.75 + ln 4.
    expected = torch.tensor([[0.0, 1 - math.log(2), -0.75 + math.log(4)]])
    torch.testing.assert_close(kl_k3(log_p, log_ref), expected)
    assert (kl_k3(log_p, log_ref) >= 0).all()


def test_masked_mean_three_normalisations_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    assert masked_mean(values, mask, "sequence").item() == pytest.approx((2.0 + 4.0) / 2)
    assert masked_mean(values, mask, "token").item() == pytest.approx(10.0 / 4)
    assert masked_mean(values, mask, "constant").item() == pytest.approx(10.0 / 8)
    with pytest.raises(ValueError, match="normalisation must be one of"):
        masked_mean(values, mask, "mean")


def test_grpo_loss_adds_the_weighted_kl_and_reports_clipping():
    old = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.7, 0.5], [0.5, 0.5]]))
    mask = torch.tensor([[True, True], [True, False]])
    advantages = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(
        new, old, advantages, mask, 0.2, ref_log_probs=old, kl_coef=0.5, normalisation="token"
    )
    # Policy per token: [-1.2, -1], [1, (masked)]; KL: [0.5/0.7 - ln(0.5/0.7) - 1, 0], [0, -].
    kl = 0.5 / 0.7 - math.log(0.5 / 0.7) - 1
    assert stats["policy_loss"] == pytest.approx((-1.2 - 1.0 + 1.0) / 3)
    assert stats["kl"] == pytest.approx(kl / 3, rel=1e-5)
    assert stats["clipped_fraction"] == pytest.approx(1 / 3)
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 1.0 + 0.5 * kl) / 3, rel=1e-5)


def test_token_log_probs_are_the_log_softmax_at_each_next_token():
    model = tiny_model()
    ids = torch.tensor([[5, 7, 11, 13]])
    expected = torch.log_softmax(model(ids[:, :-1]), dim=-1)[0, [0, 1, 2], [7, 11, 13]]
    torch.testing.assert_close(token_log_probs(model, ids)[0], expected)


def test_rollout_samples_k_answers_per_prompt_and_masks_only_their_tokens():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5]]
    stop = 7
    batch = rollout(model, prompts, k=3, max_new_tokens=6, stop_ids=[stop], pad_id=0,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert batch.ids.shape[0] == 6 and batch.completion_mask.shape == (6, batch.ids.shape[1] - 1)
    for row, completion in enumerate(batch.completions):
        prompt = prompts[row // 3]
        assert 1 <= len(completion) <= 6 and (stop not in completion[:-1])
        assert batch.ids[row, : len(prompt)].tolist() == prompt
        assert batch.ids[row, len(prompt) : len(prompt) + len(completion)].tolist() == completion
        # Targets ids[:, 1:] that are completion tokens: positions len(prompt)-1 ... len(prompt)+len-2.
        targets = batch.ids[row, 1:][batch.completion_mask[row]].tolist()
        assert targets == completion
        assert batch.ids[row, len(prompt) + len(completion) :].eq(0).all()  # right padding
    same = rollout(model, prompts, 3, 6, stop_ids=[stop], generator=torch.Generator().manual_seed(0))
    assert torch.equal(same.ids, batch.ids)  # seeded: the same samples


@pytest.mark.parametrize(
    "variant",
    [{}, {"scale_by_std": False, "updates_per_rollout": 2, "kl_coef": 0.05, "normalisation": "token"}],
    ids=["grpo", "dr_grpo_with_kl"],
)
def test_a_few_grpo_steps_raise_a_toy_reward_on_a_tiny_model(variant):
    target = 3

    def fraction_of_target(_prompt_index, completion):
        return sum(token == target for token in completion) / len(completion)

    model = tiny_model(vocab_size=16, context_length=24)
    reference = copy.deepcopy(model) if "kl_coef" in variant else None
    optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    prompts = [[1, 2], [5, 6, 7], [9]]
    generator = torch.Generator().manual_seed(0)
    history = [
        grpo_step(model, optimizer, prompts, fraction_of_target, k=8, max_new_tokens=8, generator=generator,
                  reference=reference, **variant)
        for _ in range(18)
    ]  # fmt: skip
    rewards = [step["reward"] for step in history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.15 and last > first + 0.15, rewards  # a uniform guess scores 1/16
    if reference is not None:
        assert history[-1]["kl"] > history[0]["kl"] > 0  # the policy moved away from where it started


def test_grpo_step_on_a_lora_model_moves_only_the_adapters():
    from llmbook.lora import add_lora, lora_layers

    model = add_lora(
        tiny_model(vocab_size=16, context_length=24), 2, 4.0, generator=torch.Generator().manual_seed(0)
    )
    base = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    stats = grpo_step(model, optimizer, [[1, 2]], lambda _i, c: float(c[0] == 3), k=6, max_new_tokens=4,
                      generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert set(stats) >= {"reward", "completion_length", "loss", "policy_loss", "clipped_fraction"}
    assert all(torch.equal(p, base[name]) for name, p in model.named_parameters() if name in base)
    assert any(layer.lora_B.abs().sum() > 0 for layer in lora_layers(model).values())

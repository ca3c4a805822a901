import math

import pytest
import torch
from torch import nn

from llmbook.optim import AdamW, clip_grad_norm, cosine_schedule, param_groups


def _small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Embedding(11, 8), nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 11, bias=False)
    )


def _loss(net: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 11, (4, 5), generator=generator)
    targets = torch.randint(0, 11, (4, 5), generator=generator)
    return nn.functional.cross_entropy(net(ids).flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch_adamw_over_100_steps(weight_decay):
    ours_net, torch_net = _small_net(0), _small_net(0)
    ours = AdamW(ours_net.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    reference = torch.optim.AdamW(
        torch_net.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, foreach=False
    )
    for step in range(100):
        for net, optimizer in ((ours_net, ours), (torch_net, reference)):
            optimizer.zero_grad()
            _loss(net, step).backward()
            optimizer.step()
    untouched = _small_net(0).parameters()
    moved = max((p - q).abs().max().item() for p, q in zip(ours_net.parameters(), untouched, strict=True))
    assert moved > 1e-2  # the comparison below is not between two untouched models
    for ours_param, torch_param in zip(ours_net.parameters(), torch_net.parameters(), strict=True):
        torch.testing.assert_close(ours_param, torch_param, atol=1e-6, rtol=0)


def test_adamw_state_dict_round_trips_into_torch_adamw():
    net = _small_net(1)
    ours = AdamW(net.parameters(), lr=1e-2)
    _loss(net, 0).backward()
    ours.step()
    reference = torch.optim.AdamW(net.parameters(), lr=1e-2)
    reference.load_state_dict(ours.state_dict())
    state = reference.state[next(net.parameters())]
    assert state["step"].item() == 1.0
    assert state["exp_avg"].abs().sum() > 0


def test_adamw_skips_parameters_without_gradients():
    net = _small_net(2)
    before = net[3].weight.detach().clone()
    optimizer = AdamW(net[1].parameters(), lr=1e-2)
    _loss(net, 0).backward()
    net[3].weight.grad = None
    optimizer.step()
    assert torch.equal(net[3].weight, before)


@pytest.mark.parametrize(
    "kwargs", [{"lr": -1.0}, {"betas": (0.9, 1.0)}, {"eps": 0.0}, {"weight_decay": -0.1}]
)
def test_adamw_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        AdamW(_small_net(0).parameters(), **kwargs)


def test_cosine_schedule_warms_up_linearly_then_decays_to_min_then_stays_flat():
    lrs = [cosine_schedule(step, 1.0, 0.1, warmup_steps=10, cosine_steps=110) for step in range(200)]
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine: the midpoint of max and min
    assert lrs[110] == pytest.approx(0.1)
    assert all(lr == pytest.approx(0.1) for lr in lrs[110:])
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111], strict=True))  # monotone decay
    expected_70 = 0.1 + 0.5 * (1 + math.cos(math.pi * 60 / 100)) * 0.9
    assert lrs[70] == pytest.approx(expected_70)


def test_cosine_schedule_without_warmup_starts_at_max():
    assert cosine_schedule(0, 2.0, 0.0, warmup_steps=0, cosine_steps=10) == 2.0
    assert cosine_schedule(5, 2.0, 0.5, warmup_steps=5, cosine_steps=5) == 0.5


@pytest.mark.parametrize(
    "args",
    [(-1, 1.0, 0.1, 0, 10), (0, 1.0, 0.1, -1, 10), (0, 1.0, 0.1, 20, 10), (0, 0.1, 1.0, 0, 10)],
)
def test_cosine_schedule_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        cosine_schedule(*args)


@pytest.mark.parametrize("max_norm", [1e-3, 0.5, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    ours_net, torch_net = _small_net(3), _small_net(3)
    for net in (ours_net, torch_net):
        _loss(net, 1).backward()
    ours_norm = clip_grad_norm(ours_net.parameters(), max_norm)
    torch_norm = torch.nn.utils.clip_grad_norm_(torch_net.parameters(), max_norm)
    torch.testing.assert_close(ours_norm, torch_norm, atol=0, rtol=1e-6)
    for ours_param, torch_param in zip(ours_net.parameters(), torch_net.parameters(), strict=True):
        torch.testing.assert_close(ours_param.grad, torch_param.grad, atol=0, rtol=1e-6)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours_net.parameters()]))
    assert clipped.item() == pytest.approx(min(max_norm, ours_norm.item()), rel=1e-4)


def test_clip_grad_norm_returns_norm_before_clipping():
    param = nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])
    assert clip_grad_norm([param], 1.0).item() == pytest.approx(5.0)
    torch.testing.assert_close(param.grad, torch.tensor([0.6, 0.8]), atol=1e-6, rtol=0)


def test_param_groups_exclude_embeddings_norms_and_biases_from_decay():
    net = _small_net(0)
    groups = param_groups(net, weight_decay=0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    undecayed = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(net[1].weight), id(net[3].weight)}
    assert undecayed == {id(net[0].weight), id(net[1].bias), id(net[2].weight), id(net[2].bias)}


def test_param_groups_list_a_tied_weight_once():
    net = _small_net(0)
    net[3].weight = net[0].weight  # tie the output projection to the embedding
    groups = param_groups(net, weight_decay=0.1)
    all_ids = [id(p) for group in groups for p in group["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(net.parameters()))
    assert id(net[0].weight) in {id(p) for p in groups[1]["params"]}

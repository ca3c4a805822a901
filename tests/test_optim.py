import math

import pytest
import torch
from torch import nn

from llmbook.optim import (
    AdamW,
    Muon,
    MuonAdamW,
    clip_grad_norm,
    cosine_schedule,
    linear_schedule,
    muon_lr_scale,
    muon_param_groups,
    newton_schulz,
    param_groups,
)


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


def test_linear_schedule_warms_up_then_falls_in_a_straight_line_to_min_then_stays_flat():
    lrs = [linear_schedule(step, 1.0, 0.1, warmup_steps=10, decay_steps=110) for step in range(200)]
    warmup = [cosine_schedule(step, 1.0, 0.1, warmup_steps=10, cosine_steps=110) for step in range(11)]
    assert lrs[:11] == warmup  # the same warm-up as the cosine
    assert lrs[60] == pytest.approx(0.55)  # the midpoint, as for the cosine...
    assert lrs[35] == pytest.approx(1.0 - 0.25 * 0.9)  # ...but a quarter of the way, a quarter of the fall
    assert lrs[35] < cosine_schedule(35, 1.0, 0.1, warmup_steps=10, cosine_steps=110)
    assert all(lr == pytest.approx(0.1) for lr in lrs[110:])
    steps_down = [a - b for a, b in zip(lrs[10:110], lrs[11:111], strict=True)]
    assert steps_down == pytest.approx([0.9 / 100] * 100)  # a constant rate
    assert linear_schedule(0, 2.0, 0.0, warmup_steps=0, decay_steps=10) == 2.0
    with pytest.raises(ValueError, match="decay_steps"):
        linear_schedule(0, 1.0, 0.1, 20, 10)


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


# ---- Muon ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch_muon_bit_for_bit(shape, adjust_lr_fn, nesterov):
    torch.manual_seed(0)
    ours_param = torch.randn(*shape, requires_grad=True)
    torch_param = ours_param.detach().clone().requires_grad_()
    start = ours_param.detach().clone()
    options = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours, reference = Muon([ours_param], **options), torch.optim.Muon([torch_param], **options)
    for _ in range(8):
        grad = torch.randn(*shape)
        ours_param.grad, torch_param.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    assert (ours_param - start).abs().max() > 1e-2  # not a comparison of two untouched matrices
    assert torch.equal(ours_param, torch_param)
    torch.testing.assert_close(
        ours.state[ours_param]["momentum_buffer"],
        reference.state[torch_param]["momentum_buffer"],
        rtol=0,
        atol=0,
    )


def test_newton_schulz_pushes_every_singular_value_into_a_band_around_one():
    torch.manual_seed(0)
    # Singular values spread over two orders of magnitude (a real gradient of chapter 8 spans about 35x).
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(96, 64))
    matrix = u @ torch.diag(torch.logspace(-2, 0, 64)) @ v.T
    for dtype in (torch.float32, torch.bfloat16):
        singular = torch.linalg.svdvals(newton_schulz(matrix, dtype=dtype).float())
        assert singular.min() > 0.5 and singular.max() < 1.3, (dtype, singular.min(), singular.max())
    # The singular vectors are kept: the result lines up with U·Vᵀ.
    aligned = (newton_schulz(matrix, dtype=torch.float32) * (u @ v.T)).sum() / 64
    assert aligned > 0.8
    # Tall and wide give transposed answers.
    torch.testing.assert_close(
        newton_schulz(matrix.T, dtype=torch.float32), newton_schulz(matrix, dtype=torch.float32).T
    )


def test_newton_schulz_and_muon_reject_what_they_cannot_handle():
    with pytest.raises(ValueError, match="2-D matrix"):
        newton_schulz(torch.ones(3))
    with pytest.raises(ValueError, match="steps"):
        newton_schulz(torch.ones(2, 2), steps=0)
    with pytest.raises(ValueError, match="2-D weight matrices only.*AdamW"):
        Muon([nn.Parameter(torch.ones(4))])
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        Muon([nn.Parameter(torch.ones(2, 2))], adjust_lr_fn="sqrt")
    with pytest.raises(ValueError, match="momentum"):
        Muon([nn.Parameter(torch.ones(2, 2))], momentum=1.0)


def test_muon_lr_scale_gives_an_orthogonal_update_adamw_rms():
    # An orthogonal (rows, cols) matrix has RMS entry 1/sqrt(max(rows, cols)); Moonshot's scale makes it 0.2.
    for rows, cols in ((16, 64), (64, 16), (32, 32)):
        q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols)))
        update = q if rows >= cols else q.T
        rms = update.square().mean().sqrt() * muon_lr_scale((rows, cols), "match_rms_adamw")
        assert rms.item() == pytest.approx(0.2, rel=1e-5)
    assert muon_lr_scale((64, 16), None) == 2.0 and muon_lr_scale((16, 64), "original") == 1.0


def test_muon_param_groups_send_block_matrices_to_muon_and_the_rest_to_adamw(tiny_model):
    model = tiny_model(tie_embeddings=False, qk_norm=True)
    groups = muon_param_groups(model, weight_decay=0.1, lr_scale=5.0)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for p in groups[0]["params"]]
    assert groups[0]["use_muon"] and groups[0]["lr_scale"] == 5.0
    assert all(n.startswith("blocks.") and n.endswith("proj.weight") for n in muon) and len(muon) == 2 * 7
    adam_decay = [names[id(p)] for p in groups[1]["params"]]
    adam_rest = [names[id(p)] for p in groups[2]["params"]]
    assert adam_decay == ["lm_head.weight"] and groups[1]["weight_decay"] == 0.1
    assert "tok_embeddings.weight" in adam_rest and "blocks.0.attn.q_norm.weight" in adam_rest
    assert groups[2]["weight_decay"] == 0.0
    assert sorted(muon + adam_decay + adam_rest) == sorted(names.values())  # each parameter exactly once


def test_optimizer_groups_of_a_lora_model_hold_only_its_adapters(tiny_model):
    from llmbook.lora import add_lora

    model = add_lora(tiny_model(), rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    adapters = [p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert [id(p) for p in decay["params"]] == [id(p) for p in adapters] and no_decay["params"] == []
    muon, adam_decay, adam_rest = muon_param_groups(model, weight_decay=0.1)
    assert muon["params"] == [] and len(adam_decay["params"]) == 8 and adam_rest["params"] == []
    optimizer = MuonAdamW([muon, adam_decay, adam_rest], lr=0.01)  # an empty Muon group is fine
    model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)).backward()
    before = model.blocks[0].attn.q_proj.weight.clone()
    optimizer.step()
    assert torch.equal(model.blocks[0].attn.q_proj.weight, before)  # the frozen base did not move
    assert model.blocks[0].attn.q_proj.lora_B.abs().sum() > 0  # B left zero: it trained


def test_muon_param_groups_need_a_model_that_names_its_matrices():
    with pytest.raises(TypeError, match="parameter_groups"):
        muon_param_groups(nn.Sequential(nn.Linear(3, 3)), weight_decay=0.1)


def test_muon_adamw_is_muon_on_the_matrices_and_adamw_on_the_rest():
    torch.manual_seed(0)
    matrix, vector = nn.Parameter(torch.randn(12, 8)), nn.Parameter(torch.randn(8))
    reference_matrix, reference_vector = (nn.Parameter(p.detach().clone()) for p in (matrix, vector))
    combined = MuonAdamW(
        [{"params": [matrix], "use_muon": True}, {"params": [vector], "use_muon": False, "weight_decay": 0}],
        lr=0.01, weight_decay=0.1, ns_dtype=torch.bfloat16,
    )  # fmt: skip
    muon = torch.optim.Muon([reference_matrix], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adam = torch.optim.AdamW([reference_vector], lr=0.01, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)
    for _ in range(5):
        grads = torch.randn(12, 8), torch.randn(8)
        matrix.grad, vector.grad = grads[0].clone(), grads[1].clone()
        reference_matrix.grad, reference_vector.grad = grads[0].clone(), grads[1].clone()
        for optimizer in (combined, muon, adam):
            optimizer.step()
    assert torch.equal(matrix, reference_matrix)
    torch.testing.assert_close(vector, reference_vector, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="use_muon"):
        MuonAdamW([{"params": [matrix]}])
    with pytest.raises(ValueError, match="2-D weight matrices only"):
        MuonAdamW([{"params": [vector], "use_muon": True}])


def _split_worker(rank: int, world: int, init_file: str, results: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # Three matrices of one shape (a chunk of two and a short one of one), a tall one, and a vector.
    shapes = [(6, 10), (6, 10), (6, 10), (14, 5), (5,)]
    copies = []
    for split in (True, False):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(shape)) for shape in shapes]
        optimizer = MuonAdamW(
            [{"params": params[:4], "use_muon": True}, {"params": params[4:], "use_muon": False}],
            lr=0.02, weight_decay=0.1, split_across_processes=split,
        )  # fmt: skip
        generator = torch.Generator().manual_seed(1)  # the same "averaged" gradients on every process
        for _ in range(4):
            for param in params:
                param.grad = torch.randn(param.shape, generator=generator)
            optimizer.step()
        copies.append([param.detach().clone() for param in params])
    torch.save(copies, f"{results}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow  # two fresh processes importing torch
def test_muon_adamw_split_across_processes_gives_the_numbers_of_every_process_doing_everything(tmp_path):
    world = 2
    torch.multiprocessing.spawn(
        _split_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=world
    )
    per_rank = [torch.load(tmp_path / f"out.{rank}") for rank in range(world)]
    for split, unsplit in per_rank:
        assert all(torch.equal(a, b) for a, b in zip(split, unsplit, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(per_rank[0][0], per_rank[1][0], strict=True))
    torch.manual_seed(0)
    assert not torch.equal(per_rank[0][0][0], torch.randn(6, 10))  # the matrices did move

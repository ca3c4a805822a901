"""LoRA written out (llmbook.lora): the adapter's algebra, merge and unmerge, adapter files, and parity with
`peft` on the same model converted to transformers' Llama (a small random one, and SmolLM2-135M)."""

import math

import pytest
import torch
from conftest import tiny_model

from llmbook.errors import CorruptFileError, RunMismatchError
from llmbook.lora import (
    LLAMA_TARGETS,
    LoRALinear,
    adapter_state,
    add_lora,
    load_adapters,
    lora_layers,
    merge,
    save_adapters,
    unmerge,
)
from llmbook.model import ModelConfig, TransformerLM


def _ids(vocab: int, shape=(2, 9), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _lora_model(rank=4, alpha=8.0, targets=LLAMA_TARGETS, seed=0, train_b=True, **overrides):
    """A tiny model with adapters whose B is random too (B = 0 would hide a wrong B or a wrong scale)."""
    model = add_lora(tiny_model(**overrides), rank, alpha, targets, torch.Generator().manual_seed(seed))
    if train_b:
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(seed + 1))
    return model


def test_lora_linear_adds_the_scaled_low_rank_product_by_hand():
    layer = torch.nn.Linear(3, 2, bias=True)
    layer.__class__ = LoRALinear  # the in-place conversion add_lora does
    layer.init_adapter(rank=1, alpha=4.0)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
        layer.lora_A.copy_(torch.tensor([[1.0, 1.0, 1.0]]))
        layer.lora_B.copy_(torch.tensor([[1.0], [2.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # x W^T + b = [1.5, 1.5]; x A^T = 6; times B^T = [6, 12]; scale 4 / 1 = 4: [24, 48].
    torch.testing.assert_close(layer(x), torch.tensor([[25.5, 49.5]]))


def test_a_fresh_adapter_leaves_the_model_unchanged_and_only_adapters_train():
    plain = tiny_model()
    model = _lora_model(train_b=False)
    ids = _ids(97)
    torch.testing.assert_close(model(ids), plain(ids), rtol=0, atol=0)  # B = 0: the same numbers
    layers = lora_layers(model)
    assert len(layers) == 2 * 7 and all(torch.count_nonzero(layer.lora_B) == 0 for layer in layers.values())
    groups = model.parameter_groups()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all(name.endswith(("lora_A", "lora_B")) for name in trainable) and len(trainable) == 2 * 14
    assert len(groups["adapters"]) == 28 and all(not groups[k] for k in groups if k != "adapters")
    # A as peft draws it: Kaiming-uniform with a = sqrt(5), i.e. uniform on +-1/sqrt(in_features).
    a = layers["blocks.0.attn.q_proj"].lora_A
    bound = 1 / math.sqrt(32)
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound


def test_only_the_named_layers_get_adapters_and_unknown_names_are_refused():
    model = add_lora(tiny_model(), 2, 2.0, ("q_proj", "v_proj"))
    assert sorted(lora_layers(model)) == [
        f"blocks.{i}.attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]
    with pytest.raises(ValueError, match=r"no linear layer in the blocks is named \['qkv'\]"):
        add_lora(tiny_model(), 2, 2.0, ("q_proj", "qkv"))
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        add_lora(tiny_model(), 0, 2.0)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, 2, 2.0)


def test_merge_gives_the_same_logits_and_unmerge_restores_the_weights():
    model = _lora_model()
    ids = _ids(97)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    logits = model(ids)
    merge(model)
    q = model.blocks[0].attn.q_proj
    assert not torch.equal(q.weight, before["blocks.0.attn.q_proj.weight"])
    torch.testing.assert_close(model(ids), logits, rtol=1e-5, atol=1e-6)
    unmerge(model)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=1e-7)
    torch.testing.assert_close(model(ids), logits, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="is not merged"):
        unmerge(model)


def test_adapters_round_trip_through_a_file_into_a_fresh_model(tmp_path):
    model = _lora_model()
    path = save_adapters(tmp_path / "adapter.safetensors", model)
    fresh = load_adapters(path, tiny_model())  # no adapters yet: added with the file's rank and targets
    assert adapter_state(fresh).keys() == adapter_state(model).keys()
    assert all(torch.equal(adapter_state(fresh)[k], v) for k, v in adapter_state(model).items())
    ids = _ids(97)
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


def test_adapter_files_that_do_not_fit_the_model_are_refused(tmp_path):
    path = save_adapters(tmp_path / "adapter.safetensors", _lora_model(rank=4))
    with pytest.raises(RunMismatchError, match="rank: the file has 4, the model 2"):
        load_adapters(path, add_lora(tiny_model(), 2, 8.0))
    with pytest.raises(RunMismatchError, match="missing adapter tensors"):
        load_adapters(
            save_adapters(tmp_path / "qv.safetensors", _lora_model(targets=("q_proj", "v_proj"))),
            add_lora(tiny_model(), 4, 8.0, ("q_proj", "v_proj", "k_proj")),
        )
    merged = _lora_model(rank=4)
    merge(merged)
    with pytest.raises(ValueError, match="unmerge"):
        load_adapters(path, merged)
    with pytest.raises(RunMismatchError, match=r"another model: its config differs in \['d_model'"):
        load_adapters(path, tiny_model(d_model=48))


def test_a_damaged_adapter_file_is_refused_by_its_checksum(tmp_path):
    path = save_adapters(tmp_path / "adapter.safetensors", _lora_model())
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped byte inside the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="do not match their checksum"):
        load_adapters(path, tiny_model())
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CorruptFileError, match="not a readable adapter file"):
        load_adapters(path, tiny_model())


# ---- parity with peft --------------------------------------------------------------------------------


def _peft_parity(ours: TransformerLM, ids: torch.Tensor, rank: int, alpha: float) -> dict[str, float]:
    """Max abs differences between our LoRA and peft's on the same model: logits, adapter gradients, merged
    weights. ``ours`` is a plain model (converted to Llama before it gets adapters)."""
    peft = pytest.importorskip("peft")
    from llmbook.hf import hf_name, to_hf

    theirs = peft.get_peft_model(
        to_hf(ours),
        peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LLAMA_TARGETS), lora_dropout=0.0),
    )
    add_lora(ours, rank, alpha, LLAMA_TARGETS, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(3)
    peft_modules = dict(theirs.named_modules())
    pairs = []
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            layer.lora_B.normal_(0.0, 0.02, generator=generator)  # B != 0, so A gets a gradient too
            peft_layer = peft_modules["base_model.model." + hf_name(name + ".weight")[: -len(".weight")]]
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
            pairs.append((layer, peft_layer))
    targets = ids[:, 1:]
    our_logits = ours(ids[:, :-1])
    their_logits = theirs(input_ids=ids[:, :-1]).logits
    ours(ids[:, :-1], targets).backward()
    torch.nn.functional.cross_entropy(their_logits.flatten(0, 1), targets.flatten()).backward()
    grads = [
        (layer.lora_A.grad - peft_layer.lora_A["default"].weight.grad).abs().max().item()
        for layer, peft_layer in pairs
    ] + [
        (layer.lora_B.grad - peft_layer.lora_B["default"].weight.grad).abs().max().item()
        for layer, peft_layer in pairs
    ]
    grad_scale = max(layer.lora_B.grad.abs().max().item() for layer, _ in pairs)
    merge(ours)
    merged = theirs.merge_and_unload()
    their_weights = merged.state_dict()
    weights = max(
        (layer.weight - their_weights[hf_name(name + ".weight")]).abs().max().item()
        for name, layer in lora_layers(ours).items()
    )
    return {
        "logits": (our_logits - their_logits).abs().max().item(),
        "logit_scale": their_logits.abs().max().item(),
        "grads": max(grads),
        "grad_scale": grad_scale,
        "merged_weights": weights,
    }


def test_lora_matches_peft_on_a_small_llama_choice_model():
    config = ModelConfig(vocab_size=101, context_length=32, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    diffs = _peft_parity(TransformerLM(config).eval(), _ids(101, (2, 12)), rank=4, alpha=16.0)
    assert diffs["grad_scale"] > 1e-4  # the gradients compared are not all zero
    assert diffs["logits"] <= 1e-5 and diffs["grads"] <= 1e-5, diffs
    assert diffs["merged_weights"] == 0.0, diffs


@pytest.mark.slow
def test_lora_matches_peft_on_smollm2_135m():
    from llmbook import gguf

    model = gguf.load_model(context_length=64)
    ids = _ids(model.config.vocab_size, (1, 16))
    diffs = _peft_parity(model, ids, rank=8, alpha=16.0)
    assert diffs["grad_scale"] > 1e-3
    # SmolLM2's logits reach about 30, where float32's own rounding, summed in a different order by the two
    # implementations, is already above 1e-5 without any adapter: so 1e-5 of the largest logit (gradient).
    assert diffs["logits"] <= 1e-5 * diffs["logit_scale"], diffs
    assert diffs["grads"] <= 1e-5 * diffs["grad_scale"], diffs
    assert diffs["merged_weights"] == 0.0, diffs

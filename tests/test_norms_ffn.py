"""Tests for llmbook.norms, llmbook.ffn and llmbook.loss against PyTorch's own layers and formulas."""

import math

import pytest
import torch
from torch import nn

from llmbook.ffn import GeluMLP, SwiGLU, gelu, silu, swiglu_hidden_dim
from llmbook.loss import bits_per_byte, cross_entropy, perplexity
from llmbook.norms import LayerNorm, RMSNorm, rms_norm


def random_like_training(shape, seed=0, scale=3.0, shift=1.5):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * scale + shift


def test_layer_norm_matches_torch_layer_norm():
    ours, theirs = LayerNorm(16, eps=1e-5), nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.copy_(random_like_training((16,), seed=1))
            layer.bias.copy_(random_like_training((16,), seed=2))
    x = random_like_training((2, 5, 16))
    torch.testing.assert_close(ours(x), theirs(x))


def test_layer_norm_output_has_zero_mean_unit_variance_before_gain():
    x = random_like_training((4, 32))
    out = LayerNorm(32)(x)
    torch.testing.assert_close(out.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


def test_rms_norm_matches_torch_rms_norm():
    ours, theirs = RMSNorm(16, eps=1e-6), nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.copy_(random_like_training((16,), seed=3))
    x = random_like_training((2, 5, 16))
    torch.testing.assert_close(ours(x), theirs(x))


def test_rms_norm_does_not_centre_its_input():
    x = torch.full((1, 8), 5.0)
    torch.testing.assert_close(RMSNorm(8)(x), torch.ones(1, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(LayerNorm(8)(x), torch.zeros(1, 8))  # LayerNorm removes the mean


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 1.0])
def test_rms_norm_adds_eps_inside_the_square_root(eps):
    # Activations of size 1e-3 have mean(x²) = 1e-6, comparable to eps: x / sqrt(mean(x²) + eps) and
    # x / (sqrt(mean(x²)) + eps) then differ by a large factor, not by rounding.
    x = random_like_training((3, 16), seed=4, scale=1e-3, shift=0.0).double()
    weight = random_like_training((16,), seed=5, scale=0.5, shift=1.0).double()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    layer = RMSNorm(16, eps=eps).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(rms_norm(x, weight, eps), expected, rtol=1e-6, atol=0)


def test_layer_norm_adds_eps_inside_the_square_root():
    x = random_like_training((3, 16), seed=6, scale=1e-3, shift=0.0).double()
    mean = x.mean(-1, keepdim=True)
    expected = (x - mean) / torch.sqrt((x - mean).pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(LayerNorm(16, eps=1e-5).double()(x), expected, rtol=1e-6, atol=1e-12)


def test_norms_compute_in_float32_for_bfloat16_inputs():
    x = random_like_training((3, 64)).to(torch.bfloat16)
    out = RMSNorm(64).to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16
    expected = nn.RMSNorm(64, eps=1e-5)(x.float())
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)


def test_norms_reject_wrong_width():
    with pytest.raises(ValueError, match="last axis of 8"):
        RMSNorm(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="last axis of 8"):
        LayerNorm(8)(torch.randn(2, 7))


def test_gelu_is_the_exact_erf_version():
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(gelu(x), nn.functional.gelu(x, approximate="none"))
    tanh_version = nn.functional.gelu(x, approximate="tanh")
    assert (gelu(x) - tanh_version).abs().max() > 1e-5  # the exact and tanh forms are distinguishable


def test_silu_matches_torch():
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(silu(x), nn.functional.silu(x))


@pytest.mark.parametrize(
    ("d_model", "expected"), [(64, 192), (256, 704), (768, 2048), (4096, 10944), (1, 32)]
)
def test_swiglu_hidden_dim_is_eight_thirds_rounded_up_to_multiple_of_32(d_model, expected):
    assert swiglu_hidden_dim(d_model) == expected
    assert expected % 32 == 0 and expected >= 8 * d_model / 3 > expected - 32


def test_swiglu_computes_gated_product():
    torch.manual_seed(0)
    ffn = SwiGLU(8, 24)
    x = torch.randn(2, 3, 8)
    gate = x @ ffn.gate_proj.weight.T
    up = x @ ffn.up_proj.weight.T
    expected = (gate * torch.sigmoid(gate) * up) @ ffn.down_proj.weight.T
    torch.testing.assert_close(ffn(x), expected)
    assert {name for name, _ in ffn.named_parameters()} == {
        "gate_proj.weight",
        "up_proj.weight",
        "down_proj.weight",
    }


class _Square(nn.Module):
    def forward(self, x):
        return x * x


@pytest.mark.parametrize("activation", ["gelu", "silu", "relu2"])
def test_mlp_equals_two_linears_around_activation(activation):
    torch.manual_seed(0)
    ffn = GeluMLP(8, 32, activation=activation)
    modules = {"gelu": [nn.GELU()], "silu": [nn.SiLU()], "relu2": [nn.ReLU(), _Square()]}[activation]
    reference = nn.Sequential(ffn.up_proj, *modules, ffn.down_proj)
    x = torch.randn(4, 8)
    torch.testing.assert_close(ffn(x), reference(x))


def test_mlp_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        GeluMLP(8, 32, activation="relu")


def test_cross_entropy_matches_torch_for_3d_and_2d_inputs():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 11, generator=generator) * 4
    targets = torch.randint(0, 11, (2, 5), generator=generator)
    expected = nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
    torch.testing.assert_close(cross_entropy(logits, targets), expected)
    torch.testing.assert_close(cross_entropy(logits.reshape(-1, 11), targets.reshape(-1)), expected)


def test_cross_entropy_skips_ignored_targets():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 7, generator=generator)
    targets = torch.tensor([1, -100, 3, -100, 6, 0])
    expected = nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    torch.testing.assert_close(cross_entropy(logits, targets), expected)
    kept = targets != -100
    torch.testing.assert_close(cross_entropy(logits[kept], targets[kept]), expected)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = torch.tensor([[1000.0, 0.0, -1000.0]])
    torch.testing.assert_close(cross_entropy(logits, torch.tensor([0])), torch.tensor(0.0))
    torch.testing.assert_close(cross_entropy(logits, torch.tensor([1])), torch.tensor(1000.0))


def test_cross_entropy_of_uniform_prediction_is_log_vocab():
    loss = cross_entropy(torch.zeros(3, 50), torch.tensor([0, 10, 49]))
    assert loss.item() == pytest.approx(math.log(50))
    assert perplexity(loss).item() == pytest.approx(50.0, rel=1e-5)


def test_cross_entropy_rejects_bad_targets():
    logits = torch.randn(4, 5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cross_entropy(logits, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(TypeError, match="integer"):
        cross_entropy(logits, torch.zeros(4))
    with pytest.raises(ValueError, match="matching leading shape"):
        cross_entropy(logits, torch.zeros(3, dtype=torch.long))


def test_bits_per_byte_converts_nats_per_token():
    # 2 nats/token over 100 tokens covering 400 bytes: 200 nats = 200/ln2 bits over 400 bytes.
    assert bits_per_byte(2.0, 100, 400) == pytest.approx(200 / math.log(2) / 400)
    with pytest.raises(ValueError, match="n_bytes"):
        bits_per_byte(2.0, 100, 0)


def test_perplexity_is_exp_of_nats():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    torch.testing.assert_close(perplexity(torch.tensor(0.0)), torch.tensor(1.0))

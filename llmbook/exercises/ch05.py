"""Chapter 5 exercises: a LayerNorm to debug, RMSNorm, SwiGLU, its hidden width, a pre-norm residual step,
and a block's parameter count to predict.
"""

import torch

from llmbook.exercises.core import Case, draw, exercise
from llmbook.ffn import SwiGLU, swiglu_hidden_dim
from llmbook.norms import RMSNorm, layer_norm, rms_norm


def _swiglu(x, w_gate, w_up, w_down):
    d_ff, d_model = w_gate.shape
    ffn = SwiGLU(d_model, d_ff).to(x.dtype)
    with torch.no_grad():
        ffn.gate_proj.weight.copy_(w_gate)
        ffn.up_proj.weight.copy_(w_up)
        ffn.down_proj.weight.copy_(w_down)
        return ffn(x)


def _pre_norm_ffn_step(x, norm_weight, w_gate, w_up, w_down, eps):
    norm = RMSNorm(x.shape[-1], eps=eps).to(x.dtype)
    with torch.no_grad():
        norm.weight.copy_(norm_weight)
        return x + _swiglu(norm(x), w_gate, w_up, w_down)


def _randn(*shape, generator, scale=1.0, offset=0.0):
    return torch.randn(*shape, generator=generator) * scale + offset


def _broken_layer_norm(x, weight, bias, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, with the biased variance."""
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True)
    return (x - mean) / (std + eps) * weight + bias


@exercise(
    "05.layer_norm",
    reference=layer_norm,
    kind="debug",
    broken=_broken_layer_norm,
    forbid=(
        "llmbook.norms.layer_norm",
        "torch.nn.functional.layer_norm",
    ),
    hint=(
        "Two bugs, both in the denominator. Read torch.std's documentation: what does it divide by?",
        "x.std() divides by d - 1 (Bessel's correction); LayerNorm's variance divides by d. And eps belongs "
        "inside the square root, sqrt(var + eps), not added to the standard deviation; a large eps or d = 1 "
        "(where std is NaN) shows both.",
        "Look at lines 4 and 5. Line 4's `x.std(dim=-1, keepdim=True)` divides by d - 1 (read the "
        "correction argument of torch.std), and line 5 adds eps to the standard deviation, while the "
        "docstring puts it inside the square root, next to the variance.",
    ),
)
def _layer_norm_cases():
    g = torch.Generator().manual_seed(5)
    for note, shape, eps, offset, atol in [
        ("one vector of 4 numbers", (4,), 1e-5, 0.0, None),
        ("a (batch, seq, d) tensor", (2, 3, 8), 1e-5, 0.0, None),
        ("a large eps (it belongs inside the square root)", (3, 6), 1.0, 0.0, None),
        ("d = 1: every value equals its own mean", (5, 1), 1e-5, 0.0, None),
        ("values near 1000 with spread 1 (float32)", (4, 64), 1e-5, 1000.0, 1e-3),
    ]:
        x = (
            _randn(*shape, generator=g, scale=2.0, offset=offset)
            if offset == 0.0
            else _randn(*shape, generator=g, offset=offset)
        )
        weight = _randn(shape[-1], generator=g, scale=0.5, offset=1.0)
        bias = _randn(shape[-1], generator=g, scale=0.1)
        expected = layer_norm(x.double(), weight.double(), bias.double(), eps).float()
        yield Case((x, weight, bias, eps), expected=expected, note=note, atol=atol)


@exercise(
    "05.rms_norm",
    reference=rms_norm,
    forbid=(
        "llmbook.norms.rms_norm",
        "torch.nn.functional.rms_norm",
    ),
    hint=(
        "RMSNorm divides by the root mean square of the vector; it neither centres nor adds a bias.",
        "Over the last axis: rms = sqrt(mean(x**2, -1, keepdim=True) + eps); return x / rms * weight. "
        "No mean is subtracted and there is no bias; eps goes inside the square root.",
    ),
)
def _rms_norm_cases():
    g = torch.Generator().manual_seed(6)
    for note, x, eps in [
        ("one vector of 4 numbers", _randn(4, generator=g), 1e-5),
        ("a (batch, seq, d) tensor", _randn(2, 3, 8, generator=g, scale=3.0), 1e-5),
        ("a row of zeros (eps keeps it finite)", torch.zeros(2, 5), 1e-5),
        ("a large eps (it belongs inside the square root)", _randn(3, 6, generator=g, scale=0.5), 1.0),
        ("large values (scale 10⁴)", _randn(2, 16, generator=g, scale=1e4), 1e-6),
        (
            "a vector with non-zero mean (RMSNorm does not centre)",
            _randn(3, 7, generator=g, offset=4.0),
            1e-5,
        ),
    ]:
        weight = _randn(x.shape[-1], generator=g, scale=0.5, offset=1.0)
        expected = rms_norm(x.double(), weight.double(), eps).float()
        yield Case((x, weight, eps), expected=expected, note=note)


@exercise(
    "05.swiglu",
    reference=_swiglu,
    forbid=("llmbook.ffn.SwiGLU",),
    hint=(
        "SwiGLU has three projections: a gate passed through SiLU, a value multiplied by it, and a way back "
        "down.",
        "Weights are stored as nn.Linear stores them, (out_features, in_features), so a projection is "
        "x @ w.T. gate = x @ w_gate.T, value = x @ w_up.T, hidden = silu(gate) * value with "
        "silu(z) = z * sigmoid(z); the output is hidden @ w_down.T. Only the gate goes through silu.",
    ),
)
def _swiglu_cases():
    g = torch.Generator().manual_seed(7)
    for note, batch_shape, d_model, d_ff, scale in [
        ("one token, d_model 4, d_ff 8", (1, 1), 4, 8, 1.0),
        ("a (batch, seq) of tokens with an awkward d_ff of 22", (2, 5), 8, 22, 1.0),
        ("d_ff = 1: a single hidden unit", (3,), 6, 1, 1.0),
        ("large inputs: silu saturates (≈ z for big z, ≈ 0 for very negative z)", (2, 3), 4, 12, 30.0),
    ]:
        x = _randn(*batch_shape, d_model, generator=g, scale=scale)
        w_gate = _randn(d_ff, d_model, generator=g, scale=d_model**-0.5)
        w_up = _randn(d_ff, d_model, generator=g, scale=d_model**-0.5)
        w_down = _randn(d_model, d_ff, generator=g, scale=d_ff**-0.5)
        expected = _swiglu(x.double(), w_gate.double(), w_up.double(), w_down.double()).float()
        yield Case((x, w_gate, w_up, w_down), expected=expected, note=note)


def _swiglu_hidden_dim_hidden(g):
    for multiple_of in (1, 32, 256):
        yield Case((draw(g, 1, 9000), multiple_of), note="a random width")


@exercise(
    "05.swiglu_hidden_dim",
    reference=swiglu_hidden_dim,
    forbid=("llmbook.ffn.swiglu_hidden_dim",),
    hidden=_swiglu_hidden_dim_hidden,
    hint=(
        "Three matrices of width h hold as much as two of width 4·d_model when h = 8·d_model/3; then round "
        "up.",
        "Start from 8·d_model/3 rounded UP to an integer (e.g. -(-8 * d_model // 3)), then round that UP "
        "to the next multiple of multiple_of. Use integer arithmetic only; floats can round 8/3·d wrongly.",
    ),
)
def _swiglu_hidden_dim_cases():
    for d_model, multiple_of, note in [
        (4096, 256, "Llama-1/2 7B: d_model 4096, multiple_of 256"),
        (768, 32, "GPT-2 small width"),
        (3, 1, "8·3/3 is already an integer"),
        (1, 1, "d_model = 1: ⌈8/3⌉ = 3"),
        (100, 1, "no rounding to a multiple: ⌈800/3⌉"),
        (64, 64, "a multiple larger than the ceiling's remainder"),
        (5120, 256, "Llama-2 13B width"),
    ]:
        yield Case((d_model, multiple_of), expected=swiglu_hidden_dim(d_model, multiple_of), note=note)


@exercise(
    "05.pre_norm_ffn_step",
    reference=_pre_norm_ffn_step,
    hint=(
        "Pre-norm: normalise a copy of x, transform it, and add the result back to the un-normalised x.",
        "Pre-norm: normalize a copy for the sublayer, and add the sublayer's output to the UN-normalized "
        "stream: return x + swiglu(rms_norm(x, norm_weight, eps), w_gate, w_up, w_down). Adding to the "
        "normalized copy instead loses the residual stream's scale.",
    ),
)
def _pre_norm_ffn_step_cases():
    g = torch.Generator().manual_seed(8)
    for note, batch_shape, d_model, d_ff, scale, zero_down in [
        ("one token", (1, 1), 4, 12, 1.0, False),
        ("a (batch, seq) of tokens", (2, 5), 8, 24, 1.0, False),
        (
            "a stream of RMS ≈ 10: the residual adds x itself, not its normalized copy",
            (2, 3),
            8,
            16,
            10.0,
            False,
        ),
        ("a zero down-projection: the block must return x unchanged", (1, 4), 6, 10, 1.0, True),
    ]:
        x = _randn(*batch_shape, d_model, generator=g, scale=scale)
        norm_weight = _randn(d_model, generator=g, scale=0.2, offset=1.0)
        w_gate = _randn(d_ff, d_model, generator=g, scale=d_model**-0.5)
        w_up = _randn(d_ff, d_model, generator=g, scale=d_model**-0.5)
        w_down = (
            torch.zeros(d_model, d_ff) if zero_down else _randn(d_model, d_ff, generator=g, scale=d_ff**-0.5)
        )
        args = (x, norm_weight, w_gate, w_up, w_down, 1e-5)
        expected = _pre_norm_ffn_step(*(a.double() if torch.is_tensor(a) else a for a in args)).float()
        yield Case(args, expected=expected, note=note)


# ---------------------------------------------------------------------------------------------
# Predict: the parameters of one transformer block.

BLOCK_SETUP = dict(d_model=512, n_heads=8, d_ff=1536)


def measured_block_parameters() -> int:
    """Parameters of one llmbook TransformerBlock (RMSNorm, SwiGLU) of BLOCK_SETUP, counted on the module."""
    from llmbook.model import ModelConfig, TransformerBlock, count_parameters

    config = ModelConfig(vocab_size=100, context_length=16, n_layers=1, **BLOCK_SETUP)
    with torch.device("meta"):  # shapes only
        block = TransformerBlock(config)
    return count_parameters(block)


@exercise(
    "05.predict_block_parameters",
    reference=measured_block_parameters,
    kind="predict",
    hint=(
        "Add up the block's matrices (attention's four projections, SwiGLU's three) and its two norms' "
        "gains.",
        "q, k, v and o are each d_model × d_model (no biases); the SwiGLU has gate and up (d_ff × d_model) "
        "and "
        "down (d_model × d_ff); each RMSNorm has d_model gains.",
        "4 · 512² + 3 · 512 · 1536 + 2 · 512.",
    ),
)
def _predict_block_parameters_cases():
    yield Case((), expected=measured_block_parameters(), note="d_model 512, 8 heads, d_ff 1536")

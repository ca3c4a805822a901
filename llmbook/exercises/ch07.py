"""Chapter 7 exercises: dequantize Q4_1 blocks, fix a broken Q8_0 decoder, expand grouped key/value heads,
predict a KV cache's size, and read the logit lens of one layer.

Self-contained: each exercise builds its own inputs (random blocks, tiny seeded models), so grading never
needs the 98 MB model file.
"""

import numpy as np
import torch
from einops import repeat

from llmbook.exercises.core import Case, exercise
from llmbook.model import ModelConfig, TransformerLM
from llmbook.quant import dequantize_q4_1, dequantize_q8_0


def _q4_1_blocks(n_blocks: int, seed: int, scale_range=(1e-4, 1e-2)) -> torch.Tensor:
    """Random well-formed Q4_1 blocks, (n_blocks, 20) uint8: finite float16 scales and minimums."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(*scale_range, n_blocks).astype(np.float16)
    minimums = (-7.5 * scales.astype(np.float32) + rng.normal(0, 1e-3, n_blocks)).astype(np.float16)
    packed = rng.integers(0, 256, (n_blocks, 16), dtype=np.uint8)
    header = np.stack([scales, minimums], axis=1).view(np.uint8).reshape(n_blocks, 4)
    return torch.from_numpy(np.concatenate([header, packed], axis=1))


def _q8_0_blocks(n_blocks: int, seed: int) -> torch.Tensor:
    """Random Q8_0 blocks, (n_blocks, 34) uint8: a float16 scale and 32 signed bytes each."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(1e-4, 1e-2, (n_blocks, 1)).astype(np.float16)
    codes = rng.integers(-128, 128, (n_blocks, 32), dtype=np.int8)
    return torch.from_numpy(np.concatenate([scales.view(np.uint8), codes.view(np.uint8)], axis=1))


def _dequantize_q4_1(blocks):
    return dequantize_q4_1(blocks)


def _dequantize_q8_0(blocks):
    return dequantize_q8_0(blocks)


@exercise(
    "07.dequantize_q4_1",
    reference=_dequantize_q4_1,
    hint="Bytes 0-1 are the float16 scale d, bytes 2-3 the float16 minimum m: "
    "blocks[:, 0:2].contiguous().view(torch.float16).float() gives d as (n_blocks, 1). Bytes 4-19 hold "
    "the codes: weight j (j < 16) is byte j & 0x0F, weight j + 16 is byte j >> 4. Then w = d * q + m.",
    atol=0.0,
    rtol=0.0,
)
def _dequantize_q4_1_cases():
    yield Case((_q4_1_blocks(1, 0),), expected=dequantize_q4_1(_q4_1_blocks(1, 0)), note="one block")
    blocks = _q4_1_blocks(64, 1)
    yield Case((blocks,), expected=dequantize_q4_1(blocks), note="64 blocks")
    zero = _q4_1_blocks(3, 2)
    zero[:, 4:] = 0  # every code 0: each weight is its block's minimum
    yield Case((zero,), expected=dequantize_q4_1(zero), note="all codes 0: every weight equals m")
    high = _q4_1_blocks(2, 3)
    high[:, 4:] = 0xF0  # low nibbles 0, high nibbles 15: the two halves of a block differ
    yield Case((high,), expected=dequantize_q4_1(high), note="low nibbles 0, high nibbles 15")


def _broken_dequantize_q8_0(blocks):
    """The function the reader is asked to fix (the notebook shows it): two bugs."""
    scale = blocks[:, 0:2].contiguous().view(torch.float16).float()
    codes = blocks[:, 1:33].float()  # wrong offset and unsigned
    return codes * scale


@exercise(
    "07.fix_q8_0",
    reference=_dequantize_q8_0,
    hint="A Q8_0 block is 34 bytes: the float16 scale in bytes 0-1, then 32 *signed* bytes in 2-33. "
    "Read the codes from blocks[:, 2:34], reinterpret them as int8 (.contiguous().view(torch.int8)) before "
    "converting to float, and multiply by the scale.",
    atol=0.0,
    rtol=0.0,
)
def _fix_q8_0_cases():
    for note, n_blocks, seed in (("one block", 1, 10), ("100 blocks", 100, 11)):
        blocks = _q8_0_blocks(n_blocks, seed)
        yield Case((blocks,), expected=dequantize_q8_0(blocks), note=note)
    negative = _q8_0_blocks(2, 12)
    negative[:, 2:] = np.uint8(0x80)  # every code is -128
    yield Case((negative,), expected=dequantize_q8_0(negative), note="codes of -128 (byte 0x80)")


def _expand_kv_heads(kv, n_heads):
    group = n_heads // kv.shape[1]
    return repeat(kv, "batch kv_heads seq head_dim -> batch (kv_heads group) seq head_dim", group=group)


@exercise(
    "07.expand_kv_heads",
    reference=_expand_kv_heads,
    hint="With group = n_heads // kv_heads, query head h reads key/value head h // group, so each kv head "
    "appears group times in a row: kv.repeat_interleave(group, dim=1), or einops.repeat with "
    "'b kv s d -> b (kv group) s d'. (kv.repeat(1, group, 1, 1) puts them in the wrong order.)",
)
def _expand_kv_heads_cases():
    g = torch.Generator().manual_seed(70)
    kv = torch.randn(1, 3, 5, 4, generator=g)
    yield Case((kv, 9), expected=_expand_kv_heads(kv, 9), note="SmolLM2's 3 kv heads for 9 query heads")
    kv = torch.randn(2, 2, 7, 8, generator=g)
    yield Case((kv, 8), expected=_expand_kv_heads(kv, 8), note="batch 2, 2 kv heads for 8 query heads")
    kv = torch.randn(1, 4, 3, 2, generator=g)
    yield Case((kv, 4), expected=kv.clone(), note="as many kv heads as query heads: unchanged")
    kv = torch.randn(1, 1, 6, 4, generator=g)
    yield Case((kv, 6), expected=_expand_kv_heads(kv, 6), note="multi-query attention: one kv head")


def _kv_cache_bytes_measured(n_layers, n_heads, n_kv_heads, d_model, bytes_per_number):
    """What a real KVCache allocates per position (shapes only, on the meta device)."""
    dtype = {2: torch.float16, 4: torch.float32}[bytes_per_number]
    config = ModelConfig(vocab_size=8, context_length=16, d_model=d_model, n_layers=n_layers,
                         n_heads=n_heads, n_kv_heads=n_kv_heads)  # fmt: skip
    with torch.device("meta"):
        model = TransformerLM(config).to(dtype)
        cache = model.make_kv_cache(1, max_length=16)
    return sum(t.numel() * t.element_size() for t in cache.keys + cache.values) // 16


@exercise(
    "07.kv_cache_bytes",
    reference=_kv_cache_bytes_measured,
    hint="Per position and per layer the cache keeps one key and one value vector for every key/value head, "
    "each head_dim = d_model // n_heads numbers: 2 · n_layers · n_kv_heads · head_dim · bytes_per_number. "
    "The number of query heads only enters through head_dim.",
)
def _kv_cache_bytes_cases():
    configs = [
        ("SmolLM2-135M in float32", (30, 9, 3, 576, 4)),
        ("SmolLM2-135M in float16", (30, 9, 3, 576, 2)),
        ("the same without grouped-query attention", (30, 9, 9, 576, 4)),
        ("Llama-2-7B-sized, float16 (no GQA)", (32, 32, 32, 4096, 2)),
        ("Llama-3-8B-sized, float16 (8 kv heads)", (32, 32, 8, 4096, 2)),
    ]
    for note, args in configs:
        yield Case(args, expected=_kv_cache_bytes_measured(*args), note=note)


def _logit_lens(model, ids, layer):
    positions = torch.arange(ids.shape[1])
    with torch.no_grad():
        x = model.tok_embeddings(ids)
        for block in model.blocks[: layer + 1]:
            x = block(x, model.rotary, positions)
        return model.lm_head(model.final_norm(x))[0, -1]


def _tiny_model(seed: int, n_layers: int) -> TransformerLM:
    config = ModelConfig(vocab_size=50, context_length=32, d_model=32, n_layers=n_layers, n_heads=4,
                         n_kv_heads=2, tie_embeddings=True)  # fmt: skip
    with torch.random.fork_rng():  # seed the weights without touching the reader's random state
        torch.manual_seed(seed)
        return TransformerLM(config).eval()


@exercise(
    "07.logit_lens",
    reference=_logit_lens,
    hint="Embed the ids (model.tok_embeddings), run blocks 0..layer with block(x, model.rotary, positions) "
    "where positions = torch.arange(seq), then apply model.final_norm and model.lm_head and return the "
    "last position's row: (vocab,). With layer = n_layers - 1 this is model(ids)[0, -1].",
)
def _logit_lens_cases():
    g = torch.Generator().manual_seed(71)
    model = _tiny_model(72, 3)
    ids = torch.randint(0, 50, (1, 9), generator=g)
    yield Case((model, ids, 2), expected=_logit_lens(model, ids, 2), note="the last layer equals the model")
    yield Case((model, ids, 0), expected=_logit_lens(model, ids, 0), note="after the first block")
    deeper = _tiny_model(73, 5)
    ids = torch.randint(0, 50, (1, 14), generator=g)
    yield Case((deeper, ids, 2), expected=_logit_lens(deeper, ids, 2), note="a middle layer of 5")

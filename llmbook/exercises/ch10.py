"""Chapter 10 exercises: build a tokenizer from a GGUF file's metadata lists, dequantize Q4_1 blocks, fix a
broken Q8_0 decoder, expand grouped key/value heads, predict and then derive a KV cache's size, and read the
logit lens of one layer.

Self-contained: each exercise builds its own inputs (random blocks, tiny seeded models), so grading never
needs the 98 MB model file. Hidden cases draw other blocks, head counts, configurations and layers from the
checker's seeded generator.
"""

from functools import cache
from pathlib import Path

import numpy as np
import torch
from einops import repeat

from llmbook.bpe import train_bpe
from llmbook.exercises.core import Case, draw, exercise
from llmbook.gguf import GGUFFile, load_tokenizer
from llmbook.model import ModelConfig, TransformerLM
from llmbook.quant import dequantize_q4_1, dequantize_q8_0

_CONTROL = 3  # tokenizer.ggml.token_type of a special token (llama.cpp's LLAMA_TOKEN_TYPE_CONTROL)
_NORMAL = 1


def _metadata_lists(text: str, n_merges: int, specials: tuple[str, ...] = ("<|im_end|>",)):
    """Small GGUF tokenizer lists (tokens, token_type, merges) of a BPE trained on ``text``.

    Laid out as llama.cpp writes them: the special tokens first (plain text, type 3), then the single bytes
    the text uses and every merged token (GPT-2's printable alphabet, type 1), merges as "left right".
    """
    # Imported here, not at the top: the audit counts a chapter module's top-level names as the modules its
    # exercises re-implement, and the reader is meant to use this module (its `from_printable`).
    from llmbook.tokenizer_files import to_printable

    _, merges = train_bpe(text, 256 + len(specials) + n_merges, list(specials))
    single_bytes = sorted({bytes([b]) for b in text.encode("utf-8")})
    pieces = single_bytes + [a + b for a, b in merges]
    pieces = list(dict.fromkeys(pieces))  # a merge may rebuild a single byte's token: keep the first
    tokens = list(specials) + [to_printable(piece) for piece in pieces]
    token_type = [_CONTROL] * len(specials) + [_NORMAL] * len(pieces)
    merge_list = [f"{to_printable(a)} {to_printable(b)}" for a, b in merges]
    return tokens, token_type, merge_list


def _tokenizer_from_metadata(tokens, token_type, merges, text):
    """The ids of ``text`` under the tokenizer that `llmbook.gguf.load_tokenizer` builds from these lists."""
    metadata = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": token_type, "tokenizer.ggml.merges": merges,
    }  # fmt: skip
    file = GGUFFile(Path("exercise.gguf"), 3, metadata, {}, np.zeros(0, dtype=np.uint8))
    return load_tokenizer(file).encode(text)


_TRAINING_TEXTS = (
    "the cat sat on the mat. the cat ate the rat. then the cat sat on the hat.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "café, naïve, déjà vu: the café serves crème brûlée to the naïve tourist.",
)


def _tokenizer_from_metadata_hidden(g):
    for _ in range(2):
        text = _TRAINING_TEXTS[draw(g, 0, len(_TRAINING_TEXTS))]
        tokens, types, merges = _metadata_lists(text, draw(g, 1, 30))
        words = text.split()
        start = draw(g, 0, len(words) - 3)
        sample = " ".join(words[start : start + 3]) + "<|im_end|>" + " ".join(words[:2])
        yield Case((tokens, types, merges, sample), note="another vocabulary and text")


@exercise(
    "10.tokenizer_from_metadata",
    reference=_tokenizer_from_metadata,
    kind="implement",
    forbid=("llmbook.gguf.load_tokenizer",),
    hidden=_tokenizer_from_metadata_hidden,
    hint=(
        "Turn the three lists into what chapter 1's `Tokenizer(vocab, merges, special_tokens)` takes: a "
        "vocab {id: bytes} where the id is the token's position in `tokens`, merges as (bytes, bytes) pairs "
        "in rank order, and the special tokens' strings.",
        "Ordinary tokens (type 1) and both halves of each merge are written in GPT-2's printable byte "
        "alphabet: `llmbook.tokenizer_files.from_printable(token, where)` turns 'Ġcat' into b' cat'. A "
        "control token (type 3) is plain text: its bytes are token.encode('utf-8'); it is a special token.",
        "Split each merge with merge.split(' '). The lists name only the bytes the text used, so build "
        "Tokenizer(vocab, merges, specials, drop_unknown_bytes=True) and return its .encode(text).",
    ),
)
def _tokenizer_from_metadata_cases():
    tokens, types, merges = _metadata_lists(_TRAINING_TEXTS[0], 12)
    for note, text in (
        ("a sentence of the training text", "the cat sat on the hat."),
        ("a special token between words", "the rat<|im_end|>the mat"),
        ("a letter the lists lack (z): dropped, as SmolLM2's loader drops unknown bytes", "the zebra sat"),
    ):
        expected = _tokenizer_from_metadata(tokens, types, merges, text)
        yield Case((tokens, types, merges, text), expected=expected, note=note)
    tokens, types, merges = _metadata_lists(_TRAINING_TEXTS[2], 20)
    text = "the naïve café"
    expected = _tokenizer_from_metadata(tokens, types, merges, text)
    note = "accented letters: two bytes each, written as two printable characters"
    yield Case((tokens, types, merges, text), expected=expected, note=note)


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


def _dequantize_q4_1_hidden(g):
    blocks = _q4_1_blocks(draw(g, 1, 48), draw(g, 0, 2**31 - 1), scale_range=(1e-3, 0.1))
    yield Case((blocks,), note="random blocks with larger scales")
    same = _q4_1_blocks(draw(g, 1, 6), draw(g, 0, 2**31 - 1))
    same[:, 4:] = draw(g, 1, 256)  # one byte everywhere: the low and high halves of each block are constant
    yield Case((same,), note="every packed byte the same")


@exercise(
    "10.dequantize_q4_1",
    reference=_dequantize_q4_1,
    kind="implement",
    forbid=("llmbook.quant.dequantize_q4_1", "llmbook.quant.dequantize"),
    hidden=_dequantize_q4_1_hidden,
    hint=(
        "Split each 20-byte row into its parts: bytes 0-1 the scale d, bytes 2-3 the minimum m (float16), "
        "bytes 4-19 the 32 four-bit codes q, two to a byte. Each weight is d · q + m.",
        "blocks[:, 0:2].contiguous().view(torch.float16).float() gives d as (n_blocks, 1); m likewise from "
        "bytes 2-3. With packed = blocks[:, 4:], weight j (j < 16) has code packed[:, j] & 0x0F and weight "
        "j + 16 has code packed[:, j] >> 4.",
        "codes = torch.cat([packed & 0x0F, packed >> 4], dim=1).float(); return d * codes + m. (Interleaving "
        "low and high nibbles, or casting before the bit operations, gives the wrong order or an error.)",
    ),
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
    """(n_blocks, 34) uint8 Q8_0 blocks -> (n_blocks, 32) float32 weights. (Broken: fix me.)"""
    scale = blocks[:, 0:2].contiguous().view(torch.float16).float()
    codes = blocks[:, 1:33].float()
    return codes * scale


def _fix_q8_0_hidden(g):
    yield Case((_q8_0_blocks(draw(g, 1, 80), draw(g, 0, 2**31 - 1)),), note="random blocks")
    same = _q8_0_blocks(draw(g, 1, 6), draw(g, 0, 2**31 - 1))
    same[:, 2:] = draw(g, 128, 256)  # one byte of 0x80 or above everywhere: every code is negative
    yield Case((same,), note="one negative code everywhere")


@exercise(
    "10.fix_q8_0",
    reference=_dequantize_q8_0,
    kind="debug",
    broken=_broken_dequantize_q8_0,
    forbid=("llmbook.quant.dequantize_q8_0", "llmbook.quant.dequantize"),
    hidden=_fix_q8_0_hidden,
    hint=(
        "Count the bytes: where does the 2-byte scale end, and so where do the 32 codes begin and end? "
        "Then ask what byte 0xFF means as a code.",
        "The codes are bytes 2-33, not 1-32 (byte 1 is the scale's second half). And they are signed: "
        "converting uint8 straight to float reads byte 0xFF as 255 instead of -1.",
        "Look at line 4, `blocks[:, 1:33].float()`. Line 3 reads the scale from bytes 0 and 1, so "
        "where do the 32 codes begin and end? And `.float()` of a uint8 byte turns 0xFF into 255: the"
        " codes are signed, so reinterpret the bytes (a view) before converting them.",
    ),
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


def _expand_kv_heads_hidden(g):
    for _ in range(2):
        kv_heads, group = draw(g, 1, 6), draw(g, 1, 5)
        kv = torch.randn(draw(g, 1, 3), kv_heads, draw(g, 1, 8), draw(g, 1, 9), generator=g)
        yield Case((kv, kv_heads * group), note=f"{kv_heads} kv heads for {kv_heads * group} query heads")


@exercise(
    "10.expand_kv_heads",
    reference=_expand_kv_heads,
    kind="implement",
    forbid=("llmbook.attention.grouped_attention",),
    hidden=_expand_kv_heads_hidden,
    hint=(
        "With group = n_heads // kv_heads, query head h reads key/value head h // group. Which kv head must "
        "sit at each of the n_heads positions along axis 1?",
        "Each kv head appears group times in a row: heads 0,0,0,1,1,1,2,2,2 for 3 kv heads and 9 queries. "
        "kv.repeat(1, group, 1, 1) gives 0,1,2,0,1,2,... instead: the right shape in the wrong order.",
        "return kv.repeat_interleave(n_heads // kv.shape[1], dim=1), or einops.repeat(kv, "
        "'b kv s d -> b (kv group) s d', group=n_heads // kv.shape[1]).",
    ),
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


@cache  # a pure function of five integers, measured again by every check otherwise
def _kv_cache_bytes_measured(n_layers, n_heads, n_kv_heads, d_model, bytes_per_number):
    """What a real KVCache allocates per position (shapes only, on the meta device)."""
    dtype = {2: torch.float16, 4: torch.float32}[bytes_per_number]
    config = ModelConfig(vocab_size=8, context_length=16, d_model=d_model, n_layers=n_layers,
                         n_heads=n_heads, n_kv_heads=n_kv_heads)  # fmt: skip
    with torch.device("meta"):
        model = TransformerLM(config).to(dtype)
        cache = model.make_kv_cache(1, max_length=16)
    return sum(t.numel() * t.element_size() for t in cache.keys + cache.values) // 16


SMOLLM2_SHAPE = (30, 9, 3, 576)  # n_layers, n_heads, n_kv_heads, d_model (the GGUF file's metadata)


def measured_smollm2_kv_bytes_per_token() -> int:
    """Bytes per token position of SmolLM2-135M's KV cache in float16, as a real KVCache allocates it."""
    return _kv_cache_bytes_measured(*SMOLLM2_SHAPE, 2)


@exercise(
    "10.predict_kv_cache_bytes",
    reference=measured_smollm2_kv_bytes_per_token,
    kind="predict",
    hint=(
        "What does the cache keep for one token? For every layer, a key and a value vector for each "
        "key/value head (not each query head).",
        "One head's key is head_dim = d_model / n_heads = 64 numbers; there are 3 key/value heads, 30 "
        "layers, keys and values, and 2 bytes per float16 number.",
        "2 · 30 · 3 · 64 · 2 bytes.",
    ),
)
def _predict_kv_cache_bytes_cases():
    yield Case((), expected=measured_smollm2_kv_bytes_per_token(), note="SmolLM2-135M in float16, exact")


def _kv_cache_bytes_hidden(g):
    for _ in range(2):
        n_kv_heads = draw(g, 1, 9)
        n_heads = n_kv_heads * draw(g, 1, 5)
        d_model = n_heads * 2 * draw(g, 1, 33)
        args = (draw(g, 1, 41), n_heads, n_kv_heads, d_model, (2, 4)[draw(g, 0, 2)])
        yield Case(args, note="a random configuration")


@exercise(
    "10.kv_cache_bytes",
    reference=_kv_cache_bytes_measured,
    kind="derive",
    forbid=("llmbook.model.TransformerLM.make_kv_cache", "llmbook.attention.KVCache"),
    hidden=_kv_cache_bytes_hidden,
    hint=(
        "Per position and per layer the cache keeps one key and one value vector for every key/value head. "
        "How long is one such vector?",
        "Each vector has head_dim = d_model // n_heads numbers, so the answer is "
        "2 · n_layers · n_kv_heads · head_dim · bytes_per_number. The number of query heads only enters "
        "through head_dim.",
    ),
)
def _kv_cache_bytes_cases():
    configs = [
        ("SmolLM2-135M in float32", (*SMOLLM2_SHAPE, 4)),
        ("SmolLM2-135M in float16", (*SMOLLM2_SHAPE, 2)),
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


@cache  # one model per (seed, depth) per process: the shown and hidden cases share them
def _tiny_model(seed: int, n_layers: int) -> TransformerLM:
    config = ModelConfig(vocab_size=50, context_length=32, d_model=32, n_layers=n_layers, n_heads=4,
                         n_kv_heads=2, tie_embeddings=True)  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the reader's random state
        torch.manual_seed(seed)
        return TransformerLM(config).eval().requires_grad_(False)


def _logit_lens_hidden(g):
    for seed, n_layers in ((72, 3), (74, 4)):
        model = _tiny_model(seed, n_layers)
        ids = torch.randint(0, 50, (1, draw(g, 1, 20)), generator=g)
        yield Case((model, ids, draw(g, 0, n_layers)), note=f"a layer of {n_layers}")


@exercise(
    "10.logit_lens",
    reference=_logit_lens,
    kind="implement",
    forbid=("llmbook.model.TransformerLM",),
    hidden=_logit_lens_hidden,
    hint=(
        "Run the model's forward pass by hand, but stop after block `layer`, and read that hidden state "
        "through the final norm and the LM head as if it were the last one.",
        "x = model.tok_embeddings(ids); then block(x, model.rotary, positions) for the blocks "
        "model.blocks[: layer + 1], with positions = torch.arange(seq).",
        "Finish with model.lm_head(model.final_norm(x))[0, -1], shape (vocab,), under torch.no_grad(). With "
        "layer = n_layers - 1 this equals model(ids)[0, -1].",
    ),
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

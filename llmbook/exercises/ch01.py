"""Chapter 1 exercises: UTF-8 by hand, the two BPE operations, encoding by merge rank, decoding."""

import random

from llmbook.bpe import count_pairs, merge_pair, split_on_special_tokens
from llmbook.exercises.core import Case, exercise
from llmbook.tokenizer import Tokenizer


def _utf8_encode(code_point: int) -> bytes:
    return chr(code_point).encode("utf-8")


@exercise(
    "01.utf8_encode",
    reference=_utf8_encode,
    hint="Pick the length from the code point's size (< 0x80: 1 byte, < 0x800: 2, < 0x10000: 3, else 4). "
    "The first byte starts with 0, 110, 1110 or 11110; every later byte is 10 followed by 6 bits, "
    "taken from the code point's lowest bits last.",
)
def _utf8_encode_cases():
    code_points = [ord("A"), 0, 0x7F, 0x80, ord("é"), 0x7FF, 0x800, ord("今"), ord("好"), 0xFFFF]
    code_points += [0x10000, ord("🤗"), 0x10FFFF]
    notes = {0x7F: "largest 1-byte", 0x80: "smallest 2-byte", 0x7FF: "largest 2-byte"}
    notes.update({0x800: "smallest 3-byte", 0xFFFF: "largest 3-byte", 0x10000: "smallest 4-byte"})
    notes[0x10FFFF] = "largest code point"
    for cp in code_points:
        yield Case((cp,), expected=_utf8_encode(cp), note=notes.get(cp, f"{chr(cp)!r}"))


def _count_pairs(ids: list[int]) -> dict[tuple[int, int], int]:
    return dict(count_pairs(ids))


@exercise(
    "01.count_pairs",
    reference=_count_pairs,
    hint="Walk over neighbours (ids[i], ids[i + 1]) for i from 0 to len(ids) - 2 and count each tuple "
    "in a dict. A list of length 0 or 1 has no pairs.",
)
def _count_pairs_cases():
    rng = random.Random(0)
    samples = [
        ([1, 2, 3, 1, 2], "a repeated pair"),
        ([7, 7, 7, 7], "overlapping pairs of one id: 3 occurrences"),
        ([5], "one id: no pairs"),
        ([], "empty"),
        (list(b"hello world, hello bytes"), "bytes of a sentence"),
        ([rng.randrange(6) for _ in range(200)], "200 random ids"),
    ]
    for ids, note in samples:
        yield Case((ids,), expected=_count_pairs(ids), note=note)


@exercise(
    "01.merge_pair",
    reference=merge_pair,
    hint="Scan left to right; when ids[i], ids[i + 1] equal the pair, append new_id and jump two places, "
    "otherwise append ids[i] and move one. Return a new list.",
)
def _merge_pair_cases():
    samples = [
        ([1, 2, 3, 1, 2], (1, 2), 99, "the pair twice"),
        ([7, 7, 7], (7, 7), 8, "overlap: the leftmost occurrence wins"),
        ([7, 7, 7, 7], (7, 7), 8, "four in a row"),
        ([1, 2], (2, 1), 5, "the pair in the wrong order"),
        ([4], (4, 4), 5, "length 1"),
        ([], (1, 2), 3, "empty"),
        (list(b"the cat sat on the mat"), (ord("a"), ord("t")), 256, "'at' in a sentence"),
    ]
    for ids, pair, new_id, note in samples:
        yield Case((ids, pair, new_id), expected=merge_pair(ids, pair, new_id), note=note)


# Merges of a tiny tokenizer (learned order), shared by the encoding cases.
_TOY_MERGES = [
    (b"t", b"h"),
    (b"th", b"e"),
    (b" ", b"the"),
    (b"a", b"t"),
    (b"e", b"r"),
    (b"at", b"er"),
    (b"w", b"ater"),
    (b"e", b"e"),
    (b"ee", b"e"),
]


def _encode_word(word: str, merges: list[tuple[bytes, bytes]]) -> list[bytes]:
    vocab = {i: bytes([i]) for i in range(256)}
    for left, right in merges:
        if left + right not in vocab.values():
            vocab[len(vocab)] = left + right
    tokenizer = Tokenizer(vocab, merges)
    return [tokenizer.vocab[i] for i in tokenizer.encode_pretoken(word)]


@exercise(
    "01.encode_word",
    reference=_encode_word,
    hint="Start from the word's UTF-8 bytes as one-byte tokens. Repeatedly find, among adjacent pairs, "
    "the one that appears earliest in `merges` (lowest index), merge all its occurrences, and stop when "
    "no adjacent pair is a merge.",
)
def _encode_word_cases():
    for word, note in [
        ("the", "two merges in a row"),
        (" the", "a merge of a merge"),
        ("water", "merge order matters: 'at' and 'er' before 'ater'"),
        ("eee", "overlapping pair: 'ee' first, then 'ee'+'e'"),
        ("eeee", "two 'ee' and no merge joins them"),
        ("x", "a single byte"),
        ("", "empty word"),
        ("今", "a 3-byte character with no merges"),
        ("thethe", "the same merges twice"),
    ]:
        yield Case((word, _TOY_MERGES), expected=_encode_word(word, _TOY_MERGES), note=note)


def _decode(ids: list[int], vocab: dict[int, bytes]) -> str:
    full = {i: bytes([i]) for i in range(256)}
    full.update(vocab)
    return Tokenizer(full, []).decode(ids)


@exercise(
    "01.decode",
    reference=_decode,
    hint="Join the tokens' bytes first (b''.join), then decode once with "
    "bytes.decode('utf-8', errors='replace'). Decoding token by token breaks characters split across tokens.",
)
def _decode_cases():
    vocab = {i: bytes([i]) for i in range(256)}
    today = "今天".encode()
    vocab.update({256: today[:2], 257: today[2:], 258: b" the", 259: b"\xf0\x9f"})
    samples = [
        ([72, 105], "ASCII bytes"),
        ([258, 32, 99, 97, 116], "a multi-byte token"),
        ([256, 257], "a character cut across two tokens"),
        ([256], "only the first half of a character"),
        ([259, 0xA4, 0x97], "an emoji in three tokens"),
        ([259], "truncated emoji"),
        ([0xFF, 72], "a byte that is never valid UTF-8"),
        ([], "no ids"),
    ]
    for ids, note in samples:
        yield Case((ids, vocab), expected=_decode(ids, vocab), note=note)


@exercise(
    "01.split_special",
    reference=split_on_special_tokens,
    hint="Scan the text; at each position try the special tokens longest first. Emit (text, False) for "
    "ordinary stretches (never empty ones) and (token, True) for each special token found.",
)
def _split_special_cases():
    eot = "<|endoftext|>"
    samples = [
        (f"Hello{eot}World", [eot], "one special token"),
        (f"{eot}{eot}", [eot], "two in a row, nothing around them"),
        ("no specials here", [eot], "no match"),
        ("", [eot], "empty text"),
        ("a<|x|><|y|>b<|x|>", ["<|x|>", "<|x|><|y|>"], "overlapping: the longest wins"),
        (f"<|endoftext{eot}|>", [eot], "a near-miss next to a real one"),
    ]
    for text, specials, note in samples:
        yield Case((text, specials), expected=split_on_special_tokens(text, specials), note=note)

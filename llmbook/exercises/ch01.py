"""Chapter 1 exercises: UTF-8 by hand, the two BPE operations, encoding by merge rank, decoding, a merge
tie-break to debug, and a byte count to predict.
"""

import random

import torch

from llmbook.bpe import count_pairs, merge_pair, split_on_special_tokens
from llmbook.exercises.core import Case, draw, exercise
from llmbook.tokenizer import Tokenizer


def _utf8_encode(code_point: int) -> bytes:
    return chr(code_point).encode("utf-8")


def _utf8_encode_hidden(g):
    for low, high in [(0, 0x80), (0x80, 0x800), (0xE000, 0x10000), (0x10000, 0x110000)]:
        yield Case((draw(g, low, high),), note=f"a code point in [{low:#x}, {high:#x})")


@exercise(
    "01.utf8_encode",
    reference=_utf8_encode,
    hidden=_utf8_encode_hidden,
    hint=(
        "The number of bytes depends only on how large the code point is; the first byte announces that "
        "length.",
        "Pick the length from the code point's size (< 0x80: 1 byte, < 0x800: 2, < 0x10000: 3, else 4). "
        "The first byte starts with 0, 110, 1110 or 11110; every later byte is 10 followed by 6 bits, "
        "taken from the code point's lowest bits last.",
    ),
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


def _count_pairs_hidden(g):
    for _ in range(3):
        ids = torch.randint(0, 5, (draw(g, 0, 40),), generator=g).tolist()
        yield Case((ids,), note="random ids")


@exercise(
    "01.count_pairs",
    reference=_count_pairs,
    forbid=("llmbook.bpe.count_pairs",),
    hidden=_count_pairs_hidden,
    hint=(
        "A pair is two neighbours, ids[i] and ids[i + 1]; overlapping pairs all count.",
        "Walk over neighbours (ids[i], ids[i + 1]) for i from 0 to len(ids) - 2 and count each tuple "
        "in a dict. A list of length 0 or 1 has no pairs.",
    ),
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


def _merge_pair_hidden(g):
    for _ in range(3):
        ids = torch.randint(0, 4, (draw(g, 2, 30),), generator=g).tolist()
        at = draw(g, 0, len(ids) - 1)
        yield Case((ids, (ids[at], ids[at + 1]), draw(g, 256, 300)), note="random ids, a pair they contain")


@exercise(
    "01.merge_pair",
    reference=merge_pair,
    forbid=("llmbook.bpe.merge_pair",),
    hidden=_merge_pair_hidden,
    hint=(
        "Walk the list once from the left; a match consumes two ids, so it cannot overlap the next one.",
        "Scan left to right; when ids[i], ids[i + 1] equal the pair, append new_id and jump two places, "
        "otherwise append ids[i] and move one. Return a new list.",
    ),
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


def _encode_word_hidden(g):
    letters = "thewar e"
    for _ in range(4):
        word = "".join(letters[draw(g, 0, len(letters))] for _ in range(draw(g, 1, 12)))
        yield Case((word, _TOY_MERGES), note="a random word over 'thewar e'")


@exercise(
    "01.encode_word",
    reference=_encode_word,
    forbid=("llmbook.tokenizer.Tokenizer.encode_pretoken",),
    hidden=_encode_word_hidden,
    hint=(
        "Encoding replays the merges in the order they were learned, not by how often pairs occur in this "
        "word.",
        "Start from the word's UTF-8 bytes as one-byte tokens. Repeatedly find, among adjacent pairs, "
        "the one that appears earliest in `merges` (lowest index), merge all its occurrences, and stop when "
        "no adjacent pair is a merge.",
    ),
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


def _decode_hidden(g):
    vocab = {i: bytes([i]) for i in range(256)}
    today = "今天".encode()
    vocab.update({256: today[:2], 257: today[2:], 258: b" the", 259: b"\xf0\x9f"})
    for _ in range(3):
        ids = torch.randint(0, 260, (draw(g, 1, 12),), generator=g).tolist()
        yield Case((ids, vocab), note="random ids, valid UTF-8 or not")


@exercise(
    "01.decode",
    reference=_decode,
    forbid=("llmbook.tokenizer.Tokenizer.decode",),
    hidden=_decode_hidden,
    hint=(
        "A token may hold only part of a character: think about when the bytes become text.",
        "Join the tokens' bytes first (b''.join), then decode once with "
        "bytes.decode('utf-8', errors='replace'). Decoding token by token breaks characters split across "
        "tokens.",
    ),
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


def _split_special_hidden(g):
    pieces = ["ab", " ", "<|x|>", "<|x|><|y|>", "<|y|>", "x", "<|", "|>"]
    for _ in range(3):
        text = "".join(pieces[draw(g, 0, len(pieces))] for _ in range(draw(g, 0, 10)))
        yield Case((text, ["<|x|>", "<|x|><|y|>"]), note="random text around special tokens")


@exercise(
    "01.split_special",
    reference=split_on_special_tokens,
    forbid=("llmbook.bpe.split_on_special_tokens",),
    hidden=_split_special_hidden,
    hint=(
        "Scan the text position by position; at each one, is a special token starting here? Prefer the "
        "longest.",
        "Scan the text; at each position try the special tokens longest first. Emit (text, False) for "
        "ordinary stretches (never empty ones) and (token, True) for each special token found.",
    ),
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


# ---------------------------------------------------------------------------------------------
# Debug: choosing the merge. The package's trainer takes the most frequent pair and, among equally
# frequent pairs, the lexicographically greater (left, right) pair of byte strings, as GPT-2's does.


def _best_pair(pair_counts: dict[tuple[bytes, bytes], int]) -> tuple[bytes, bytes]:
    return max(pair_counts, key=lambda pair: (pair_counts[pair], pair))


def _broken_best_pair(pair_counts):
    """The pair to merge next: the most frequent; among ties, the greater pair of byte strings."""
    return min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))


def _best_pair_hidden(g):
    pieces = [b"a", b"b", b"th", b"e", b" ", b"in", b"\xe4\xbb"]
    for _ in range(3):
        counts = {}
        for _ in range(draw(g, 1, 12)):
            counts[(pieces[draw(g, 0, len(pieces))], pieces[draw(g, 0, len(pieces))])] = draw(g, 1, 4)
        yield Case((counts,), note="random counts with ties")


@exercise(
    "01.best_pair",
    reference=_best_pair,
    kind="debug",
    broken=_broken_best_pair,
    hidden=_best_pair_hidden,
    hint=(
        "The most frequent pair is found correctly; look at what happens when two pairs are equally "
        "frequent.",
        "min over (-count, pair) does put the most frequent first, but among equal counts it picks the "
        "smaller pair, and the rule asks for the greater one.",
        "Look at line 3, the key `(-pair_counts[pair], pair)` under `min`: for two pairs with the "
        "same count, which one does `min` return, and which one does the docstring ask for?",
    ),
)
def _best_pair_cases():
    yield Case(({(b"a", b"b"): 3, (b"b", b"c"): 1},), expected=(b"a", b"b"), note="no tie")
    yield Case(({(b"a", b"b"): 2, (b"x", b"y"): 2},), expected=(b"x", b"y"), note="a tie: the greater pair")
    tie = {(b"t", b"h"): 5, (b"th", b"e"): 5, (b"t", b"z"): 5, (b"e", b" "): 4}
    yield Case((tie,), expected=_best_pair(tie), note="a three-way tie decided by the left piece")
    same_left = {(b"a", b"c"): 1, (b"a", b"b"): 1}
    yield Case((same_left,), expected=(b"a", b"c"), note="equal left pieces: the right piece decides")


# ---------------------------------------------------------------------------------------------
# Predict: how many bytes a string takes in UTF-8.

UTF8_TEXT = "naïve café: 日本語 🤗!"


def measured_utf8_bytes() -> int:
    """len(UTF8_TEXT.encode('utf-8')): the byte-level tokenizer's starting length for that text."""
    return len(UTF8_TEXT.encode("utf-8"))


@exercise(
    "01.predict_utf8_bytes",
    reference=measured_utf8_bytes,
    kind="predict",
    hint=(
        "Count characters by how many bytes UTF-8 gives each: 1 for ASCII (spaces and punctuation too).",
        "Latin letters with accents (ï, é) take 2 bytes, CJK characters 3, an emoji 4.",
        "The text has 12 ASCII characters (spaces included), 2 accented letters, 3 CJK characters, 1 emoji.",
    ),
)
def _predict_utf8_bytes_cases():
    yield Case((), expected=measured_utf8_bytes(), note=repr(UTF8_TEXT))

"""Tokenizer parity on all of Unicode: our pre-tokenization uses the references' Unicode version (issue 17).

The property test runs `LLMBOOK_PARITY_EXAMPLES` examples (default 2000, about 15 s on one core); a long run:

    LLMBOOK_PARITY_EXAMPLES=200000 python -m pytest tests/test_unicode_parity.py -p no:randomly
"""

import os

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, pre_tokenizers

from llmbook.tokenizer import gpt2_tokenizer
from llmbook.unicode_version import UNICODE_VERSION, code_points, differing_characters, pin_unicode

EXAMPLES = int(os.environ.get("LLMBOOK_PARITY_EXAMPLES", "2000"))
EVERY = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def references(gpt2):
    return gpt2.to_tiktoken(), gpt2.to_hf()


def _tiktoken_matches(prop: str) -> set[int]:
    ranks = {bytes([b]): b for b in range(256)}
    encoding = tiktoken.Encoding(name="probe", pat_str=prop, mergeable_ranks=ranks, special_tokens={})
    return set(map(ord, encoding.decode_bytes(encoding.encode_ordinary(EVERY)).decode("utf-8")))


def _tokenizers_matches(prop: str) -> set[int]:
    split = pre_tokenizers.Split(Regex(prop), behavior="removed", invert=True)
    return set(map(ord, "".join(piece for piece, _ in split.pre_tokenize_str(EVERY))))


@pytest.mark.parametrize("name", ["L", "N"])
def test_the_unicode_tables_are_the_reference_libraries_own(name):
    expected = code_points(name)
    prop = rf"\p{{{name}}}"
    assert _tiktoken_matches(prop) == expected, f"tiktoken no longer uses Unicode {UNICODE_VERSION}"
    assert _tokenizers_matches(prop) == expected, f"tokenizers no longer uses Unicode {UNICODE_VERSION}"


def test_whitespace_is_the_same_in_every_library():
    ours = set(map(ord, regex.findall(r"\s", EVERY)))
    assert _tiktoken_matches(r"\s") == ours == _tokenizers_matches(r"\s")


def test_a_pinned_pattern_matches_the_tables_exactly():
    # Every character whose category differs between `regex` and Unicode 16.0, and every 16th other one
    # (the explicit classes are slow to match, so not all 1.1 million).
    differing = differing_characters()
    sample = "".join(ch for ch in EVERY[::16]) + ("".join(differing[1].findall(EVERY)) if differing else "")
    points = set(map(ord, sample))
    for name in ("L", "N"):
        pinned = regex.compile(pin_unicode(rf"\p{{{name}}}|[\p{{{name}}}]"))
        assert set(map(ord, pinned.findall(sample))) == code_points(name) & points
    negated = regex.compile(pin_unicode(r"[^\s\p{L}\p{N}]"))
    spaces = set(map(ord, regex.findall(r"\s", EVERY)))
    assert set(map(ord, negated.findall(sample))) == points - code_points("L") - code_points("N") - spaces


def test_a_letter_newer_than_the_references_pretokenizes_as_they_do(gpt2, references):
    text = "\U0003315A's and \U0003315A\U0003315A"
    tiktoken_encoding, hf = references
    assert gpt2.encode(text) == tiktoken_encoding.encode_ordinary(text) == hf.encode(text).ids
    if differing_characters() is not None:  # this `regex` is newer than Unicode 16.0
        assert regex.compile(r"\p{L}").fullmatch("\U0003315A")


_FRAGMENTS = st.sampled_from(["'s", "'t", " ", "  ", "\n", "a", "Z", "1", "!", " x", "'", "\t"])
_ANY_CHARACTER = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=("Cs",))
_TEXT = st.lists(st.one_of(_ANY_CHARACTER, _ANY_CHARACTER, _FRAGMENTS), max_size=24).map("".join)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_TEXT)
def test_ids_and_round_trip_match_tiktoken_and_tokenizers_on_any_code_points(gpt2, references, text):
    tiktoken_encoding, hf = references
    ids = gpt2.encode(text)
    assert ids == tiktoken_encoding.encode_ordinary(text)
    assert ids == hf.encode(text).ids
    assert gpt2.decode(ids) == text

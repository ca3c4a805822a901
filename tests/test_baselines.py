"""The bits-per-byte baselines: compressors at their strongest settings and add-one byte n-gram models."""

import gzip
import math
import random

import pytest

from llmbook.baselines import all_baselines, byte_ngram_bits_per_byte, compressed_bits_per_byte


def test_gzip_baseline_is_the_size_of_gzip_level_9_output():
    data = b"to be or not to be, that is the question\n" * 50
    expected = 8 * len(gzip.compress(data, compresslevel=9, mtime=0)) / len(data)
    assert compressed_bits_per_byte(data, "gzip -9") == expected


def test_compressors_cannot_shrink_random_bytes_but_shrink_repetition():
    noise = random.Random(0).randbytes(20_000)
    for name in ("gzip -9", "bz2 -9", "lzma -9e"):
        assert compressed_bits_per_byte(noise, name) > 7.9
        assert compressed_bits_per_byte(b"abc" * 10_000, name) < 0.2


def test_text_is_measured_as_its_utf8_bytes():
    assert compressed_bits_per_byte("héllo " * 100) == compressed_bits_per_byte(("héllo " * 100).encode())


def test_unigram_add_one_matches_the_formula_by_hand():
    # train "aab": p(a) = (2 + 1) / (3 + 256), p(b) = (1 + 1) / (3 + 256)
    bits = byte_ngram_bits_per_byte(b"aab", b"ab", order=1)
    assert bits == pytest.approx(-(math.log2(3 / 259) + math.log2(2 / 259)) / 2)


def test_bigram_takes_the_first_context_from_the_end_of_train():
    # train "ab": a -> b seen once; "b" ends train and was never followed, so p(a | b) = 1/256.
    # val "ab": p(a | b) = (0 + 1) / (0 + 256), p(b | a) = (1 + 1) / (1 + 256)
    bits = byte_ngram_bits_per_byte(b"ab", b"ab", order=2)
    assert bits == pytest.approx(-(math.log2(1 / 256) + math.log2(2 / 257)) / 2)


def test_bigram_learns_an_alternation_that_unigram_cannot():
    train, val = b"ab" * 5000, b"ab" * 500
    assert byte_ngram_bits_per_byte(train, val, order=1) == pytest.approx(1.0, abs=0.1)
    assert byte_ngram_bits_per_byte(train, val, order=2) < 0.1


def test_smoothing_only_changes_unseen_and_rare_costs_a_little():
    train, val = b"the cat sat on the mat " * 200, b"the cat sat"
    assert byte_ngram_bits_per_byte(train, val, 2, smoothing=0.01) < byte_ngram_bits_per_byte(train, val, 2)


def test_all_baselines_names_every_baseline_with_uniform_at_8_bits():
    results = all_baselines("some training text " * 20, "some validation text")
    expected = {
        "gzip -9",
        "bz2 -9",
        "lzma -9e",
        "unigram bytes (add-one)",
        "bigram bytes (add-one)",
        "uniform bytes",
    }
    assert set(results) == expected
    assert results["uniform bytes"] == 8.0


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: compressed_bits_per_byte(b""), ValueError, "empty"),
        (lambda: compressed_bits_per_byte(b"x", "zstd"), ValueError, "unknown compressor"),
        (lambda: compressed_bits_per_byte(123), TypeError, "bytes or str"),
        (lambda: byte_ngram_bits_per_byte(b"abc", b"", 1), ValueError, "non-empty val"),
        (lambda: byte_ngram_bits_per_byte(b"abc", b"a", 0), ValueError, "order"),
        (lambda: byte_ngram_bits_per_byte(b"abc", b"a", 2, smoothing=0), ValueError, "smoothing"),
        (lambda: byte_ngram_bits_per_byte(["a"], b"a"), TypeError, "train must be bytes or str"),
    ],
)
def test_bad_input_names_what_was_expected(call, error, message):
    with pytest.raises(error, match=message):
        call()

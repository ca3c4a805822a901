"""Tokenizer hardening (issue 29): long pieces without whitespace, bounded streaming, surrogates, bad ids,
and the numeric boundaries of the tokenizer's entry points."""

import random
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmbook import data
from llmbook.bpe import apply_merges, apply_merges_heap, count_pretokens, train_bpe
from llmbook.tokenizer import MAX_VOCAB_ID, Tokenizer, _run_bytes, _space_bytes, gpt2_tokenizer

EOT = "<|endoftext|>"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# GPT-2's pattern with single digits, as SmolLM2 splits numbers (the cut rules must hold for it too).
DIGIT_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BYTES = {i: bytes([i]) for i in range(256)}


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def reference(gpt2):
    return gpt2.to_tiktoken()


@pytest.fixture(scope="module")
def small_windows(gpt2) -> Tokenizer:
    """GPT-2's tokenizer cutting long pieces every 32 characters and encoding every 16, so that short
    generated texts go through every cut."""
    tok = Tokenizer(gpt2.vocab, gpt2.merges, [EOT])
    tok.LONG_PIECE_WINDOW_CHARS, tok.STREAM_CHUNK_CHARS = 32, 16
    return tok


@pytest.fixture(scope="module")
def digits_tokenizer() -> Tokenizer:
    text = data.load_text("tinyshakespeare")[:60_000] + " 2024 1999 😀😀 aaaa!!!! ''''\n\n\n"
    vocab, merges = train_bpe(text, 700, [EOT], pattern=DIGIT_SPLIT_PATTERN)
    tok = Tokenizer(vocab, merges, [EOT], pattern=DIGIT_SPLIT_PATTERN)
    tok.LONG_PIECE_WINDOW_CHARS, tok.STREAM_CHUNK_CHARS = 24, 8
    return tok


def _random_run(kind: str, n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    alphabet = {
        "letters": LETTERS,
        "a": "a",
        "emoji": "😀🤗👍🏽",
        "cjk": "今天天气真好的是",
        "digits": "0123456789",
        "symbols": "!?.'-,;",
        "whitespace": " \n\t\u3000",
    }[kind]
    return "".join(rng.choice(alphabet) for _ in range(n_chars))


# ---------------------------------------------------------------------------------------------------
# Long pieces: O(n log n), same ids


_PIECE_ALPHABETS = ["a", "ab", "abc", "etaoinshrdlu", LETTERS, "😀", "😀🤗", "今天天气", "!?.'", " \n", "é"]


@settings(max_examples=300, deadline=None)
@given(alphabet=st.sampled_from(_PIECE_ALPHABETS), picks=st.lists(st.integers(0, 25), max_size=200))
def test_heap_merging_gives_the_ids_of_rescanning(gpt2, alphabet, picks):
    text = "".join(alphabet[i % len(alphabet)] for i in picks)
    ids = gpt2._initial_ids(text.encode("utf-8"))
    merged, n_final = apply_merges_heap(ids, gpt2._merge_ranks)
    assert merged == apply_merges(ids, gpt2._merge_ranks)
    assert n_final == len(merged)


def _shuffled_merges_tokenizer(seed: int) -> Tokenizer:
    """Merges over "abc" in a random order: some use a part that a later merge makes."""
    rng = random.Random(seed)
    tokens, merges = [b"a", b"b", b"c"], []
    while len(merges) < 12:
        left, right = rng.choice(tokens), rng.choice(tokens)
        if len(left + right) <= 5 and (left, right) not in merges:
            merges.append((left, right))
            tokens.append(left + right) if left + right not in tokens else None
    rng.shuffle(merges)
    vocab = dict(BYTES)
    for token in tokens[3:]:
        vocab[len(vocab)] = token
    return Tokenizer(vocab, merges)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 10**6), text=st.text(alphabet="abc", max_size=60))
def test_heap_merging_matches_rescanning_when_merges_are_not_in_learned_order(seed, text):
    tok = _shuffled_merges_tokenizer(seed)
    ids = tok._initial_ids(text.encode())
    assert apply_merges_heap(ids, tok._merge_ranks)[0] == apply_merges(ids, tok._merge_ranks)


class _CountingRanks(dict):
    """The merge table, counting how often the encoder looks a pair up."""

    lookups = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)


def _lookups_to_encode(gpt2: Tokenizer, text: str) -> int:
    tok = Tokenizer(gpt2.vocab, gpt2.merges)
    tok._merge_ranks = _CountingRanks(tok._merge_ranks)
    tok.encode(text)
    return tok._merge_ranks.lookups


def test_encoding_a_long_piece_without_whitespace_does_n_log_n_work(gpt2):
    # Rescanning after every merge looked up every pair once per merge: quadratic (16x for 4x the text).
    small = _lookups_to_encode(gpt2, _random_run("letters", 2_000))
    large = _lookups_to_encode(gpt2, _random_run("letters", 8_000))
    assert large < 5 * small, (small, large)
    assert small < 20 * 2_000


@pytest.mark.parametrize("kind", ["letters", "a", "emoji", "cjk", "digits", "symbols", "whitespace"])
def test_long_pieces_encode_and_stream_as_tiktoken_does(gpt2, reference, kind):
    text = _random_run(kind, 12_000) + "x"
    expected = reference.encode_ordinary(text)
    assert gpt2.encode(text) == expected
    assert list(gpt2.encode_iterable(text[i : i + 700] for i in range(0, len(text), 700))) == expected


def test_long_pieces_are_not_cached(gpt2):
    tok = Tokenizer(gpt2.vocab, gpt2.merges)
    tok.encode("a" * 5_000 + " and " + "b" * 70)
    assert " and" in tok._cache
    assert max(map(len, tok._cache)) <= tok.CACHE_MAX_PIECE_CHARS


def test_a_long_piece_with_bytes_the_vocab_lacks_drops_them_as_a_short_one_does(gpt2):
    # As SmolLM2's vocab lacks byte 4: the windows of a long piece must map token ends past dropped bytes.
    vocab = {token_id: token for token_id, token in gpt2.vocab.items() if token != b"\x04"}
    tok = Tokenizer(vocab, gpt2.merges, drop_unknown_bytes=True)
    tok.LONG_PIECE_WINDOW_CHARS, tok.STREAM_CHUNK_CHARS = 32, 16
    text = "!?\x04-" * 300
    expected = gpt2.encode(text.replace("\x04", ""))
    assert tok.encode(text) == expected
    assert list(tok.encode_iterable(text[i : i + 50] for i in range(0, len(text), 50))) == expected


# ---------------------------------------------------------------------------------------------------
# Streaming: exact, and bounded on an endless piece

_FRAGMENTS = ["a", "b", "ab", "😀", "é", "今", "1", "7", "!", "'", "'s", "'ll", " ", "\n", "\u3000", EOT]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    runs=st.lists(st.tuples(st.sampled_from(_FRAGMENTS), st.integers(1, 120)), min_size=1, max_size=5),
    cut_points=st.lists(st.integers(0, 2000), max_size=10),
)
def test_encode_iterable_equals_encode_across_cut_long_pieces(
    small_windows, digits_tokenizer, runs, cut_points
):
    text = "".join(fragment * count for fragment, count in runs)
    cuts = sorted({0, len(text), *(c % (len(text) + 1) for c in cut_points)})
    chunks = [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    for tok in (small_windows, digits_tokenizer):
        assert list(tok.encode_iterable(chunks)) == tok.encode(text)


@pytest.mark.parametrize("symbol", ["!", "-", "?"])
def test_a_long_symbol_run_is_never_cut_before_an_apostrophe(small_windows, gpt2, symbol):
    # Cut there, "'s" would start again as a contraction instead of ending the run "!!!...'". Every
    # run length puts the apostrophe at each place in the 32-character windows.
    for length in range(20, 140):
        for ending in ("'s", "'ll", "'t x"):
            text = symbol * length + ending
            assert list(small_windows.encode_iterable([text])) == gpt2.encode(text), (length, ending)


@settings(max_examples=300, deadline=None)
@given(
    alphabet=st.sampled_from(_PIECE_ALPHABETS),
    known=st.lists(st.integers(0, 25), min_size=1, max_size=120),
    rest=st.lists(st.integers(0, 25), max_size=20),
)
def test_final_tokens_of_an_unfinished_piece_survive_any_continuation(gpt2, alphabet, known, rest):
    start = "".join(alphabet[i % len(alphabet)] for i in known)
    whole = start + "".join(alphabet[i % len(alphabet)] for i in rest)
    data_bytes = start.encode()
    continuation = _space_bytes() if start.isspace() else _run_bytes()
    ids, n_final = apply_merges_heap(
        gpt2._initial_ids(data_bytes), gpt2._merge_ranks, gpt2._open_merge_rank(data_bytes, continuation)
    )
    assert apply_merges(gpt2._initial_ids(whole.encode()), gpt2._merge_ranks)[:n_final] == ids[:n_final]


def _largest_carry(tok: Tokenizer, strings) -> tuple[int, int]:
    """(longest text carried from one chunk to the next, ids) while streaming `strings`."""
    carried = []
    encode_stable_prefix = tok._encode_stable_prefix

    def recording(buffer):
        ids, rest = encode_stable_prefix(buffer)
        carried.append(len(rest))
        return ids, rest

    tok._encode_stable_prefix = recording
    try:
        n_ids = sum(1 for _ in tok.encode_iterable(strings))
    finally:
        del tok._encode_stable_prefix
    return max(carried), n_ids


@pytest.mark.parametrize("kind", ["letters", "a", "emoji", "cjk", "symbols", "whitespace"])
def test_encode_iterable_carries_a_bounded_tail_of_an_endless_piece(gpt2, kind):
    tok = Tokenizer(gpt2.vocab, gpt2.merges, [EOT])
    piece = _random_run(kind, 1_000)
    largest, n_ids = _largest_carry(tok, (piece for _ in range(200)))
    assert n_ids > 200_000 / 8
    # The whole 200,000-character piece used to be carried (and re-scanned) at every chunk.
    assert largest < tok.LONG_PIECE_WINDOW_CHARS + 64, largest


def _streaming_peak(tok: Tokenizer, piece: str, n_pieces: int) -> int:
    tracemalloc.start()
    for _ in tok.encode_iterable(piece for _ in range(n_pieces)):
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_encode_iterable_memory_is_flat_on_one_endless_piece(gpt2):
    tok = Tokenizer(gpt2.vocab, gpt2.merges, [EOT])
    piece = "a" * 1000
    small = _streaming_peak(tok, piece, 50)
    large = _streaming_peak(tok, piece, 250)
    # 250,000 letters held as text and their ids would take over 2 MB: the peak is the window's.
    assert large < 2 * 1024 * 1024, large
    assert large < small + 64 * 1024, (small, large)


# ---------------------------------------------------------------------------------------------------
# Surrogates


@pytest.mark.parametrize(
    "text",
    [
        "\ud800",
        "a\ud800b",
        "\ud83e\udd17",
        "\udd17\ud83e",
        "\ud800\ud800",
        "x \udfff y",
        EOT + "\udc00" + EOT,
    ],
)
def test_surrogates_encode_as_tiktoken_does(gpt2, reference, text):
    assert gpt2.encode(text) == reference.encode(text, allowed_special="all")


def test_a_surrogate_pair_split_between_streamed_strings_is_joined(gpt2, small_windows):
    text = "ab \ud83e\udd17 cd " + "\ud800" * 100 + " end"
    for cut in range(len(text) + 1):
        streamed = list(small_windows.encode_iterable([text[:cut], text[cut:]]))
        assert streamed == gpt2.encode(text), cut
    assert gpt2.encode(text) == gpt2.encode("ab 🤗 cd " + "\ufffd" * 100 + " end")


# ---------------------------------------------------------------------------------------------------
# Bad ids to decode


@pytest.mark.parametrize(
    ("ids", "position"),
    [
        ([True], 0),
        ([15496, False], 1),
        ([1.0], 0),
        ([15496, 995.0], 1),
        ([np.True_], 0),
        ([torch.tensor(True)], 0),
        ([np.float64(3.0)], 0),
        (["3"], 0),
        ([None], 0),
    ],
)
def test_decode_refuses_ids_that_are_not_integers(gpt2, ids, position):
    with pytest.raises(TypeError, match=f"token id .* at position {position} is a"):
        gpt2.decode(ids)


@pytest.mark.parametrize("bad", [-1, 50257, 2**63, 2**64, 10**30, np.uint64(2**63)])
def test_decode_refuses_integers_outside_the_vocab(gpt2, bad):
    with pytest.raises(ValueError, match=f"unknown token id {int(bad)} at position 2"):
        gpt2.decode([15496, 995, bad])


def test_decode_accepts_integer_ids_of_every_kind(gpt2):
    expected = "Hello world"
    assert gpt2.decode([]) == "" and gpt2.decode_bytes([]) == b""
    assert gpt2.decode([np.int64(15496), torch.tensor(995)]) == expected
    assert (
        gpt2.decode(torch.tensor([15496, 995])) == gpt2.decode(np.array([15496, 995], np.uint16)) == expected
    )


# ---------------------------------------------------------------------------------------------------
# Numeric boundaries of the other entry points


def test_vocab_ids_must_fit_the_u32_ids_of_tiktoken_and_tokenizers():
    for bad in (-1, MAX_VOCAB_ID + 1, 2**64):
        with pytest.raises(ValueError, match=f"vocab id {bad} for b'ab' is outside"):
            Tokenizer({**BYTES, bad: b"ab"}, [])
    assert Tokenizer({**BYTES, MAX_VOCAB_ID: b"ab"}, [(b"a", b"b")]).vocab_size == MAX_VOCAB_ID + 1
    with pytest.raises(ValueError, match="no id is left for special token"):
        Tokenizer({**BYTES, MAX_VOCAB_ID: b"ab"}, [], [EOT])


def test_an_encoder_json_id_beyond_u32_names_the_file_and_line(tmp_path):
    tok = Tokenizer(*train_bpe("hello hello world\n" * 5, 260))
    folder = tok.save(tmp_path / "tok")
    encoder = (folder / "encoder.json").read_text(encoding="utf-8").replace(": 259", ": 4294967295")
    (folder / "encoder.json").write_text(encoder, encoding="utf-8")
    with pytest.raises(ValueError, match=r"encoder\.json, line \d+: token .* has id 4294967295; ids must be"):
        Tokenizer.load(folder)


def test_special_tokens_and_merges_must_not_be_empty():
    for bad in ("", 3, None):
        with pytest.raises(TypeError, match="every special token must be a non-empty str"):
            Tokenizer(BYTES, [], [bad])
    with pytest.raises(ValueError, match="has an empty part"):
        Tokenizer({**BYTES, 300: b""}, [(b"", b"a")])


def test_encode_pretoken_refuses_a_non_string(gpt2):
    assert gpt2.encode_pretoken("") == [] and gpt2.encode("") == [] and list(gpt2.encode_iterable([])) == []
    with pytest.raises(TypeError, match="encode_pretoken expects a str, got int"):
        gpt2.encode_pretoken(3)


@pytest.mark.parametrize("window", [0, -1, 2.5])
def test_a_window_of_less_than_one_character_is_refused(gpt2, window):
    tok = Tokenizer(gpt2.vocab, gpt2.merges)
    tok.LONG_PIECE_WINDOW_CHARS = window
    with pytest.raises(ValueError, match="LONG_PIECE_WINDOW_CHARS must be a positive int"):
        tok.encode("a" * 100)
    with pytest.raises(ValueError, match="LONG_PIECE_WINDOW_CHARS must be a positive int"):
        list(tok.encode_iterable(["a" * 100] * 3))


def test_count_pretokens_checks_the_number_of_workers():
    text = "hello world\n" * 50
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"num_workers={bad}: need at least 1"):
            count_pretokens(text, num_workers=bad)
    for bad in (2.5, True, "2"):
        with pytest.raises(TypeError, match="num_workers must be an int or None"):
            count_pretokens(text, num_workers=bad)
    # A huge count is capped at the CPUs instead of forking a process per line.
    assert count_pretokens(text, num_workers=10**6) == count_pretokens(text, num_workers=1)

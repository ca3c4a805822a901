"""Tests for llmbook.tokenizer: BPE training, GPT-2/tiktoken parity, streaming, files and exporters."""

import json
import random
import tracemalloc
from itertools import pairwise

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from llmbook import data
from llmbook.bpe import (
    GPT2_SPLIT_PATTERN,
    count_pretokens,
    pretokenize,
    split_on_special_tokens,
    train_bpe,
    train_bpe_slow,
)
from llmbook.tokenizer import Tokenizer, gpt2_tokenizer
from llmbook.tokenizer_files import bytes_to_unicode

EOT = "<|endoftext|>"

# Original sample text (written for these tests), mixing Chinese punctuation, digits and Latin words.
CHINESE = (
    "今天天气真好，我们去公园散步吧。\n"
    "分词器把一句话切成若干个词元，每个词元对应词表里的一个编号。\n"
    "字节级的方法不会遇到未知字符：任何文字最终都只是 UTF-8 字节，例如“模型”占 6 个字节。\n"
    "第 3 章会用到 2024 年的数据，价格是 ¥128.50。"
)
EMOJI = "I ❤️ tokenizers 🤗🤗! Family: 👩‍👩‍👧‍👦, flags: 🇨🇳🇺🇸, skin tone: 👍🏽. Café naïve résumé ½ ∑ ℕ"


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_gpt2() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding built offline from the same two files, as tiktoken's own loader does."""
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    encoder = json.loads(data.path("gpt2_encoder_json").read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[ch] for ch in token): i for token, i in encoder.items() if token != EOT}
    # tiktoken's loader also checks that merge order agrees with the ids: do the same here.
    merges = data.path("gpt2_vocab_bpe").read_text(encoding="utf-8").split("\n")[1:]
    merged_ids = [ranks[bytes(byte_of[c] for c in line.replace(" ", ""))] for line in merges if line]
    assert merged_ids == sorted(merged_ids) and merged_ids[0] == 256
    return tiktoken.Encoding(
        name="gpt2_offline", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256}
    )


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return data.load_text("tinyshakespeare")


@pytest.fixture(scope="module")
def trained(shakespeare) -> Tokenizer:
    vocab, merges = train_bpe(shakespeare[:200_000] + EOT + CHINESE, 1000, special_tokens=[EOT])
    return Tokenizer(vocab, merges, special_tokens=[EOT])


# ---------------------------------------------------------------------------------------------------
# Training


def test_train_bpe_toy_corpus_merges_by_count_then_greater_pair():
    # Pre-tokens: "ab" x1, " ab" x2, " ba" x1. Pair counts: (a,b)=3 wins; then (" ",ab)=2; then
    # (" ",b) and (b,a) tie at 1 and the greater pair of byte strings, (b"b", b"a"), wins.
    vocab, merges = train_bpe("ab ab ab ba", 259)
    assert merges == [(b"a", b"b"), (b" ", b"ab"), (b"b", b"a")]
    assert vocab[256] == b"ab" and vocab[257] == b" ab" and vocab[258] == b"ba"


def test_train_bpe_breaks_ties_by_lexicographically_greater_pair():
    # Every pair occurs once; the greatest (left, right) pair of byte strings is (b"y", b"z").
    _, merges = train_bpe("ab yz cd", 257)
    assert merges == [(b"y", b"z")]
    _, merges = train_bpe_slow("ab yz cd", 257)
    assert merges == [(b"y", b"z")]


def test_train_bpe_matches_slow_version(shakespeare):
    text = shakespeare[:25_000] + EOT + CHINESE + EOT + EMOJI
    fast = train_bpe(text, 500, special_tokens=[EOT])
    slow = train_bpe_slow(text, 500, special_tokens=[EOT])
    assert fast[1] == slow[1]
    assert fast[0] == slow[0]
    assert len(fast[0]) == 500


def test_train_bpe_tie_break_orders_a_prefix_before_its_extensions():
    # b"!" < b"!\x00" as byte strings, so on a tie the pair starting with b"!\x00" must win.
    text = "\x00\x00!!\x00 !\x00!"
    assert train_bpe(text, 270) == train_bpe_slow(text, 270)
    assert train_bpe(text, 270)[1][1] == (b"!\x00", b"!")


@settings(max_examples=150, deadline=None)
@given(
    text=st.lists(
        st.sampled_from(["!", "\x00", "?", " ", "a", "é", "今", "!\x00", "\x00\x00"]), max_size=40
    ).map("".join),
    n_merges=st.integers(0, 20),
)
def test_train_bpe_matches_slow_version_on_generated_corpora(text, n_merges):
    # Tiny alphabets force many ties, including between byte strings where one is a prefix of the other.
    assert train_bpe(text, 256 + n_merges) == train_bpe_slow(text, 256 + n_merges)


def test_train_bpe_vocab_starts_with_bytes_then_special_tokens():
    vocab, merges = train_bpe("hello hello", 260, special_tokens=[EOT, "<|pad|>"])
    assert [vocab[i] for i in range(256)] == [bytes([i]) for i in range(256)]
    assert vocab[256] == EOT.encode() and vocab[257] == b"<|pad|>"
    assert len(merges) == 2 and vocab[258] == merges[0][0] + merges[0][1]


def test_special_tokens_never_take_part_in_merges():
    text = "say<|endoftext|>hi " * 200
    vocab, merges = train_bpe(text, 300, special_tokens=[EOT])
    learned = [vocab[i] for i in range(257, len(vocab))]
    # Every stretch between markers becomes whole words, and nothing ever reaches across a marker.
    assert learned == [b"sa", b"say", b"hi", b" say"]
    assert not any(char in token for token in learned for char in (b"<", b"|", b">"))
    # Without declaring it special, the marker's characters are ordinary text and do get merged.
    plain_vocab, _ = train_bpe(text, 300)
    assert any(b"|>" in token for token in plain_vocab.values())


def test_merges_never_cross_pretoken_boundaries(shakespeare):
    vocab, _ = train_bpe(shakespeare[:100_000], 1200)
    for token in list(vocab.values())[256:]:
        text = token.decode("utf-8", errors="strict") if token.isascii() else None
        if text is not None:
            assert pretokenize(text) == [text], f"token {token!r} spans several pre-tokens"


def test_train_bpe_reads_a_path_like_a_string(tmp_path, shakespeare):
    file = tmp_path / "corpus.txt"
    file.write_text(shakespeare[:20_000], encoding="utf-8")
    assert train_bpe(file, 300) == train_bpe(str(file), 300) == train_bpe(shakespeare[:20_000], 300)


def test_train_bpe_rejects_vocab_smaller_than_bytes_plus_specials():
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe("hello", 256, special_tokens=[EOT])
    with pytest.raises(ValueError, match="vocab_size=10"):
        train_bpe_slow("hello", 10)
    vocab, merges = train_bpe("hello", 257, special_tokens=[EOT])
    assert merges == [] and len(vocab) == 257


def test_train_bpe_stops_when_nothing_is_left_to_merge():
    vocab, merges = train_bpe("aaaa", 1000)
    assert merges == [(b"a", b"a"), (b"aa", b"aa")] and len(vocab) == 258


def test_parallel_pretoken_counts_equal_serial(shakespeare):
    text = EOT.join([shakespeare[:60_000], CHINESE, shakespeare[60_000:150_000], EMOJI])
    serial = count_pretokens(text, [EOT], num_workers=1)
    parallel = count_pretokens(text, [EOT], num_workers=2)
    assert parallel == serial
    assert EOT not in serial and sum(serial.values()) > 30_000
    assert train_bpe(text, 400, [EOT], num_workers=2) == train_bpe(text, 400, [EOT], num_workers=1)


def test_train_bpe_shows_a_progress_bar_when_asked(capsys):
    train_bpe("hello world " * 20, 270, progress=True)
    assert "BPE merges" in capsys.readouterr().err
    train_bpe("hello world " * 20, 270)  # short input: no bar by default
    assert capsys.readouterr().err == ""


def test_split_on_special_tokens_prefers_the_longest():
    specials = ["<|a|>", "<|a|><|b|>"]
    pieces = split_on_special_tokens("x<|a|><|b|>y<|a|>", specials)
    assert pieces == [("x", False), ("<|a|><|b|>", True), ("y", False), ("<|a|>", True)]


# ---------------------------------------------------------------------------------------------------
# GPT-2 parity with tiktoken


def test_encode_matches_tiktoken_on_tiny_shakespeare(gpt2, tiktoken_gpt2, shakespeare):
    ids = gpt2.encode(shakespeare)
    assert ids == tiktoken_gpt2.encode(shakespeare)
    assert gpt2.decode(ids) == shakespeare


@pytest.mark.parametrize("name", ["tinystories", "chinese", "emoji", "endoftext"])
def test_encode_matches_tiktoken_on_samples(gpt2, tiktoken_gpt2, name):
    text = {
        "tinystories": data.load_text("tinystories_sample"),
        "chinese": CHINESE,
        "emoji": EMOJI,
        "endoftext": f"First.{EOT}Second{EOT}{EOT} third <|endoftext|x> {EOT}",
    }[name]
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.decode(ids) == text
    if name == "endoftext":
        assert ids.count(50256) == 4


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60) | st.text(alphabet=" \t\n\r'sdlvetmAa1٣你好🤗é\u00a0\u2028\u0301", max_size=40))
def test_encode_matches_tiktoken_on_generated_unicode(gpt2, tiktoken_gpt2, text):
    ids = gpt2.encode(text)
    assert ids == tiktoken_gpt2.encode(text, disallowed_special=())
    assert gpt2.decode(ids) == text


def test_gpt2_tokenizer_has_gpt2_sizes(gpt2):
    assert gpt2.vocab_size == 50257 and len(gpt2.merges) == 50000
    assert gpt2.special_tokens == {EOT: 50256}
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2_tokenizer() is gpt2  # loaded once, then shared
    assert gpt2_tokenizer(special_tokens=()).encode(EOT) == [27, 91, 437, 1659, 5239, 91, 29]


# ---------------------------------------------------------------------------------------------------
# Encoding and decoding


def test_encode_rejects_non_strings(gpt2):
    for bad in (b"bytes", 3, None, ["a"]):
        with pytest.raises(TypeError, match="expects a str"):
            gpt2.encode(bad)


def test_decode_replaces_invalid_utf8(gpt2):
    good = gpt2.encode("好")
    assert len(good) == 2  # GPT-2 spends two tokens on this 3-byte character
    assert gpt2.decode(good[:1]) == "\ufffd"
    assert gpt2.decode(good[1:] + gpt2.encode("!")) == "\ufffd!"
    assert gpt2.decode(good) == "好"


def test_decode_never_raises_on_valid_ids(gpt2):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(gpt2.vocab_size) for _ in range(rng.randrange(1, 8))]
        assert isinstance(gpt2.decode(ids), str)


def test_decode_names_an_unknown_id(gpt2):
    with pytest.raises(ValueError, match="unknown token id 50257 at position 1"):
        gpt2.decode([15496, 50257])
    with pytest.raises(ValueError, match="unknown token id -1"):
        gpt2.decode([-1])


def test_decode_accepts_integer_like_ids(gpt2):
    import numpy as np

    assert gpt2.decode(np.array([15496, 995])) == "Hello world"
    assert gpt2.decode(i for i in [15496, 995]) == "Hello world"
    with pytest.raises(TypeError, match="token id 995.5 at position 1 is a float"):
        gpt2.decode([15496, 995.5])


def test_overlapping_special_tokens_match_longest_first(trained):
    vocab, merges = trained.vocab, trained.merges
    tok = Tokenizer(vocab, merges, special_tokens=[EOT, EOT + EOT])
    long_id, short_id = tok.special_tokens[EOT + EOT], tok.special_tokens[EOT]
    assert long_id != short_id
    assert tok.encode(EOT * 3) == [long_id, short_id]
    assert tok.decode(tok.encode("a" + EOT * 3 + "b")) == "a" + EOT * 3 + "b"


def test_special_token_missing_from_vocab_gets_a_new_id(trained):
    tok = Tokenizer(trained.vocab, trained.merges, special_tokens=[EOT, "<|user|>"])
    assert tok.special_tokens["<|user|>"] == 1000
    assert tok.encode("hi<|user|>") == tok.encode("hi") + [1000]


def test_trained_tokenizer_round_trips_and_compresses(trained, shakespeare):
    text = shakespeare[300_000:340_000]
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert len(text.encode()) / len(ids) > 2.0  # bytes per token: merges must actually compress


# ---------------------------------------------------------------------------------------------------
# Streaming


def _chunked(text: str, cut_points: list[int]) -> list[str]:
    cuts = sorted({0, len(text), *(c % (len(text) + 1) for c in cut_points)})
    return [text[a:b] for a, b in pairwise(cuts)]


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(
        st.sampled_from(
            ["a", "b", " ", "  ", "\n", "'", "'l", "l", "s", "7", "!", "你", EOT, "<|end", "|>", EOT * 2]
        ),
        max_size=30,
    ).map("".join),
    cut_points=st.lists(st.integers(0, 400), max_size=12),
)
def test_encode_iterable_equals_encode_for_any_chunking(trained, text, cut_points):
    tok = Tokenizer(trained.vocab, trained.merges, special_tokens=[EOT, EOT * 2])
    tok.STREAM_CHUNK_CHARS = 1  # encode after every piece, so every cut point is a chunk boundary
    assert list(tok.encode_iterable(_chunked(text, cut_points))) == tok.encode(text)


def test_encode_iterable_matches_encode_on_a_file(gpt2, tmp_path):
    file = tmp_path / "stories.txt"
    file.write_text(data.load_text("tinystories_sample") * 3, encoding="utf-8")
    with open(file, encoding="utf-8") as handle:
        streamed = list(gpt2.encode_iterable(handle))
    assert streamed == gpt2.encode(file.read_text(encoding="utf-8"))


def _write_large_file(path, n_lines: int) -> int:
    rng = random.Random(0)
    words = ["the", "king", "queen", "said", "Romeo", "thou", "art", "42", "!", "you're", "ROMEO:", "你好"]
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n_lines):
            handle.write(" ".join(rng.choice(words) for _ in range(rng.randrange(1, 14))) + "\n")
    return path.stat().st_size


def _streaming_peak(tok: Tokenizer, path) -> tuple[int, int]:
    tok._cache.clear()
    tracemalloc.start()
    n_ids = 0
    with open(path, encoding="utf-8") as handle:
        for _ in tok.encode_iterable(handle):
            n_ids += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, n_ids


def test_encode_iterable_memory_does_not_grow_with_input(trained, tmp_path):
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small_size = _write_large_file(small, 2_000)
    large_size = _write_large_file(large, 20_000)
    assert large_size > 9 * small_size > 600_000
    small_peak, _ = _streaming_peak(trained, small)
    large_peak, n_ids = _streaming_peak(trained, large)
    # Merely holding the ids in a list would take 8 bytes per id (plus the int objects): > 3 MB here.
    assert n_ids > 300_000
    assert large_peak < 1024 * 1024, f"peak {large_peak} bytes while streaming a {large_size}-byte file"
    # Ten times the input, essentially the same peak: memory is bounded independently of the length.
    assert large_peak < 1.25 * small_peak + 64 * 1024, (small_peak, large_peak)


class _CountingSplit:
    """Wraps a compiled split pattern, counting the characters every findall scans."""

    def __init__(self, pattern):
        self.pattern, self.scanned = pattern, 0

    def findall(self, text):
        self.scanned += len(text)
        return self.pattern.findall(text)


def _whitespace_stream_work(tok: Tokenizer, n_chars: int, piece: str) -> tuple[int, int]:
    """(characters scanned or merged, ids) for streaming n_chars of whitespace in 1,000-character strings."""
    counting, merged = _CountingSplit(tok._split), []
    tok._split = counting
    encode_pretoken = tok.encode_pretoken
    tok.encode_pretoken = lambda pretoken: merged.append(len(pretoken)) or encode_pretoken(pretoken)
    try:
        chunk = piece * (1000 // len(piece))
        n_ids = sum(1 for _ in tok.encode_iterable(chunk for _ in range(n_chars // len(chunk))))
    finally:
        del tok._split, tok.encode_pretoken  # back to the class's / the instance's own
        tok._split = counting.pattern
    return counting.scanned + sum(merged), n_ids


@pytest.mark.parametrize("piece", ["\n", " ", "\n\n \t", "\u3000\n"])
def test_encode_iterable_work_on_whitespace_grows_linearly(gpt2, piece):
    tok = Tokenizer(gpt2.vocab, gpt2.merges, ["<|endoftext|>"])
    small, _ = _whitespace_stream_work(tok, 200_000, piece)
    large, _ = _whitespace_stream_work(tok, 800_000, piece)
    # Four times the input: four times the work (a carried run made it ~16 times, re-scanned per chunk).
    assert large < 4.4 * small, (small, large)


def _whitespace_streaming_peak(tok: Tokenizer, n_pieces: int) -> tuple[int, int]:
    text = "\n" * 1000
    tracemalloc.start()
    n_ids = sum(1 for _ in tok.encode_iterable(text for _ in range(n_pieces)))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, n_ids


def test_encode_iterable_streams_whitespace_under_a_memory_cap(gpt2):
    tok = Tokenizer(gpt2.vocab, gpt2.merges, ["<|endoftext|>"])
    small_peak, _ = _whitespace_streaming_peak(tok, 150)
    large_peak, n_ids = _whitespace_streaming_peak(tok, 600)
    assert n_ids == 300_000  # "\n\n" is one GPT-2 token
    # 600,000 newlines take 600 kB as text and 2.4 MB as a list of ids; streaming needs a fixed window
    # (a chunk, and one LONG_PIECE_WINDOW_CHARS window of the run merged open-ended), whatever the length.
    assert large_peak < 2 * 1024 * 1024, f"peak {large_peak} bytes while streaming 600,000 newlines"
    assert large_peak < small_peak + 64 * 1024, (small_peak, large_peak)


@settings(max_examples=20, deadline=None)
@given(
    runs=st.lists(
        st.tuples(st.sampled_from(["\n", " ", "\t", "\r\n", "\u3000", "\x85", " \n"]), st.integers(1, 3000)),
        min_size=1,
        max_size=4,
    ),
    between=st.sampled_from(["", "a", " b", "!", "你", "'s"]),
)
def test_encode_iterable_equals_encode_across_long_whitespace_runs(gpt2, runs, between):
    text = between.join(piece * count for piece, count in runs) + between
    tok = Tokenizer(gpt2.vocab, gpt2.merges, ["<|endoftext|>"])
    tok.STREAM_CHUNK_CHARS = 256  # cut long runs often
    pieces = [text[i : i + 1000] for i in range(0, len(text), 1000)]
    assert list(tok.encode_iterable(pieces)) == gpt2.encode(text)


# ---------------------------------------------------------------------------------------------------
# Files


def test_save_and_load_round_trip(trained, tmp_path, shakespeare):
    trained.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.vocab == trained.vocab and loaded.merges == trained.merges
    assert loaded.special_tokens == trained.special_tokens
    text = shakespeare[:5000] + EOT + CHINESE
    assert loaded.encode(text) == trained.encode(text)
    # The files are plain text in GPT-2's format: the space byte is written as "Ġ".
    assert (tmp_path / "tok" / "vocab.bpe").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    assert "Ġ" in (tmp_path / "tok" / "encoder.json").read_text(encoding="utf-8")


def test_malformed_merges_file_names_file_and_line(trained, tmp_path):
    folder = trained.save(tmp_path / "tok")
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    lines[3] = "onlyonetoken"
    (folder / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.bpe, line 4: expected two tokens"):
        Tokenizer.load(folder)
    lines[3] = "Ġq zzzzzzzz"
    (folder / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.bpe, line 4: merge .* not in the vocabulary"):
        Tokenizer.load(folder)


def test_malformed_vocabulary_file_names_file_and_line(trained, tmp_path):
    folder = trained.save(tmp_path / "tok")
    lines = (folder / "encoder.json").read_text(encoding="utf-8").split("\n")
    assert len(lines) > 900  # one entry per line, so errors can point at the line
    lines[2] = lines[2].replace(",", ";")
    (folder / "encoder.json").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"encoder\.json, line 3: not valid JSON"):
        Tokenizer.load(folder)
    (folder / "encoder.json").write_text(json.dumps({"a": 0, "b": "one"}, indent=1), encoding="utf-8")
    with pytest.raises(ValueError, match=r"encoder\.json, line 3: token 'b' has id 'one'"):
        Tokenizer.load(folder)


# ---------------------------------------------------------------------------------------------------
# Exporters


def test_trained_tokenizer_exports_agree_with_it(trained, shakespeare):
    hf = trained.to_hf()
    tt = trained.to_tiktoken()
    texts = [
        shakespeare[500_000:560_000],
        data.load_text("tinystories_sample"),
        CHINESE + EOT + EMOJI,
        "  leading spaces,\ttabs\n\n\nand   trailing   ",
    ]
    for text in texts:
        ours = trained.encode(text)
        assert tt.encode(text, allowed_special="all") == ours
        assert hf.encode(text).ids == ours
        assert hf.decode(ours, skip_special_tokens=False) == text


def test_gpt2_exports_match_reference(gpt2, tiktoken_gpt2, shakespeare):
    text = shakespeare[:100_000] + EOT + CHINESE + EMOJI + "  trailing spaces  \n\n"
    expected = tiktoken_gpt2.encode(text, allowed_special="all")
    assert gpt2.to_tiktoken().encode(text, allowed_special="all") == expected
    assert gpt2.to_hf().encode(text).ids == expected


# GPT-2's pattern with single digits (as SmolLM2 splits numbers): `\p{N}` instead of ` ?\p{N}+`.
DIGIT_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def test_a_custom_split_pattern_trains_encodes_and_survives_save_and_load(tmp_path):
    text = "In 2024 there were 365 days and 12 months; 2025 has 365 too.\n" * 40
    vocab, merges = train_bpe(text, 320, pattern=DIGIT_SPLIT_PATTERN)
    assert (vocab, merges) == train_bpe_slow(text, 320, pattern=DIGIT_SPLIT_PATTERN)
    assert not any(sum(chr(b).isdigit() for b in a + b_) > 1 for a, b_ in merges)  # digits never merge
    tok = Tokenizer(vocab, merges, ["<|endoftext|>"], pattern=DIGIT_SPLIT_PATTERN)
    sample = "In 2024<|endoftext|> 365 days"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample and tok.special_tokens["<|endoftext|>"] in ids
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    loaded = Tokenizer.load(tok.save(tmp_path / "digits"))
    assert loaded.pattern == DIGIT_SPLIT_PATTERN and loaded.encode(sample) == ids
    assert tok.to_tiktoken().encode(sample, allowed_special="all") == ids
    assert tok.to_hf().encode(sample).ids == ids


def test_a_tokenizer_directory_without_a_pattern_file_loads_with_gpt2s_pattern(tmp_path):
    tok = Tokenizer(*train_bpe("hello world, hello there\n" * 20, 270))
    directory = tok.save(tmp_path / "old")
    (directory / "split_pattern.txt").unlink()  # as written before the pattern was saved
    assert Tokenizer.load(directory).pattern == GPT2_SPLIT_PATTERN


def test_an_invalid_split_pattern_is_a_value_error():
    with pytest.raises(ValueError, match="not a valid regex"):
        Tokenizer(*train_bpe("abc abc\n", 257), pattern="(unclosed")

"""The BPE tokenizer: encode text to ids and back with a vocabulary, merges and special tokens.

`Tokenizer` applies the merges of `llmbook.bpe` by rank (`apply_merges`, or `apply_merges_heap` for long
pieces); the pre-tokenization pattern is a constructor argument (GPT-2's by default) saved and loaded
with it.
Files and exporters (GPT-2's files, `save`/`load`, tiktoken, Hugging Face) live in
`llmbook.tokenizer_files`; `gpt2_tokenizer()` is GPT-2's own tokenizer.
"""

from __future__ import annotations

import operator
import os
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from itertools import accumulate
from pathlib import Path

import regex

from llmbook import tokenizer_files
from llmbook.bpe import (
    GPT2_SPLIT_PATTERN,
    MergeRanks,
    apply_merges,
    apply_merges_heap,
    compile_pattern,
    special_pattern,
)
from llmbook.tokenizer_files import MAX_VOCAB_ID

RightParts = dict[int, tuple[list[int], list[bytes]]]
_CONTINUATION = tuple(bytes([byte]) for byte in range(0x80, 0xC0))  # UTF-8's 0b10xxxxxx bytes
_SURROGATE = regex.compile("[\ud800-\udfff]")
# The alternatives of GPT-2's split pattern (and of variants such as SmolLM2's single digits). In a
# pattern made only of these, a long letter, number, symbol or whitespace run can be cut anywhere but
# before an apostrophe and split again from the cut into the same pre-tokens (`_commit_long_piece`).
_RUN_ALTERNATIVES = frozenset(
    ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", r" ?\p{L}+", r" ?\p{N}+", r"\p{N}", r" ?[^\s\p{L}\p{N}]+"]
    + [r"\s+(?!\S)", r"\s+(?![^\s\p{N}])", r"\s+"]
)


class Tokenizer:
    """Encode text to ids and back with a byte-level BPE vocabulary, merges and special tokens."""

    # Distinct pre-tokens remembered by the encoder; bounded so memory does not grow with the input.
    CACHE_SIZE = 50_000
    # Longer pre-tokens are not remembered: they rarely repeat and would hold their text and ids.
    CACHE_MAX_PIECE_CHARS = 64
    # Pre-tokens of at least this many bytes are merged with a heap; shorter ones by rescanning, which
    # costs less on the few bytes of a typical word.
    HEAP_MIN_BYTES = 16
    # Characters `encode_iterable` gathers before encoding: large enough to amortise per-call overhead.
    STREAM_CHUNK_CHARS = 16_384
    # `encode_iterable` cuts an unfinished pre-token this long (without whitespace, or all whitespace)
    # after its final tokens, merging one window of this many characters at a time.
    LONG_PIECE_WINDOW_CHARS = 4_096
    _whitespace_run = regex.compile(r"\s*")

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Iterable[str] | None = None,
        pattern: str = GPT2_SPLIT_PATTERN,
        *,
        drop_unknown_bytes: bool = False,
    ):
        """``drop_unknown_bytes``: accept a vocab lacking some single bytes and drop those bytes when
        encoding, as transformers' BPE does without an unknown token (SmolLM2 has no token for byte 4)."""
        self.drop_unknown_bytes = drop_unknown_bytes
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a regex string, got {type(pattern).__name__}")
        self.pattern = pattern
        self._split = compile_pattern(pattern)
        self._set_vocab(vocab)
        self._set_special_tokens(special_tokens)
        self._set_merges(merges)
        self._cache: dict[str, list[int]] = {}
        self._cuts_long_pieces = set(pattern.split("|")) <= _RUN_ALTERNATIVES

    def _set_vocab(self, vocab: dict[int, bytes]) -> None:
        if not isinstance(vocab, dict):
            raise TypeError(f"vocab must be a dict[int, bytes], got {type(vocab).__name__}")
        self.vocab: dict[int, bytes] = {}
        for token_id, token in vocab.items():
            if not isinstance(token_id, int) or isinstance(token_id, bool) or not isinstance(token, bytes):
                raise TypeError(f"vocab must map int ids to bytes, found {token_id!r}: {token!r}")
            if not 0 <= token_id <= MAX_VOCAB_ID:
                raise ValueError(f"vocab id {token_id} for {token!r} is outside 0..{MAX_VOCAB_ID}")
            self.vocab[token_id] = token
        # Where two ids share the same bytes, the lower id is the one the encoder produces.
        self.token_to_id: dict[bytes, int] = {}
        for token_id in sorted(self.vocab):
            self.token_to_id.setdefault(self.vocab[token_id], token_id)
        missing = [b for b in range(256) if bytes([b]) not in self.token_to_id]
        if missing and not self.drop_unknown_bytes:
            raise ValueError(
                f"a byte-level vocab needs all 256 single bytes; missing e.g. byte {missing[0]} "
                "(pass drop_unknown_bytes=True to drop such bytes when encoding)"
            )
        self._byte_ids = [self.token_to_id.get(bytes([b])) for b in range(256)]

    def _set_special_tokens(self, special_tokens: Iterable[str] | None) -> None:
        if isinstance(special_tokens, str):
            raise TypeError(
                "special_tokens must be a list of strings, e.g. ['<|endoftext|>'], not one string"
            )
        self.special_tokens: dict[str, int] = {}
        for token in special_tokens or ():
            if not isinstance(token, str) or not token:
                raise TypeError(f"every special token must be a non-empty str, got {token!r}")
            encoded = token.encode("utf-8")
            if encoded not in self.token_to_id:  # a special token the vocab lacks gets the next free id
                new_id = max(self.vocab, default=-1) + 1
                if new_id > MAX_VOCAB_ID:
                    raise ValueError(f"no id is left for special token {token!r} after id {MAX_VOCAB_ID}")
                self.vocab[new_id] = encoded
                self.token_to_id[encoded] = new_id
            self.special_tokens[token] = self.token_to_id[encoded]
        self._special_split = special_pattern(list(self.special_tokens))
        self._vocab_size = max(self.vocab, default=-1) + 1

    def _set_merges(self, merges: Sequence[tuple[bytes, bytes]]) -> None:
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        self._merge_ranks: MergeRanks = {}
        for rank, (left, right) in enumerate(self.merges):
            if not left or not right:
                raise ValueError(f"merge {rank} ({left!r}, {right!r}) has an empty part")
            for part in (left, right, left + right):
                if part not in self.token_to_id:
                    raise ValueError(
                        f"merge {rank} ({left!r}, {right!r}) uses {part!r}, which is not in the vocab"
                    )
            pair = (self.token_to_id[left], self.token_to_id[right])
            self._merge_ranks.setdefault(pair, (rank, self.token_to_id[left + right]))
        self._right_parts = _right_parts_if_in_learned_order(self._merge_ranks, self.vocab)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id: the number of rows an embedding table needs."""
        return self._vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"special_tokens={list(self.special_tokens)})"
        )

    # -- encoding ------------------------------------------------------------------------------------

    def encode_pretoken(self, pretoken: str) -> list[int]:
        """Apply merges by rank to one pre-token: repeatedly merge the adjacent pair learned earliest.

        A long pre-token is merged a window at a time (`_commit_windows`), so the work space stays
        bounded; the ids are the same.
        """
        if not isinstance(pretoken, str):
            raise TypeError(f"encode_pretoken expects a str, got {type(pretoken).__name__}")
        ids: list[int] = []
        start = 0
        if len(pretoken) >= self.LONG_PIECE_WINDOW_CHARS:  # a window is followed by the piece's other bytes
            start = self._commit_windows(pretoken, 0, len(pretoken), frozenset(pretoken.encode("utf-8")), ids)
        rest = self._initial_ids(pretoken[start:].encode("utf-8"))
        if len(rest) < self.HEAP_MIN_BYTES:
            ids.extend(apply_merges(rest, self._merge_ranks))
        else:
            ids.extend(apply_merges_heap(rest, self._merge_ranks)[0])
        return ids

    def _initial_ids(self, data: bytes) -> list[int]:
        ids = [self._byte_ids[b] for b in data]
        if self.drop_unknown_bytes:
            ids = [token_id for token_id in ids if token_id is not None]
        return ids

    def _encode_pretokens(self, pretokens: Iterable[str], out: list[int]) -> None:
        cache = self._cache
        for pretoken in pretokens:
            ids = cache.get(pretoken)
            if ids is None:
                ids = self.encode_pretoken(pretoken)
                if len(pretoken) <= self.CACHE_MAX_PIECE_CHARS:
                    if len(cache) >= self.CACHE_SIZE:
                        cache.clear()
                    cache[pretoken] = ids
            out.extend(ids)

    def encode(self, text: str) -> list[int]:
        """Text -> token ids: split out special tokens, pre-tokenize the rest, merge each piece by rank.

        Surrogate code points (not encodable as UTF-8) are handled as tiktoken does: a surrogate pair
        becomes its character, a lone surrogate U+FFFD.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; decode bytes to str first")
        try:
            return self._encode_text(text)
        except UnicodeEncodeError:
            return self._encode_text(_replace_surrogates(text))

    def _encode_text(self, text: str) -> list[int]:
        out: list[int] = []
        if self._special_split is None:
            self._encode_pretokens(self._split.findall(text), out)
            return out
        for index, part in enumerate(self._special_split.split(text)):
            if index % 2:
                out.append(self.special_tokens[part])
            elif part:
                self._encode_pretokens(self._split.findall(part), out)
        return out

    def _pending_special_start(self, text: str) -> int:
        """Where a suffix of text could still grow into a special token (len(text) if nowhere)."""
        longest = max((len(s) for s in self.special_tokens), default=0)
        for start in range(max(0, len(text) - longest + 1), len(text)):
            tail = text[start:]
            if any(s.startswith(tail) and s != tail for s in self.special_tokens):
                return start
        return len(text)

    def _encode_stable_prefix(self, buffer: str) -> tuple[list[int], str]:
        """Encode the part of buffer that more text cannot change; return its ids and the rest."""
        ids: list[int] = []
        # Everything up to the last complete special token is final ...
        if self._special_split is not None:
            parts = self._special_split.split(buffer)
            if len(parts) > 1:
                # parts alternate text, special, ..., text. The last special may still grow into a
                # longer one with the text after it (overlapping specials): then hold it back too.
                pending = parts[-2] + parts[-1]
                if any(s.startswith(pending) and s != pending for s in self.special_tokens):
                    complete, buffer = parts[:-2], pending
                else:
                    complete, buffer = parts[:-1], parts[-1]
                for index, part in enumerate(complete):
                    if index % 2:
                        ids.append(self.special_tokens[part])
                    elif part:
                        self._encode_pretokens(self._split.findall(part), ids)
        # ... and so are the pre-tokens of the remaining text that end at least 3 characters before
        # the end of what has been read (or before a possible start of a special token).
        special_start = self._pending_special_start(buffer)
        stable_end = min(len(buffer), special_start) - 3
        pretokens = self._split.findall(buffer)
        end, n_stable = len(buffer), len(pretokens)
        while n_stable and end > stable_end:
            n_stable -= 1
            end -= len(pretokens[n_stable])
        self._encode_pretokens(pretokens[:n_stable], ids)
        if n_stable < len(pretokens) and len(buffer) - end >= self.LONG_PIECE_WINDOW_CHARS:
            end = self._commit_long_piece(buffer, end, end + len(pretokens[n_stable]), special_start, ids)
        return ids, buffer[end:]

    def _commit_long_piece(
        self, text: str, start: int, first_end: int, special_start: int, ids: list[int]
    ) -> int:
        """Commit the final tokens of the unfinished pre-token text[start:first_end], a window at a time;
        return where the carried rest starts.

        What has been read of the pre-token is known to start it, whatever follows: a letter, number or
        symbol run only grows, a whitespace run keeps at least all but its last character (and a special
        token could only end it earlier at `special_start`). The pre-token then restarts after the
        committed tokens: with GPT-2's alternatives, a run split again from any character but an
        apostrophe gives the rest of the same run.
        """
        if not self._cuts_long_pieces:
            return start  # exact but unbounded: the whole pre-token is carried until it ends
        run_end = self._whitespace_run.match(text, start).end()
        whitespace = run_end >= first_end
        known_end = min(run_end - 1 if whitespace else first_end, special_start)
        if known_end > start and _SURROGATE.match(text, known_end - 1):
            known_end -= 1  # a high surrogate waiting for its pair (see encode_iterable)
        return self._commit_windows(
            text, start, known_end, _space_bytes() if whitespace else _run_bytes(), ids
        )

    def _commit_windows(
        self, text: str, start: int, known_end: int, continuation: frozenset[int], ids: list[int]
    ) -> int:
        """Commit the final tokens of text[start:known_end], the start of a pre-token that may grow with
        bytes of `continuation`, one window at a time; return where the rest starts (less than a window
        before known_end, unless no token of a window was final)."""
        if self._right_parts is None:
            return start  # merges not in learned order: no token is known final before the end
        window = self.LONG_PIECE_WINDOW_CHARS
        if not isinstance(window, int) or window < 1:  # a negative slice end would reach past known_end
            raise ValueError(f"LONG_PIECE_WINDOW_CHARS must be a positive int, got {window!r}")
        while known_end - start >= window:
            committed = self._commit_window(text[start : start + window], continuation, ids)
            if not committed:
                break
            start += committed
        return start

    def _commit_window(self, known: str, continuation: frozenset[int], ids: list[int]) -> int:
        """Append the final tokens of `known`, the start of a pre-token that may grow with bytes of
        `continuation`; return how many characters they cover (`apply_merges_heap`, open-ended)."""
        text_bytes = known.encode("utf-8")
        kept = None  # merging sees only the bytes the vocab has: where they are in text_bytes
        if self.drop_unknown_bytes:
            kept = [at for at, byte in enumerate(text_bytes) if self._byte_ids[byte] is not None]
        data = text_bytes if kept is None else bytes(text_bytes[at] for at in kept)
        piece_ids, n_final = apply_merges_heap(
            self._initial_ids(text_bytes), self._merge_ranks, self._open_merge_rank(data, continuation)
        )
        ends = list(accumulate(len(self.vocab[token_id]) for token_id in piece_ids[:n_final]))
        if kept is not None:
            ends = [kept[end - 1] + 1 for end in ends]
        # Cut after a token that ends on a character boundary (a UTF-8 continuation byte is 0b10xxxxxx)
        # and before any character but an apostrophe, which could start a contraction.
        while n_final and text_bytes[ends[n_final - 1] : ends[n_final - 1] + 1] in (b"'", *_CONTINUATION):
            n_final -= 1
        if not n_final:
            return 0
        ids.extend(piece_ids[:n_final])
        return len(text_bytes[: ends[n_final - 1]].decode("utf-8"))

    def _open_merge_rank(self, data: bytes, continuation: frozenset[int]):
        """For `apply_merges_heap`: the first rank >= after_rank of a merge (token, right part) whose right
        part could begin where the token ends: it agrees with the bytes of `data` there, and any bytes
        past the end of `data` are of the `continuation` the pre-token can grow with."""
        vocab, right_parts = self.vocab, self._right_parts

        def open_merge_rank(node: int, token: int, after_rank: int) -> int | None:
            ranks, parts = right_parts.get(token, ((), ()))
            end = node + len(vocab[token])
            rest = len(data) - end
            for at in range(bisect_left(ranks, after_rank), len(ranks)):
                part = parts[at]
                if (
                    data.startswith(part, end)
                    if len(part) <= rest
                    else (part.startswith(data[end:]) and continuation.issuperset(part[rest:]))
                ):
                    return ranks[at]
            return None

        return open_merge_rank

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. a file's lines) to the ids `encode` gives their join.

        Text is gathered into chunks of `STREAM_CHUNK_CHARS`, and each chunk's ids are yielded before the
        next is read. Only the unfinished tail is carried over: pre-tokens ending at least 3 characters
        before the end of what has been read cannot change when more text arrives (no alternative of the
        pattern looks further ahead than that, beyond the run it matches). A long unfinished pre-token
        (a run without whitespace, or of whitespace) is cut after its final tokens (`_commit_long_piece`),
        so memory stays bounded by the chunk size plus the longest string in the stream plus the
        uncertain end of that pre-token: the tokens that could still merge with text not yet read. That
        end is a few tokens on real text and bounded by the vocabulary (each merge rank moves it at most
        one token), never by the stream's length. With a split pattern not made of GPT-2's alternatives,
        or merges not in learned order, a long pre-token is carried whole: still exact, but its memory
        grows with it.
        """
        buffer, pending, pending_chars = "", [], 0
        for text in iterable:
            if not isinstance(text, str):
                raise TypeError(f"encode_iterable expects strings, got {type(text).__name__}")
            pending.append(text)
            pending_chars += len(text)
            if pending_chars >= self.STREAM_CHUNK_CHARS:
                text = buffer + "".join(pending)
                if _SURROGATE.search(text):  # as `encode` does, but a final high surrogate may yet pair
                    held = 1 if "\ud800" <= text[-1] <= "\udbff" else 0
                    text = _replace_surrogates(text[: len(text) - held]) + text[len(text) - held :]
                ids, buffer = self._encode_stable_prefix(text)
                pending, pending_chars = [], 0
                yield from ids
        yield from self.encode(buffer + "".join(pending))

    # -- decoding ------------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Token ids -> the raw bytes they stand for.

        An id that is not an integer (a bool, a float such as 3.0, a string) raises TypeError, an
        integer outside the vocab ValueError; both name the id and its position.
        """
        vocab = self.vocab
        if not isinstance(ids, list | tuple):
            ids = list(ids)  # a generator could not be read twice
        # Plain ints take the fast path; True and 3.0 would find vocab[1] and vocab[3] there, so any
        # other type (numpy integers, 0-d tensors, and the wrong types) goes one by one.
        if set(map(type, ids)) <= {int}:
            try:
                return b"".join([vocab[token_id] for token_id in ids])
            except KeyError:
                pass  # an unknown id: find and name it below
        return b"".join([self._token_bytes(token_id, position) for position, token_id in enumerate(ids)])

    def _token_bytes(self, token_id, position: int) -> bytes:
        kind = type(token_id).__name__
        # numpy.bool_ and a bool tensor are no Python bools, but convert to 0 and 1 all the same.
        if isinstance(token_id, bool) or "bool" in kind or "bool" in str(getattr(token_id, "dtype", "")):
            raise TypeError(f"token id {token_id!r} at position {position} is a bool, not an int")
        try:
            index = operator.index(token_id)
        except TypeError:
            raise TypeError(f"token id {token_id!r} at position {position} is a {kind}, not an int") from None
        if index not in self.vocab:
            raise ValueError(
                f"unknown token id {index} at position {position}; valid ids are in the vocab "
                f"(0..{self.vocab_size - 1})"
            )
        return self.vocab[index]

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text; byte sequences that are not valid UTF-8 become U+FFFD, never an exception."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- files and exporters (llmbook.tokenizer_files) -----------------------------------------------

    @classmethod
    def from_gpt2_files(
        cls,
        vocab_bpe: str | os.PathLike,
        encoder_json: str | os.PathLike,
        special_tokens: Iterable[str] | None = None,
        pattern: str = GPT2_SPLIT_PATTERN,
    ) -> Tokenizer:
        """Load GPT-2-format files (vocab.bpe merges, encoder.json ids).

        `special_tokens=None` means GPT-2's own: ``<|endoftext|>`` if the vocabulary has it; pass ``()``
        for none.
        """
        vocab, merges, specials = tokenizer_files.read_gpt2_files(vocab_bpe, encoder_json, special_tokens)
        return cls(vocab, merges, specials, pattern)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer into directory (the format is in `llmbook.tokenizer_files`)."""
        return tokenizer_files.save(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer written by `save`."""
        directory = Path(directory)
        specials, pattern = tokenizer_files.read_directory(directory)
        return cls.from_gpt2_files(directory / "vocab.bpe", directory / "encoder.json", specials, pattern)

    def to_tiktoken(self, name: str = "llmbook"):
        """The same tokenizer as a `tiktoken.Encoding` (see `llmbook.tokenizer_files.to_tiktoken`)."""
        return tokenizer_files.to_tiktoken(self, name)

    def to_hf(self):
        """The same tokenizer as a Hugging Face `tokenizers.Tokenizer` (BPE model, byte-level)."""
        return tokenizer_files.to_hf(self)


def _replace_surrogates(text: str) -> str:
    """Surrogate pairs joined into their characters, lone surrogates replaced by U+FFFD, as tiktoken does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _right_parts_if_in_learned_order(ranks: MergeRanks, vocab: dict[int, bytes]) -> RightParts | None:
    """Token id -> (ranks, right parts) of the merges it is the left part of, by rank; None unless every
    merge comes after every merge that makes one of its parts (true of trained BPE), which the
    open-ended merging of `apply_merges_heap` relies on."""
    last_made: dict[int, int] = {}
    for rank, merged in ranks.values():
        last_made[merged] = max(rank, last_made.get(merged, -1))
    by_left: dict[int, list[tuple[int, bytes]]] = {}
    for (left, right), (rank, _) in ranks.items():
        if last_made.get(left, -1) >= rank or last_made.get(right, -1) >= rank:
            return None
        by_left.setdefault(left, []).append((rank, vocab[right]))
    return {
        left: ([rank for rank, _ in parts], [part for _, part in parts])
        for left, parts in ((left, sorted(parts)) for left, parts in by_left.items())
    }


@lru_cache(maxsize=1)
def _space_bytes() -> frozenset[int]:
    """Every byte of the UTF-8 encoding of a character that the split pattern's \\s matches."""
    spaces = regex.findall(r"\s", "".join(map(chr, range(0x3001))))  # the last \s is U+3000
    return frozenset("".join(spaces).encode("utf-8"))


@lru_cache(maxsize=1)
def _run_bytes() -> frozenset[int]:
    """Every byte that can continue a run that is not whitespace: all but the ASCII characters of \\s."""
    return frozenset(range(256)) - {byte for byte in range(128) if regex.match(r"\s", chr(byte))}


def gpt2_tokenizer(special_tokens: Iterable[str] | None = None) -> Tokenizer:
    """GPT-2's tokenizer, from the vocab.bpe and encoder.json that `llmbook.data` provides.

    Loading takes a noticeable fraction of a second, so the result is cached and shared between callers.
    """
    return _load_gpt2(None if special_tokens is None else tuple(special_tokens))


@lru_cache(maxsize=4)
def _load_gpt2(special_tokens: tuple[str, ...] | None) -> Tokenizer:
    from llmbook import data

    return Tokenizer.from_gpt2_files(
        data.path("gpt2_vocab_bpe"), data.path("gpt2_encoder_json"), special_tokens
    )

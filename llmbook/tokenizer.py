"""The BPE tokenizer: encode text to ids and back with a vocabulary, merges and special tokens.

`Tokenizer` applies the merges of `llmbook.bpe` by rank with the trainers' `merge_pair`; the
pre-tokenization pattern is a constructor argument (GPT-2's by default) saved and loaded with it.
Files and exporters (GPT-2's files, `save`/`load`, tiktoken, Hugging Face) live in
`llmbook.tokenizer_files`; `gpt2_tokenizer()` is GPT-2's own tokenizer.
"""

from __future__ import annotations

import operator
import os
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from itertools import accumulate, pairwise
from pathlib import Path

import regex

from llmbook import tokenizer_files
from llmbook.bpe import GPT2_SPLIT_PATTERN, compile_pattern, merge_pair, special_pattern


class Tokenizer:
    """Encode text to ids and back with a byte-level BPE vocabulary, merges and special tokens."""

    # Distinct pre-tokens remembered by the encoder; bounded so memory does not grow with the input.
    CACHE_SIZE = 50_000
    # Characters `encode_iterable` gathers before encoding: large enough to amortise per-call overhead.
    STREAM_CHUNK_CHARS = 16_384
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
        self._run_lookahead = _whitespace_run_lookahead(self)

    def _set_vocab(self, vocab: dict[int, bytes]) -> None:
        if not isinstance(vocab, dict):
            raise TypeError(f"vocab must be a dict[int, bytes], got {type(vocab).__name__}")
        self.vocab: dict[int, bytes] = {}
        for token_id, token in vocab.items():
            if not isinstance(token_id, int) or not isinstance(token, bytes):
                raise TypeError(f"vocab must map int ids to bytes, found {token_id!r}: {token!r}")
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
            encoded = token.encode("utf-8")
            if encoded not in self.token_to_id:  # a special token the vocab lacks gets the next free id
                new_id = max(self.vocab) + 1
                self.vocab[new_id] = encoded
                self.token_to_id[encoded] = new_id
            self.special_tokens[token] = self.token_to_id[encoded]
        self._special_split = special_pattern(list(self.special_tokens))
        self._vocab_size = max(self.vocab) + 1

    def _set_merges(self, merges: Sequence[tuple[bytes, bytes]]) -> None:
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        # (left id, right id) -> (rank, merged id): the whole of what encoding needs.
        self._merge_ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (left, right) in enumerate(self.merges):
            for part in (left, right, left + right):
                if part not in self.token_to_id:
                    raise ValueError(
                        f"merge {rank} ({left!r}, {right!r}) uses {part!r}, which is not in the vocab"
                    )
            pair = (self.token_to_id[left], self.token_to_id[right])
            self._merge_ranks.setdefault(pair, (rank, self.token_to_id[left + right]))

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
        """Apply merges by rank to one pre-token: repeatedly merge the adjacent pair learned earliest."""
        ids = [self._byte_ids[b] for b in pretoken.encode("utf-8")]
        if self.drop_unknown_bytes:
            ids = [token_id for token_id in ids if token_id is not None]
        ranks = self._merge_ranks
        while len(ids) > 1:
            # The adjacent pair learned earliest. Only the minimum is needed, not how often each pair
            # occurs, so one scan replaces count_pairs here (a Counter per step made encoding ~1.8x slower).
            best_rank, best = None, None
            for pair in pairwise(ids):
                found = ranks.get(pair)
                if found is not None and (best_rank is None or found[0] < best_rank):
                    best_rank, best = found[0], pair
            if best is None:
                break
            ids = merge_pair(ids, best, ranks[best][1])
        return ids

    def _encode_pretokens(self, pretokens: Iterable[str], out: list[int]) -> None:
        cache = self._cache
        for pretoken in pretokens:
            ids = cache.get(pretoken)
            if ids is None:
                ids = self.encode_pretoken(pretoken)
                if len(cache) >= self.CACHE_SIZE:
                    cache.clear()
                cache[pretoken] = ids
            out.extend(ids)

    def encode(self, text: str) -> list[int]:
        """Text -> token ids: split out special tokens, pre-tokenize the rest, merge each piece by rank."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}; decode bytes to str first")
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
        stable_end = min(len(buffer), self._pending_special_start(buffer)) - 3
        pretokens = self._split.findall(buffer)
        end, n_stable = len(buffer), len(pretokens)
        while n_stable and end > stable_end:
            n_stable -= 1
            end -= len(pretokens[n_stable])
        self._encode_pretokens(pretokens[:n_stable], ids)
        return ids, self._encode_run_prefix(buffer[end:], ids)

    def _encode_run_prefix(self, tail: str, ids: list[int]) -> str:
        """Commit the start of a long whitespace run that opens `tail`; return what is left to carry.

        A whitespace run is one pre-token however long, so without this a stream of newlines would be
        carried (and re-scanned) whole. The run's pre-token is at least the run minus its last
        character, and BPE decides a token from a bounded stretch after it (`_whitespace_run_lookahead`),
        so tokens ending that far before the run's end are final and the pre-token may restart there.
        """
        if self._run_lookahead is None:
            return tail
        run = self._whitespace_run.match(tail).end()
        known = tail[: max(0, run - 1)].encode("utf-8")  # a prefix of the run's pre-token, whatever follows
        limit = len(known) - self._run_lookahead
        if limit < self.STREAM_CHUNK_CHARS:  # not worth it yet: the carry is already bounded
            return tail
        run_ids = self.encode_pretoken(known.decode("utf-8"))
        ends = list(accumulate(len(self.vocab[token_id]) for token_id in run_ids))
        n_final = bisect_right(ends, limit)
        # Cut where a token ends on a character boundary (a UTF-8 continuation byte is 0b10xxxxxx).
        while n_final and ends[n_final - 1] < len(known) and known[ends[n_final - 1]] & 0xC0 == 0x80:
            n_final -= 1
        if not n_final:
            return tail
        ids.extend(run_ids[:n_final])
        return tail[len(known[: ends[n_final - 1]].decode("utf-8")) :]

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. a file's lines) to the ids `encode` gives their join.

        Memory stays bounded by `STREAM_CHUNK_CHARS` plus the longest string in the stream, whatever the
        stream's length: text is gathered into chunks of that size, and each chunk's ids are yielded before
        the next is read. Only the unfinished tail is carried over: pre-tokens ending at least 3
        characters before the end of what has been read cannot change when more text arrives (no
        alternative of the pattern looks further ahead than that, beyond the run it matches). A long
        whitespace run is itself cut where its tokens are final (`_encode_run_prefix`); with a custom
        pattern it is carried whole, which stays exact but costs memory in proportion to the run.
        """
        buffer, pending, pending_chars = "", [], 0
        for text in iterable:
            if not isinstance(text, str):
                raise TypeError(f"encode_iterable expects strings, got {type(text).__name__}")
            pending.append(text)
            pending_chars += len(text)
            if pending_chars >= self.STREAM_CHUNK_CHARS:
                ids, buffer = self._encode_stable_prefix(buffer + "".join(pending))
                pending, pending_chars = [], 0
                yield from ids
        yield from self.encode(buffer + "".join(pending))

    # -- decoding ------------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Token ids -> the raw bytes they stand for; an id outside the vocab raises ValueError."""
        vocab = self.vocab
        if not isinstance(ids, list | tuple):
            ids = list(ids)  # a generator could not be read twice
        try:
            return b"".join([vocab[token_id] for token_id in ids])
        except (KeyError, TypeError):
            pass  # an unknown id, or ids such as 0-d tensors that need converting: go one by one
        pieces = []
        for position, token_id in enumerate(ids):
            try:
                pieces.append(vocab[operator.index(token_id)])
            except (KeyError, TypeError):
                raise ValueError(
                    f"unknown token id {token_id!r} at position {position}; valid ids are in the vocab "
                    f"(0..{self.vocab_size - 1})"
                ) from None
        return b"".join(pieces)

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


@lru_cache(maxsize=1)
def _space_bytes() -> frozenset[int]:
    """Every byte of the UTF-8 encoding of a character that the split pattern's \\s matches."""
    spaces = regex.findall(r"\s", "".join(map(chr, range(0x3001))))  # the last \s is U+3000
    return frozenset("".join(spaces).encode("utf-8"))


def _whitespace_run_lookahead(tokenizer: Tokenizer) -> int | None:
    """How many bytes after a token of a whitespace pre-token can still change it; None if unbounded.

    Only merges of whitespace bytes act on a whitespace pre-token. When each of them comes after every
    merge that makes one of its parts (true of trained BPE), encoding applies them in rank order, each
    a left-to-right pass looking one token ahead; so S such merges, of tokens at most L bytes long,
    make a token final once S·L bytes follow it. Needs GPT-2's pattern, whose whitespace alternatives
    end a run's pre-token at the same place wherever in the run matching starts, and no special token
    that starts with whitespace (it could begin inside the run).
    """
    if tokenizer.pattern != GPT2_SPLIT_PATTERN:
        return None
    if any(tokenizer._whitespace_run.match(special).end() for special in tokenizer.special_tokens):
        return None
    space_bytes = _space_bytes()
    space_merges = [
        (rank, left, right)
        for rank, (left, right) in enumerate(tokenizer.merges)
        if set(left + right) <= space_bytes
    ]
    last_made: dict[bytes, int] = {}
    for rank, left, right in space_merges:
        last_made[left + right] = rank
    for rank, left, right in space_merges:
        if last_made.get(left, -1) >= rank or last_made.get(right, -1) >= rank:
            return None
    longest = max((len(left + right) for _, left, right in space_merges), default=1)
    return len(space_merges) * longest


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

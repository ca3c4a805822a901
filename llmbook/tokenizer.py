"""Byte-level BPE, as in GPT-2: train merges on a corpus, encode text to ids, decode ids to text.

Reading order follows the data: pre-tokenization (the GPT-2 split pattern and special tokens), then
training (`train_bpe_slow`, the plain algorithm; `train_bpe`, the same merges computed incrementally),
then the `Tokenizer` that applies merges by rank, and finally file formats and exporters to `tiktoken`
and Hugging Face `tokenizers`.

Vocabulary layout of a trained tokenizer: ids 0..255 are the single bytes, then the special tokens in
the order given, then one id per merge in the order the merges were learned.

File format written by `Tokenizer.save(dir)` (the same two files GPT-2 ships, plus one):
- ``encoder.json``: a JSON object mapping each token, written with GPT-2's byte-to-unicode alphabet
  (`bytes_to_unicode`, so the space byte is ``Ġ``), to its id;
- ``vocab.bpe``: a ``#version: 0.2`` header line, then one merge per line, ``left right`` in the same
  alphabet, in rank order;
- ``special_tokens.json``: a JSON list of the special tokens as plain strings.
No pickle anywhere; a malformed file raises `ValueError` naming the file and the line.
"""

from __future__ import annotations

import heapq
import json
import multiprocessing
import operator
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import regex

# The pre-tokenization pattern of GPT-2's encoder.py: contractions, letter runs, digit runs and runs of
# other symbols (each may take one leading space), then whitespace. BPE merges never cross these pieces.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

_GPT2_SPLIT = regex.compile(GPT2_SPLIT_PATTERN)

# Inputs shorter than this are pre-tokenized in-process: forking workers costs more than it saves.
PARALLEL_MIN_CHARS = 4_000_000


# ----------------------------------------------------------------------------------------------------
# Pre-tokenization


def _special_pattern(special_tokens: Sequence[str]) -> regex.Pattern | None:
    """A pattern matching any special token, longest first, so overlapping specials resolve greedily."""
    if not special_tokens:
        return None
    ordered = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    return regex.compile("(" + "|".join(regex.escape(s) for s in ordered) + ")")


def split_on_special_tokens(text: str, special_tokens: Sequence[str]) -> list[tuple[str, bool]]:
    """Cut text into (piece, is_special) runs; special tokens come out whole, longest match first."""
    pattern = _special_pattern(special_tokens)
    if pattern is None:
        return [(text, False)] if text else []
    parts = pattern.split(text)
    # regex.split with one capture group alternates: text, special, text, special, ..., text.
    return [(part, index % 2 == 1) for index, part in enumerate(parts) if part]


def pretokenize(text: str) -> list[str]:
    """Split ordinary text (no special tokens) into GPT-2 pre-tokens; their concatenation is `text`."""
    return _GPT2_SPLIT.findall(text)


def _count_pretokens_serial(texts: Sequence[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_GPT2_SPLIT.findall(text))
    return counts


# A newline between two non-space characters: the newline is a pre-token of its own whichever side of a
# cut just after it we look from, and no alternative of the split pattern looks further back, so cutting
# there never changes the pre-tokens.
_SAFE_CUT = regex.compile(r"(?<=\S\n)(?=\S)")


def _safe_cuts(text: str, target_size: int) -> list[str]:
    """Cut special-free text into pieces of about target_size at points no pre-token straddles."""
    pieces, start = [], 0
    while len(text) - start > target_size:
        found = _SAFE_CUT.search(text, start + target_size)
        if found is None:
            break
        pieces.append(text[start : found.start()])
        start = found.start()
    pieces.append(text[start:])
    return pieces


def count_pretokens(
    text: str, special_tokens: Sequence[str] = (), num_workers: int | None = None
) -> Counter[str]:
    """Count GPT-2 pre-tokens in text, after removing special tokens; in parallel for long inputs.

    The text is cut at special tokens (and, inside long stretches without any, at safe newlines), and the
    chunks are counted by `num_workers` processes (default: one per CPU, and one for short inputs).
    """
    chunks = [part for part, is_special in split_on_special_tokens(text, special_tokens) if not is_special]
    if num_workers is None:
        num_workers = 1 if len(text) < PARALLEL_MIN_CHARS else min(os.cpu_count() or 1, 8)
    if num_workers <= 1:
        return _count_pretokens_serial(chunks)
    target = max(1, len(text) // (4 * num_workers))
    pieces = [piece for chunk in chunks for piece in _safe_cuts(chunk, target)]
    # Group pieces into about 4 batches per worker so each task is big enough to amortise pickling.
    batches: list[list[str]] = [[] for _ in range(min(len(pieces), 4 * num_workers))]
    for index, piece in enumerate(pieces):
        batches[index % len(batches)].append(piece)
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    )
    with context.Pool(num_workers) as pool:
        partial_counts = pool.map(_count_pretokens_serial, batches)
    total: Counter[str] = Counter()
    for counts in partial_counts:
        total.update(counts)
    return total


# ----------------------------------------------------------------------------------------------------
# The two operations BPE is made of


def count_pairs(symbols: Sequence) -> Counter:
    """How often each adjacent pair occurs in a sequence of symbols (ids or byte strings)."""
    return Counter(pairwise(symbols))


def merge_pair(symbols: Sequence, pair: tuple, new_symbol) -> list:
    """Replace every occurrence of `pair`, scanning left to right without overlaps, by `new_symbol`."""
    first, second = pair
    merged, i, n = [], 0, len(symbols)
    while i < n:
        if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
            merged.append(new_symbol)
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


# ----------------------------------------------------------------------------------------------------
# Training


def _read_input(input: str | os.PathLike) -> str:
    """A path (Path, or a str naming an existing file) is read as UTF-8; any other str is the text itself."""
    if isinstance(input, os.PathLike):
        return Path(input).read_text(encoding="utf-8")
    if not isinstance(input, str):
        raise TypeError(f"train_bpe input must be a str (text or path) or a Path, got {type(input).__name__}")
    if len(input) < 4096 and "\n" not in input and os.path.isfile(input):
        return Path(input).read_text(encoding="utf-8")
    return input


def _check_training_args(vocab_size: int, special_tokens: Sequence[str]) -> list[str]:
    if isinstance(special_tokens, str):
        raise TypeError(
            "special_tokens must be a sequence of strings, e.g. ['<|endoftext|>'], not one string"
        )
    specials = list(dict.fromkeys(special_tokens))
    for token in specials:
        if not isinstance(token, str) or not token:
            raise TypeError(f"every special token must be a non-empty str, got {token!r}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < 256 + len(specials):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the 256 single bytes and {len(specials)} special "
            f"token(s) need at least {256 + len(specials)} ids"
        )
    return specials


def _initial_vocab(specials: Sequence[str]) -> dict[int, bytes]:
    vocab = {index: bytes([index]) for index in range(256)}
    for token in specials:
        vocab[len(vocab)] = token.encode("utf-8")
    return vocab


def train_bpe_slow(
    input: str | os.PathLike, vocab_size: int, special_tokens: Sequence[str] = ()
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Byte-level BPE, the plain way: recount every adjacent pair after every merge (for teaching)."""
    specials = _check_training_args(vocab_size, special_tokens)
    text = _read_input(input)
    vocab = _initial_vocab(specials)
    # Each distinct pre-token is a tuple of byte strings, weighted by how often it occurs.
    words = {
        tuple(bytes([b]) for b in pretoken.encode("utf-8")): count
        for pretoken, count in count_pretokens(text, specials, num_workers=1).items()
    }
    merges: list[tuple[bytes, bytes]] = []
    while len(vocab) < vocab_size:
        pair_counts: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pair_counts[pair] += count
        if not pair_counts:
            break
        # Most frequent pair; among equals the lexicographically greater (left, right) pair wins.
        best = max(pair_counts, key=lambda pair: (pair_counts[pair], pair))
        merged = best[0] + best[1]
        new_words: dict[tuple[bytes, ...], int] = {}
        for word, count in words.items():
            new_word = tuple(merge_pair(word, best, merged))
            new_words[new_word] = new_words.get(new_word, 0) + count
        words = new_words
        merges.append(best)
        vocab[len(vocab)] = merged
    return vocab, merges


# Python's heap pops the smallest entry, but ties must go to the *greatest* pair of byte strings. So each
# token gets a sort key that reverses byte order: byte x becomes character 256 - x, and a terminator 257,
# above every byte's character, makes a prefix sort after its extensions (b"a" < b"a\x00" must flip too).
_REVERSED_BYTE = {byte: chr(256 - byte) for byte in range(256)}
_KEY_END = chr(257)


def _descending_key(token: bytes) -> str:
    return token.decode("latin-1").translate(_REVERSED_BYTE) + _KEY_END


def train_bpe(
    input: str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    *,
    num_workers: int | None = None,
    progress: bool | None = None,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Byte-level BPE with incremental pair counts and a heap; returns (vocab id -> bytes, merges in order).

    `input` is text or a path (see `_read_input`). Merges are those of `train_bpe_slow`: the most
    frequent adjacent pair wins, ties go to the lexicographically greater pair of byte strings.
    `progress` shows a tqdm bar (default: only for inputs over 10 MB).
    """
    specials = _check_training_args(vocab_size, special_tokens)
    text = _read_input(input)
    if progress is None:
        progress = len(text) > 10_000_000
    vocab = _initial_vocab(specials)
    pretoken_counts = count_pretokens(text, specials, num_workers)
    del text

    words: list[list[int]] = [list(pretoken.encode("utf-8")) for pretoken in pretoken_counts]
    counts: list[int] = list(pretoken_counts.values())
    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    # Which words contain each pair (may list words that lost the pair since; they are skipped).
    pair_words: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for index, (word, count) in enumerate(zip(words, counts, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] += count
            pair_words[pair].add(index)

    sort_keys = {index: _descending_key(token) for index, token in vocab.items()}

    def heap_entry(pair: tuple[int, int], count: int):
        return (-count, sort_keys[pair[0]], sort_keys[pair[1]], pair)

    # A lazy max-heap: stale entries (whose count no longer matches) are dropped when they surface.
    heap = [heap_entry(pair, count) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    n_merges = vocab_size - len(vocab)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_merges, desc="BPE merges", unit="merge")
    for _ in range(n_merges):
        while heap and pair_counts.get(heap[0][3], 0) != -heap[0][0]:
            heapq.heappop(heap)
        if not heap:
            break  # every word is a single token: nothing left to merge
        left, right = best = heapq.heappop(heap)[3]
        new_id = len(vocab)
        vocab[new_id] = vocab[left] + vocab[right]
        sort_keys[new_id] = _descending_key(vocab[new_id])
        merges.append((vocab[left], vocab[right]))

        touched: set[tuple[int, int]] = set()
        for index in pair_words.pop(best):
            word = words[index]
            merged = merge_pair(word, best, new_id)
            if len(merged) == len(word):
                continue
            # Update counts by difference: remove the word's old pairs, add its new ones.
            count = counts[index]
            for pair in pairwise(word):
                pair_counts[pair] -= count
                touched.add(pair)
            for pair in pairwise(merged):
                pair_counts[pair] += count
                touched.add(pair)
                if new_id in pair:  # every other pair of the merged word was already in the old one
                    pair_words[pair].add(index)
            words[index] = merged
        for pair in touched:
            count = pair_counts[pair]
            if count > 0:
                heapq.heappush(heap, heap_entry(pair, count))
            else:
                del pair_counts[pair]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return vocab, merges


# ----------------------------------------------------------------------------------------------------
# GPT-2's byte <-> printable-unicode alphabet (used by its files, by tiktoken's loader and by HF)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (space -> 'Ġ', newline -> 'Ċ')."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, shift = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shift)
            shift += 1
    return mapping


def _to_printable(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _from_printable(text: str, where: str) -> bytes:
    decoder = _unicode_to_bytes()
    try:
        return bytes(decoder[ch] for ch in text)
    except KeyError as err:
        raise ValueError(f"{where}: {err.args[0]!r} is not a character of GPT-2's byte alphabet") from None


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {ch: byte for byte, ch in bytes_to_unicode().items()}


# ----------------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """Encode text to ids and back with a byte-level BPE vocabulary, merges and special tokens."""

    # Distinct pre-tokens remembered by the encoder; bounded so memory does not grow with the input.
    CACHE_SIZE = 50_000
    # Characters `encode_iterable` gathers before encoding: large enough to amortise per-call overhead.
    STREAM_CHUNK_CHARS = 16_384

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Iterable[str] | None = None,
    ):
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
        if missing:
            raise ValueError(f"a byte-level vocab needs all 256 single bytes; missing e.g. byte {missing[0]}")
        self._byte_ids = [self.token_to_id[bytes([b])] for b in range(256)]

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
        self._special_split = _special_pattern(list(self.special_tokens))
        self._vocab_size = max(self.vocab) + 1

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
        self._cache: dict[str, list[int]] = {}

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
        ranks = self._merge_ranks
        while len(ids) > 1:
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
            self._encode_pretokens(_GPT2_SPLIT.findall(text), out)
            return out
        for index, part in enumerate(self._special_split.split(text)):
            if index % 2:
                out.append(self.special_tokens[part])
            elif part:
                self._encode_pretokens(_GPT2_SPLIT.findall(part), out)
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
                        self._encode_pretokens(_GPT2_SPLIT.findall(part), ids)
        # ... and so are the pre-tokens of the remaining text that end at least 3 characters before
        # the end of what has been read (or before a possible start of a special token).
        stable_end = min(len(buffer), self._pending_special_start(buffer)) - 3
        pretokens = _GPT2_SPLIT.findall(buffer)
        end, n_stable = len(buffer), len(pretokens)
        while n_stable and end > stable_end:
            n_stable -= 1
            end -= len(pretokens[n_stable])
        self._encode_pretokens(pretokens[:n_stable], ids)
        return ids, buffer[end:]

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. a file's lines) to the ids `encode` gives their join.

        Memory stays bounded by `STREAM_CHUNK_CHARS` plus the longest string in the stream, whatever the
        stream's length: text is gathered into chunks of that size, and each chunk's ids are yielded before
        the next is read. Only the unfinished tail is carried over: pre-tokens ending at least 3
        characters before the end of what has been read cannot change when more text arrives (no
        alternative of the pattern looks further ahead than that, beyond the run it matches).
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

    # -- files ---------------------------------------------------------------------------------------

    @classmethod
    def from_gpt2_files(
        cls,
        vocab_bpe: str | os.PathLike,
        encoder_json: str | os.PathLike,
        special_tokens: Iterable[str] | None = None,
    ) -> Tokenizer:
        """Load GPT-2-format files (vocab.bpe merges, encoder.json ids).

        `special_tokens=None` means GPT-2's own: ``<|endoftext|>`` if the vocabulary has it; pass ``()``
        for none.
        """
        vocab = _read_encoder_json(Path(encoder_json))
        merges = _read_vocab_bpe(Path(vocab_bpe))
        if special_tokens is None:
            special_tokens = ["<|endoftext|>"] if b"<|endoftext|>" in vocab.values() else []
        _check_merges_against_vocab(merges, vocab, Path(vocab_bpe))
        return cls(vocab, [merge for merge, _ in merges], special_tokens)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write encoder.json, vocab.bpe and special_tokens.json into directory (see the module docstring)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        encoder = {_to_printable(token): token_id for token_id, token in sorted(self.vocab.items())}
        if len(encoder) != len(self.vocab):
            raise ValueError("cannot save a vocab in which two ids share the same bytes")
        (directory / "encoder.json").write_text(
            json.dumps(encoder, ensure_ascii=False, indent=0), encoding="utf-8"
        )
        lines = ["#version: 0.2"] + [f"{_to_printable(a)} {_to_printable(b)}" for a, b in self.merges]
        (directory / "vocab.bpe").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (directory / "special_tokens.json").write_text(
            json.dumps(list(self.special_tokens), ensure_ascii=False), encoding="utf-8"
        )
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer written by `save`."""
        directory = Path(directory)
        specials_path = directory / "special_tokens.json"
        try:
            specials = json.loads(specials_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{specials_path}, line {err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(specials, list) or not all(isinstance(s, str) for s in specials):
            raise ValueError(f"{specials_path}, line 1: expected a JSON list of strings")
        return cls.from_gpt2_files(directory / "vocab.bpe", directory / "encoder.json", specials)

    # -- exporters -----------------------------------------------------------------------------------

    def _check_ranks_follow_merges(self) -> None:
        merged_ids = [self.token_to_id[a + b] for a, b in self.merges]
        if any(later <= earlier for earlier, later in pairwise(merged_ids)):
            raise ValueError("this export needs the id of each merged token to grow with its merge rank")

    def to_tiktoken(self, name: str = "llmbook"):
        """The same tokenizer as a `tiktoken.Encoding` (ranks are our ids, which grow with merge order).

        tiktoken merges any two adjacent pieces whose concatenation is a token, lowest rank first, where
        `encode` applies only the learned pairs; for GPT-2 and for vocabularies learned by `train_bpe`
        the two agree (the tests compare them on several corpora).
        """
        import tiktoken

        self._check_ranks_follow_merges()
        special_ids = set(self.special_tokens.values())
        ranks = {token: token_id for token_id, token in self.vocab.items() if token_id not in special_ids}
        return tiktoken.Encoding(
            name=name,
            pat_str=GPT2_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=dict(self.special_tokens),
        )

    def to_hf(self):
        """The same tokenizer as a Hugging Face `tokenizers.Tokenizer` (BPE model, GPT-2 byte-level)."""
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        special_ids = set(self.special_tokens.values())
        hf_vocab = {_to_printable(tok): i for i, tok in self.vocab.items() if i not in special_ids}
        hf_vocab.update(self.special_tokens)
        hf_merges = [(_to_printable(a), _to_printable(b)) for a, b in self.merges]
        hf = HFTokenizer(models.BPE(vocab=hf_vocab, merges=hf_merges))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        if self.special_tokens:
            hf.add_special_tokens(
                [AddedToken(s, special=True, normalized=False) for s in self.special_tokens]
            )
        return hf


def _read_encoder_json(path: Path) -> dict[int, bytes]:
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}, line 1: expected a JSON object mapping tokens to ids")

    def where(token: str) -> str:
        # JSON parsers do not report positions of values; find the entry's key in the text instead.
        for written in (json.dumps(token, ensure_ascii=False), json.dumps(token)):
            found = text.find(written + ":")
            if found >= 0:
                return f"{path}, line {text.count(chr(10), 0, found) + 1}"
        return f"{path}"

    byte_of = _unicode_to_bytes()
    vocab: dict[int, bytes] = {}
    for token, token_id in raw.items():
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise ValueError(f"{where(token)}: token {token!r} has id {token_id!r}; ids must be ints >= 0")
        if token_id in vocab:
            raise ValueError(f"{where(token)}: id {token_id} is given to two tokens")
        try:
            vocab[token_id] = bytes(byte_of[ch] for ch in token)
        except KeyError as err:
            raise ValueError(
                f"{where(token)}: token {token!r} has {err.args[0]!r}, "
                "not a character of GPT-2's byte alphabet"
            ) from None
    return vocab


def _read_vocab_bpe(path: Path) -> list[tuple[tuple[bytes, bytes], int]]:
    """Merges with the line number each came from (so later checks can name the line)."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    merges = []
    for line_number, line in enumerate(lines, start=1):
        if line_number == 1 and line.startswith("#version"):
            continue
        if not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(
                f"{path}, line {line_number}: expected two tokens separated by one space, got {line!r}"
            )
        where = f"{path}, line {line_number}"
        merges.append(((_from_printable(parts[0], where), _from_printable(parts[1], where)), line_number))
    return merges


def _check_merges_against_vocab(
    merges: list[tuple[tuple[bytes, bytes], int]], vocab: dict[int, bytes], path: Path
) -> None:
    known = set(vocab.values())
    for (left, right), line_number in merges:
        for part in (left, right, left + right):
            if part not in known:
                raise ValueError(
                    f"{path}, line {line_number}: merge {_to_printable(left)} {_to_printable(right)} uses "
                    f"{_to_printable(part)!r}, which is not in the vocabulary"
                )


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


__all__ = [
    "GPT2_SPLIT_PATTERN",
    "Tokenizer",
    "bytes_to_unicode",
    "count_pairs",
    "count_pretokens",
    "merge_pair",
    "gpt2_tokenizer",
    "pretokenize",
    "split_on_special_tokens",
    "train_bpe",
    "train_bpe_slow",
]

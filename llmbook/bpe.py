"""Byte-level BPE, the algorithm (as in GPT-2 and minbpe): pre-tokenize, count adjacent pairs, merge.

Reading order follows the data: pre-tokenization (a split pattern, GPT-2's by default, and special
tokens), then the two operations BPE is made of (`count_pairs`, `merge_pair`), then encoding one
pre-token by rank (`apply_merges`, the plain rescanning loop, and `apply_merges_heap`, the same ids in
O(n log n), which `llmbook.tokenizer.Tokenizer` uses on long pieces), then training: `train_bpe_slow`,
the plain algorithm that recounts every pair after every merge, and `train_bpe`, the same merges
computed incrementally with a heap. Both take the same arguments and return the same (vocab, merges).

Vocabulary layout of a trained tokenizer: ids 0..255 are the single bytes, then the special tokens in
the order given, then one id per merge in the order the merges were learned.
"""

from __future__ import annotations

import functools
import heapq
import multiprocessing
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path

import regex

from llmbook.unicode_version import PinnedPattern

# The pre-tokenization pattern of GPT-2's encoder.py: contractions, letter runs, digit runs and runs of
# other symbols (each may take one leading space), then whitespace. BPE merges never cross these pieces.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Inputs shorter than this are pre-tokenized in-process: forking workers costs more than it saves.
PARALLEL_MIN_CHARS = 4_000_000


# ----------------------------------------------------------------------------------------------------
# Pre-tokenization


@functools.lru_cache(maxsize=16)
def compile_pattern(pattern: str) -> PinnedPattern:
    """The compiled split pattern (compiled once per pattern string), its \\p{L} and \\p{N} pinned to
    the Unicode version of tiktoken and tokenizers (`llmbook.unicode_version`)."""
    try:
        return PinnedPattern(pattern)
    except regex.error as err:
        raise ValueError(f"the pre-tokenization pattern {pattern!r} is not a valid regex: {err}") from None


def special_pattern(special_tokens: Sequence[str]) -> regex.Pattern | None:
    """A pattern matching any special token, longest first, so overlapping specials resolve greedily."""
    if not special_tokens:
        return None
    ordered = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    return regex.compile("(" + "|".join(regex.escape(s) for s in ordered) + ")")


def split_on_special_tokens(text: str, special_tokens: Sequence[str]) -> list[tuple[str, bool]]:
    """Cut text into (piece, is_special) runs; special tokens come out whole, longest match first."""
    pattern = special_pattern(special_tokens)
    if pattern is None:
        return [(text, False)] if text else []
    parts = pattern.split(text)
    # regex.split with one capture group alternates: text, special, text, special, ..., text.
    return [(part, index % 2 == 1) for index, part in enumerate(parts) if part]


def pretokenize(text: str, pattern: str = GPT2_SPLIT_PATTERN) -> list[str]:
    """Split ordinary text (no special tokens) into pre-tokens; their concatenation is `text`."""
    return compile_pattern(pattern).findall(text)


def _count_pretokens_serial(texts: Sequence[str], pattern: str = GPT2_SPLIT_PATTERN) -> Counter[str]:
    compiled = compile_pattern(pattern)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(compiled.findall(text))
    return counts


# A newline between two non-space characters: the newline is a pre-token of its own whichever side of a
# cut just after it we look from, and no alternative of GPT-2's pattern looks further back, so cutting
# there never changes the pre-tokens (a custom pattern must keep that property to be counted in parallel).
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
    text: str,
    special_tokens: Sequence[str] = (),
    num_workers: int | None = None,
    pattern: str = GPT2_SPLIT_PATTERN,
) -> Counter[str]:
    """Count pre-tokens in text, after removing special tokens; in parallel for long inputs.

    The text is cut at special tokens (and, inside long stretches without any, at safe newlines), and the
    chunks are counted by `num_workers` processes (default: one per CPU, and one for short inputs; never
    more than the CPUs).
    """
    chunks = [part for part, is_special in split_on_special_tokens(text, special_tokens) if not is_special]
    if num_workers is None:
        num_workers = 1 if len(text) < PARALLEL_MIN_CHARS else min(os.cpu_count() or 1, 8)
    elif not isinstance(num_workers, int) or isinstance(num_workers, bool):
        raise TypeError(f"num_workers must be an int or None, got {num_workers!r}")
    elif num_workers < 1:
        raise ValueError(f"num_workers={num_workers}: need at least 1 process (or None for one per CPU)")
    # More processes than CPUs would only add forks: each worker counts on a CPU of its own.
    num_workers = min(num_workers, os.cpu_count() or 1)
    if num_workers <= 1:
        return _count_pretokens_serial(chunks, pattern)
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
        partial_counts = pool.map(functools.partial(_count_pretokens_serial, pattern=pattern), batches)
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
# Encoding one pre-token: apply the learned merges by rank

# (left id, right id) -> (rank, merged id): all that encoding needs from the merges.
MergeRanks = dict[tuple[int, int], tuple[int, int]]


def apply_merges(ids: Sequence[int], ranks: MergeRanks) -> list[int]:
    """Merge by rank, the plain way: merge every occurrence of the earliest-learned adjacent pair, rescan.

    One scan per merge applied, so quadratic in the length of the piece; `apply_merges_heap` gives the
    same ids in O(n log n).
    """
    ids = list(ids)
    while len(ids) > 1:
        # Only the minimum is needed, not how often each pair occurs, so one scan replaces count_pairs.
        best_rank, best = None, None
        for pair in pairwise(ids):
            found = ranks.get(pair)
            if found is not None and (best_rank is None or found[0] < best_rank):
                best_rank, best = found[0], pair
        if best is None:
            break
        ids = merge_pair(ids, best, ranks[best][1])
    return ids


def apply_merges_heap(
    ids: Sequence[int],
    ranks: MergeRanks,
    open_merge_rank: Callable[[int, int, int], int | None] | None = None,
) -> tuple[list[int], int]:
    """`apply_merges` in O(n log n); returns (ids, how many leading ids are final).

    The parts form a linked list. Each rank that some adjacent pair has keeps the positions of its
    pairs, and a heap holds those ranks: the earliest-learned one is merged first, at all its positions
    left to right, as `merge_pair` does in one pass (so a run of one pair costs one pass, not one heap
    operation per merge). Positions are not removed when a merge makes them stale; they are skipped when
    their pass comes. A pair a pass makes with a rank not above it (possible only when the merges are not
    in learned order) waits for that pass to end, as in `apply_merges`.

    Without `open_merge_rank` every id is final. With it, `ids` are the start of a piece whose rest is
    unknown, and the merges must be in learned order (each after every merge making one of its parts).
    ``open_merge_rank(node, token, after_rank)`` is the first rank >= after_rank at which `token`,
    starting at position `node` of `ids`, could merge with a right neighbour made of the uncertain rest
    (None if never). The last certain token becomes uncertain at that rank, unless a merge with its left
    neighbour comes first; the tokens left of every uncertain one are final, whatever follows: passes
    run in rank order and each reads one token ahead, so none of their decisions to the left of the
    uncertain tokens depends on the rest.
    """
    tokens: list[int | None] = list(ids)
    n = len(tokens)
    right, left = list(range(1, n + 1)), list(range(-1, n - 1))
    get, heappush = ranks.get, heapq.heappush
    # rank -> positions of its pairs; an open end at node i is listed as n + i, after every pair.
    positions: dict[int, list[int]] = {}
    for i in range(n - 1):
        found = get((tokens[i], tokens[i + 1]))
        if found is not None:
            positions.setdefault(found[0], []).append(i)
    pending = list(positions)
    heapq.heapify(pending)
    frontier = n  # nodes from here on may differ once the rest of the piece is known

    def add(rank: int, position: int) -> None:
        listed = positions.get(rank)
        if listed is None:
            positions[rank] = [position]
            heappush(pending, rank)
        else:
            listed.append(position)

    def add_open_end(node: int, after_rank: int) -> None:
        rank = open_merge_rank(node, tokens[node], after_rank)
        if rank is not None:
            add(rank, n + node)

    if open_merge_rank is not None and n:
        add_open_end(n - 1, 0)
    while pending:
        rank = heapq.heappop(pending)
        listed = positions.pop(rank)
        listed.sort()
        merged = None
        for i in listed:
            if i >= n:  # an open end
                i -= n
                if right[i] == frontier and tokens[i] is not None:
                    # Still the last certain token (so unchanged since): it may merge with the rest now.
                    frontier = i
                    if left[i] >= 0:  # its decision in this pass read token i, certain then
                        add_open_end(left[i], rank + 1)
                continue
            j = right[i]
            if j >= frontier or tokens[i] is None:
                continue
            found = get((tokens[i], tokens[j]))
            if found is None or found[0] != rank:
                continue  # stale: one side was merged since (each rank is one pair)
            merged = found[1]
            tokens[i], tokens[j] = merged, None
            k = right[j]
            right[i] = k
            if k < n:
                left[k] = i
            p = left[i]
            if p >= 0:
                found = get((tokens[p], merged))
                if found is not None:
                    add(found[0], p)
            if k < frontier:
                found = get((merged, tokens[k]))
                if found is not None:
                    add(found[0], i)
            elif open_merge_rank is not None:  # i is now the last certain token
                add_open_end(i, rank + 1)
    out, node, n_final = [], 0, 0
    while node < n:
        out.append(tokens[node])
        n_final += node < frontier
        node = right[node]
    return out, n_final


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


def _merge_bar(progress: bool | None, text_chars: int, n_merges: int):
    """A tqdm bar over the merges (by default only for inputs over 10 MB), or None."""
    if not (progress if progress is not None else text_chars > 10_000_000):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=n_merges, desc="BPE merges", unit="merge")


def train_bpe_slow(
    input: str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    *,
    pattern: str = GPT2_SPLIT_PATTERN,
    num_workers: int | None = None,
    progress: bool | None = None,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Byte-level BPE, the plain way: recount every adjacent pair after every merge (for teaching)."""
    specials = _check_training_args(vocab_size, special_tokens)
    text = _read_input(input)
    vocab = _initial_vocab(specials)
    # Each distinct pre-token is a tuple of byte strings, weighted by how often it occurs.
    words = {
        tuple(bytes([b]) for b in pretoken.encode("utf-8")): count
        for pretoken, count in count_pretokens(text, specials, num_workers, pattern).items()
    }
    merges: list[tuple[bytes, bytes]] = []
    bar = _merge_bar(progress, len(text), vocab_size - len(vocab))
    while len(vocab) < vocab_size:
        pair_counts: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for pair, n in count_pairs(word).items():
                pair_counts[pair] += n * count
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
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return vocab, merges


# Python's heap pops the smallest entry, but ties must go to the *greatest* pair of byte strings. So each
# token gets a sort key that reverses byte order: byte x becomes character 256 - x, and a terminator 257,
# above every byte's character, makes a prefix sort after its extensions (b"a" < b"a\x00" must flip too).
_REVERSED_BYTE = {byte: chr(256 - byte) for byte in range(256)}
_KEY_END = chr(257)


def _descending_key(token: bytes) -> str:
    return token.decode("latin-1").translate(_REVERSED_BYTE) + _KEY_END


class _PairIndex:
    """The state of the fast trainer: each word's ids, pair counts, which words hold each pair, a heap.

    Counts change by difference when a merge rewrites a word; the heap is lazy (an entry whose count no
    longer matches is dropped when it surfaces).
    """

    def __init__(self, pretoken_counts: Counter[str], vocab: dict[int, bytes]):
        self.words: list[list[int]] = [list(pretoken.encode("utf-8")) for pretoken in pretoken_counts]
        self.counts: list[int] = list(pretoken_counts.values())
        self.pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
        # Which words contain each pair (may list words that lost the pair since; they are skipped).
        self.pair_words: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
        for index, (word, count) in enumerate(zip(self.words, self.counts, strict=True)):
            self._add(index, word, count)
        self.sort_keys = {index: _descending_key(token) for index, token in vocab.items()}
        self.heap = [self._entry(pair, count) for pair, count in self.pair_counts.items()]
        heapq.heapify(self.heap)

    def _entry(self, pair: tuple[int, int], count: int) -> tuple:
        return (-count, self.sort_keys[pair[0]], self.sort_keys[pair[1]], pair)

    def _add(self, index: int, word: Sequence[int], weight: int) -> None:
        for pair, n in count_pairs(word).items():
            self.pair_counts[pair] += n * weight
            self.pair_words[pair].add(index)

    def pop_best(self) -> tuple[int, int] | None:
        """The most frequent pair (ties: the greater pair of byte strings), or None if none is left."""
        heap, pair_counts = self.heap, self.pair_counts
        while heap and pair_counts.get(heap[0][3], 0) != -heap[0][0]:
            heapq.heappop(heap)
        return heapq.heappop(heap)[3] if heap else None

    def merge(self, best: tuple[int, int], new_id: int, token: bytes) -> None:
        """Rewrite every word holding `best` with `new_id`, updating the counts by difference."""
        self.sort_keys[new_id] = _descending_key(token)
        touched: set[tuple[int, int]] = set()
        for index in self.pair_words.pop(best):
            word = self.words[index]
            merged = merge_pair(word, best, new_id)
            if len(merged) == len(word):
                continue
            # Update counts by difference: remove the word's old pairs, add its new ones. (Pair by pair
            # rather than through count_pairs: this loop is the trainer's hot path.)
            count = self.counts[index]
            for pair in pairwise(word):
                self.pair_counts[pair] -= count
                touched.add(pair)
            for pair in pairwise(merged):
                self.pair_counts[pair] += count
                touched.add(pair)
                if new_id in pair:  # every other pair of the merged word was already in the old one
                    self.pair_words[pair].add(index)
            self.words[index] = merged
        for pair in touched:
            count = self.pair_counts[pair]
            if count > 0:
                heapq.heappush(self.heap, self._entry(pair, count))
            else:
                del self.pair_counts[pair]


def train_bpe(
    input: str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    *,
    pattern: str = GPT2_SPLIT_PATTERN,
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
    vocab = _initial_vocab(specials)
    bar = _merge_bar(progress, len(text), vocab_size - len(vocab))
    index = _PairIndex(count_pretokens(text, specials, num_workers, pattern), vocab)
    del text
    merges: list[tuple[bytes, bytes]] = []
    while len(vocab) < vocab_size:
        best = index.pop_best()
        if best is None:
            break  # every word is a single token: nothing left to merge
        left, right = best
        new_id = len(vocab)
        vocab[new_id] = vocab[left] + vocab[right]
        merges.append((vocab[left], vocab[right]))
        index.merge(best, new_id, vocab[new_id])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return vocab, merges

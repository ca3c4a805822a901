"""Tokenizer files and exporters: GPT-2's files, `Tokenizer.save`/`load`, tiktoken and Hugging Face.

File format written by `Tokenizer.save(dir)` (the same two files GPT-2 ships, plus two):
- ``encoder.json``: a JSON object mapping each token, written with GPT-2's byte-to-unicode alphabet
  (`bytes_to_unicode`, so the space byte is ``Ġ``), to its id;
- ``vocab.bpe``: a ``#version: 0.2`` header line, then one merge per line, ``left right`` in the same
  alphabet, in rank order;
- ``special_tokens.json``: a JSON list of the special tokens as plain strings;
- ``split_pattern.txt``: the pre-tokenization regex (a directory without it uses GPT-2's).
No pickle anywhere; a malformed file raises `ValueError` naming the file and the line. Every file is
written with `llmbook.data.atomic_write`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

from llmbook.bpe import GPT2_SPLIT_PATTERN
from llmbook.data import atomic_write
from llmbook.errors import CorruptFileError

if TYPE_CHECKING:
    from llmbook.tokenizer import Tokenizer

PATTERN_FILE = "split_pattern.txt"
# Ids are stored as u32 by tiktoken and tokenizers, which keep the largest value as a sentinel.
MAX_VOCAB_ID = 2**32 - 2


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


def to_printable(token: bytes) -> str:
    """A token's bytes as GPT-2's printable characters, as vocab.bpe, encoder.json and GGUF spell it."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def from_printable(text: str, where: str) -> bytes:
    """The inverse of `to_printable`; `where` names the file and line for the error on a foreign character."""
    decoder = _unicode_to_bytes()
    try:
        return bytes(decoder[ch] for ch in text)
    except KeyError as err:
        raise ValueError(f"{where}: {err.args[0]!r} is not a character of GPT-2's byte alphabet") from None


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {ch: byte for byte, ch in bytes_to_unicode().items()}


# ----------------------------------------------------------------------------------------------------
# Reading


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
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id <= MAX_VOCAB_ID:
            raise ValueError(
                f"{where(token)}: token {token!r} has id {token_id!r}; ids must be ints in 0..{MAX_VOCAB_ID}"
            )
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
    if not lines[0].startswith("#version"):
        raise CorruptFileError(
            f"{path}, line 1: expected the '#version: 0.2' header of a merges file, got {lines[0][:40]!r}"
        )
    merges = []
    for line_number, line in enumerate(lines, start=1):
        if line_number == 1:
            continue
        if not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(
                f"{path}, line {line_number}: expected two tokens separated by one space, got {line!r}"
            )
        where = f"{path}, line {line_number}"
        merges.append(((from_printable(parts[0], where), from_printable(parts[1], where)), line_number))
    return merges


def _check_merges_against_vocab(
    merges: list[tuple[tuple[bytes, bytes], int]], vocab: dict[int, bytes], path: Path
) -> None:
    known = set(vocab.values())
    for (left, right), line_number in merges:
        for part in (left, right, left + right):
            if part not in known:
                raise ValueError(
                    f"{path}, line {line_number}: merge {to_printable(left)} {to_printable(right)} uses "
                    f"{to_printable(part)!r}, which is not in the vocabulary"
                )


def _check_every_token_is_made(
    merges: list[tuple[tuple[bytes, bytes], int]], vocab: dict[int, bytes], specials: list[str], path: Path
) -> None:
    """Every token beyond the single bytes and the special tokens is the result of a merge.

    A vocab.bpe cut short (or emptied) leaves tokens in encoder.json that no merge makes: such a
    tokenizer would load and encode differently, so it is refused.
    """
    made = {left + right for (left, right), _ in merges}
    made |= {bytes([b]) for b in range(256)} | {s.encode("utf-8") for s in specials}
    unmade = [token for token in vocab.values() if token not in made]
    if unmade:
        raise CorruptFileError(
            f"{path} has {len(merges)} merges, but {len(unmade)} tokens of the vocabulary are made by "
            f"none of them (e.g. {to_printable(unmade[0])!r}); the file is cut short or belongs to "
            "another vocabulary"
        )


def read_gpt2_files(
    vocab_bpe: str | os.PathLike, encoder_json: str | os.PathLike, special_tokens: Iterable[str] | None
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]], list[str]]:
    """(vocab, merges, special tokens) from GPT-2-format files; special_tokens=None means GPT-2's own."""
    vocab = _read_encoder_json(Path(encoder_json))
    merges = _read_vocab_bpe(Path(vocab_bpe))
    if special_tokens is None:
        special_tokens = ["<|endoftext|>"] if b"<|endoftext|>" in vocab.values() else []
    _check_merges_against_vocab(merges, vocab, Path(vocab_bpe))
    # GPT-2's files hold <|endoftext|> even when the caller asks for no special tokens.
    named = [*special_tokens, *(["<|endoftext|>"] if b"<|endoftext|>" in vocab.values() else [])]
    _check_every_token_is_made(merges, vocab, named, Path(vocab_bpe))
    return vocab, [merge for merge, _ in merges], list(special_tokens)


def read_directory(directory: str | os.PathLike) -> tuple[list[str], str]:
    """The special tokens and split pattern a `Tokenizer.save` directory records."""
    directory = Path(directory)
    specials_path = directory / "special_tokens.json"
    try:
        specials = json.loads(specials_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{specials_path}, line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(specials, list) or not all(isinstance(s, str) for s in specials):
        raise ValueError(f"{specials_path}, line 1: expected a JSON list of strings")
    pattern_path = directory / PATTERN_FILE
    pattern = pattern_path.read_text(encoding="utf-8") if pattern_path.is_file() else GPT2_SPLIT_PATTERN
    return specials, pattern


# ----------------------------------------------------------------------------------------------------
# Writing and exporting


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save(tokenizer: Tokenizer, directory: str | os.PathLike) -> Path:
    """Write encoder.json, vocab.bpe, special_tokens.json and split_pattern.txt into directory."""
    directory = Path(directory)
    encoder = {to_printable(token): token_id for token_id, token in sorted(tokenizer.vocab.items())}
    if len(encoder) != len(tokenizer.vocab):
        raise ValueError("cannot save a vocab in which two ids share the same bytes")
    _write_text(directory / "encoder.json", json.dumps(encoder, ensure_ascii=False, indent=0))
    lines = ["#version: 0.2"] + [f"{to_printable(a)} {to_printable(b)}" for a, b in tokenizer.merges]
    _write_text(directory / "vocab.bpe", "\n".join(lines) + "\n")
    _write_text(
        directory / "special_tokens.json", json.dumps(list(tokenizer.special_tokens), ensure_ascii=False)
    )
    _write_text(directory / PATTERN_FILE, tokenizer.pattern)
    return directory


def _check_ranks_follow_merges(tokenizer: Tokenizer) -> None:
    merged_ids = [tokenizer.token_to_id[a + b] for a, b in tokenizer.merges]
    if any(later <= earlier for earlier, later in pairwise(merged_ids)):
        raise ValueError("this export needs the id of each merged token to grow with its merge rank")


def to_tiktoken(tokenizer: Tokenizer, name: str = "llmbook"):
    """The same tokenizer as a `tiktoken.Encoding` (ranks are our ids, which grow with merge order).

    tiktoken merges any two adjacent pieces whose concatenation is a token, lowest rank first, where
    `Tokenizer.encode` applies only the learned pairs; for GPT-2 and for vocabularies learned by
    `train_bpe` the two agree (the tests compare them on several corpora).
    """
    import tiktoken

    _check_ranks_follow_merges(tokenizer)
    special_ids = set(tokenizer.special_tokens.values())
    ranks = {token: token_id for token_id, token in tokenizer.vocab.items() if token_id not in special_ids}
    return tiktoken.Encoding(
        name=name,
        pat_str=tokenizer.pattern,
        mergeable_ranks=ranks,
        special_tokens=dict(tokenizer.special_tokens),
    )


def to_hf(tokenizer: Tokenizer):
    """The same tokenizer as a Hugging Face `tokenizers.Tokenizer` (BPE model, GPT-2 byte-level)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    special_ids = set(tokenizer.special_tokens.values())
    hf_vocab = {to_printable(tok): i for i, tok in tokenizer.vocab.items() if i not in special_ids}
    hf_vocab.update(tokenizer.special_tokens)
    hf_merges = [(to_printable(a), to_printable(b)) for a, b in tokenizer.merges]
    hf = HFTokenizer(models.BPE(vocab=hf_vocab, merges=hf_merges))
    if tokenizer.pattern == GPT2_SPLIT_PATTERN:  # ByteLevel's own regex is GPT-2's
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
    hf.decoder = decoders.ByteLevel()
    if tokenizer.special_tokens:
        hf.add_special_tokens(
            [AddedToken(s, special=True, normalized=False) for s in tokenizer.special_tokens]
        )
    return hf

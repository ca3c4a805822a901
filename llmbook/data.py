"""Corpora and tokenizer files by name: found in $LLMBOOK_DATA, then a user cache, else downloaded.

Every file is checked against a sha256 before use, so a truncated download or a different revision of
a corpus is caught instead of silently changing the book's numbers.

    >>> from llmbook.data import load_text
    >>> text = load_text("tinyshakespeare")          # doctest: +SKIP

Set ``LLMBOOK_DATA=/some/folder`` to use local copies (file names as in the table below); set
``LLMBOOK_CACHE`` to move the download cache (default ``$XDG_CACHE_HOME/llmbook`` or ``~/.cache/llmbook``).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

DATA_ENV = "LLMBOOK_DATA"
CACHE_ENV = "LLMBOOK_CACHE"


@dataclass(frozen=True)
class Resource:
    """A file the book uses: where it lives on the web, its local name and its checksum."""

    name: str
    filename: str
    url: str
    sha256: str
    description: str
    # Some resources are a fixed slice of a larger public file; `extract` cuts it from the download.
    extract: Callable[[bytes], bytes] | None = None


def _first_stories(n_stories: int) -> Callable[[bytes], bytes]:
    def cut(raw: bytes) -> bytes:
        marker = b"<|endoftext|>\n"
        end = 0
        for _ in range(n_stories):
            found = raw.find(marker, end)
            if found < 0:
                raise ValueError(f"the downloaded file has fewer than {n_stories} stories")
            end = found + len(marker)
        return raw[:end]

    return cut


_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"

RESOURCES: dict[str, Resource] = {
    r.name: r
    for r in [
        Resource(
            "tinyshakespeare",
            "tinyshakespeare.txt",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            "40,000 lines of Shakespeare's plays (1.1 MB), the classic small language-modelling corpus.",
        ),
        Resource(
            "tinystories_sample",
            "tinystories_sample.txt",
            "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt",
            "defaedb58bf28079f3e29c6142cb7f3568d331a577e0911c5d7925c465c50c43",
            "The first five stories of the TinyStories V2 validation set (3.8 kB).",
            extract=_first_stories(5),
        ),
        Resource(
            "gpt2_vocab_bpe",
            "vocab.bpe",
            f"{_GPT2}/vocab.bpe",
            "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            "GPT-2's 50,000 BPE merges, in rank order.",
        ),
        Resource(
            "gpt2_encoder_json",
            "encoder.json",
            f"{_GPT2}/encoder.json",
            "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
            "GPT-2's vocabulary: token string to id, 50,257 entries.",
        ),
    ]
}


class DataUnavailableError(RuntimeError):
    """Raised when a resource is not on disk and cannot be downloaded."""


def cache_dir() -> Path:
    """The folder where downloads and artefacts that chapters produce are cached (created if needed)."""
    if os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmbook"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resource(name: str) -> Resource:
    if name not in RESOURCES:
        raise ValueError(f"unknown resource {name!r}; known: {', '.join(sorted(RESOURCES))}")
    return RESOURCES[name]


def _download(url: str, progress_label: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        chunks = []
        with tqdm(total=total, unit="B", unit_scale=True, desc=progress_label, leave=False) as bar:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                chunks.append(chunk)
                bar.update(len(chunk))
    return b"".join(chunks)


def path(name: str, download: bool = True) -> Path:
    """Local path of resource `name`: $LLMBOOK_DATA first, then the cache, else download and verify."""
    res = _resource(name)
    data_dir = os.environ.get(DATA_ENV)
    if data_dir:
        candidate = Path(data_dir) / res.filename
        if candidate.is_file():
            actual = sha256_of(candidate)
            if actual != res.sha256:
                raise ValueError(
                    f"{candidate} does not match the expected contents of {name!r} "
                    f"(sha256 {actual[:12]}…, expected {res.sha256[:12]}…); "
                    f"replace it with the file from {res.url}"
                )
            return candidate
    cached = cache_dir() / res.filename
    if cached.is_file() and sha256_of(cached) == res.sha256:
        return cached
    if not download:
        raise DataUnavailableError(f"{res.filename} for {name!r} is not in ${DATA_ENV} or {cache_dir()}")
    try:
        raw = _download(res.url, res.filename)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        where = f"${DATA_ENV}={data_dir}" if data_dir else f"${DATA_ENV} (not set)"
        raise DataUnavailableError(
            f"could not download {res.filename} ({name!r}) from {res.url}: {err}. "
            f"Offline? Put {res.filename} in a folder and point {DATA_ENV} at it; looked in {where} "
            f"and the cache {cache_dir()}."
        ) from err
    if res.extract is not None:
        raw = res.extract(raw)
    actual = hashlib.sha256(raw).hexdigest()
    if actual != res.sha256:
        raise DataUnavailableError(
            f"downloaded {res.filename} from {res.url} but its sha256 is {actual[:12]}…, expected "
            f"{res.sha256[:12]}…; the file was truncated or changed upstream. Nothing was saved."
        )
    atomic_write(cached, lambda tmp: Path(tmp).write_bytes(raw))
    return cached


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp_name) on a temporary file beside `path`, fsync it, then rename it over `path`.

    The package's one way of writing a file: a crash mid-write leaves the previous file (or none),
    never half of one, because `os.replace` within one folder is atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name in the same directory (so the rename stays on one file system); not mkstemp, whose
    # 0600 permissions would carry over to the final file.
    tmp_name = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp_name)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def write_json(path: str | os.PathLike, obj: object) -> Path:
    """Atomically write `obj` as indented UTF-8 JSON (non-ASCII characters kept as they are)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def load_text(name: str) -> str:
    """The contents of a text resource, decoded as UTF-8."""
    return path(name).read_text(encoding="utf-8")

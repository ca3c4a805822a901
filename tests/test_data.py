"""The data loader: local copies, the cache, verified downloads and clear offline errors."""

import io
import os
import urllib.error
from pathlib import Path

import pytest

from llmbook import data

SHARED = Path(os.environ.get("LLMBOOK_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_shared = pytest.mark.skipif(
    not (SHARED / "tinyshakespeare.txt").is_file(), reason="the shared data folder is not beside the repo"
)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No LLMBOOK_DATA and an empty cache, so every lookup must go to the (mocked) network."""
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path


class _FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _serve(monkeypatch, payload_for_url):
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return _FakeResponse(payload_for_url(url))

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    return calls


@needs_shared
@pytest.mark.parametrize("name", sorted(data.RESOURCES))
def test_every_resource_is_found_in_llmbook_data_and_matches_its_checksum(name, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(SHARED))
    found = data.path(name, download=False)
    assert found == SHARED / data.RESOURCES[name].filename
    assert data.sha256_of(found) == data.RESOURCES[name].sha256


@needs_shared
def test_load_text_returns_the_whole_corpus(monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(SHARED))
    text = data.load_text("tinyshakespeare")
    assert len(text) == 1115394 and text.startswith("First Citizen:")


def test_a_file_with_the_wrong_contents_in_llmbook_data_is_rejected(tmp_path, monkeypatch):
    (tmp_path / "tinyshakespeare.txt").write_text("not shakespeare")
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="does not match the expected contents"):
        data.path("tinyshakespeare")


def test_failed_download_names_llmbook_data_and_the_file(isolated, monkeypatch):
    def refuse(url, timeout=None):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)
    with pytest.raises(data.DataUnavailableError) as err:
        data.path("gpt2_vocab_bpe")
    message = str(err.value)
    assert "LLMBOOK_DATA" in message and "vocab.bpe" in message
    assert not list((isolated / "cache").glob("*")), "a failed download must leave nothing behind"


@needs_shared
def test_download_is_verified_cached_and_not_repeated(isolated, monkeypatch):
    payload = (SHARED / "vocab.bpe").read_bytes()
    calls = _serve(monkeypatch, lambda url: payload)
    first = data.path("gpt2_vocab_bpe")
    assert first.read_bytes() == payload and first.parent == isolated / "cache"
    assert data.path("gpt2_vocab_bpe") == first
    assert len(calls) == 1, "the second lookup must come from the cache"


@needs_shared
def test_truncated_download_fails_the_checksum_and_saves_nothing(isolated, monkeypatch):
    payload = (SHARED / "vocab.bpe").read_bytes()[:-100]
    _serve(monkeypatch, lambda url: payload)
    with pytest.raises(data.DataUnavailableError, match="sha256"):
        data.path("gpt2_vocab_bpe")
    assert not (isolated / "cache" / "vocab.bpe").exists()


@needs_shared
def test_tinystories_sample_is_cut_from_the_full_validation_file(isolated, monkeypatch):
    sample = (SHARED / "tinystories_sample.txt").read_bytes()
    more = b"Another story that is not part of the sample.\n<|endoftext|>\n" * 3
    _serve(monkeypatch, lambda url: sample + more)
    assert data.path("tinystories_sample").read_bytes() == sample


def test_unknown_resource_lists_the_known_names():
    with pytest.raises(ValueError, match="tinyshakespeare"):
        data.path("wikipedia")


def test_no_download_when_forbidden(isolated):
    with pytest.raises(data.DataUnavailableError, match="not in"):
        data.path("tinyshakespeare", download=False)

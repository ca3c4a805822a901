"""Shared pytest configuration: the tests' one small model, and which website was checked (with its page
weights) after a run."""

import time
from pathlib import Path

import pytest

PAGE_WEIGHT = Path(__file__).resolve().parents[1] / "_build" / "page_weight.txt"
SITE_NOTE = PAGE_WEIGHT.with_name("book_test_site.txt")
_STARTED = time.time()


def pytest_terminal_summary(terminalreporter):
    # Which site tests/test_book.py checked: the website command's (stamped fresh) or one it built.
    if SITE_NOTE.is_file() and SITE_NOTE.stat().st_mtime >= _STARTED:
        terminalreporter.section("the website the book tests checked")
        terminalreporter.write(SITE_NOTE.read_text())
    # Written by tests/test_book.py (possibly in an xdist worker); shown here so growth is visible.
    if PAGE_WEIGHT.is_file() and PAGE_WEIGHT.stat().st_mtime >= _STARTED:
        terminalreporter.section("page weight of the built website")
        terminalreporter.write(PAGE_WEIGHT.read_text())


def pytest_configure(config):
    # Two xdist workers share two cores: one torch thread each avoids oversubscription (the notebooks
    # run in their own kernels and choose their own thread counts).
    import torch

    torch.set_num_threads(1)


# ---- the tests' one small model -------------------------------------------------------------------


def tiny_config(**overrides):
    """The small ModelConfig the tests build on (vocab 97, context 24, d_model 32, 2 layers, 4 heads)."""
    from llmbook.model import ModelConfig

    fields = dict(vocab_size=97, context_length=24, d_model=32, n_layers=2, n_heads=4)
    return ModelConfig(**(fields | overrides))


def tiny_model(config=None, seed: int = 0, **overrides):
    """A TransformerLM of `config` (default: `tiny_config(**overrides)`) built after torch.manual_seed(seed),
    in eval mode (call .train() where dropout should act)."""
    import torch

    from llmbook.model import TransformerLM

    torch.manual_seed(seed)
    return TransformerLM(config if config is not None else tiny_config(**overrides)).eval()


@pytest.fixture(name="tiny_model")
def tiny_model_fixture():
    """`tiny_model` as a fixture: call it with config overrides, e.g. tiny_model(n_kv_heads=2)."""
    return tiny_model

"""Shared pytest configuration: report which website was checked, and its page weights, after a run."""

import time
from pathlib import Path

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

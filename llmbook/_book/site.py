"""Which sources a built website came from, so the test command can reuse the site the website command built.

`.ci/book` runs ``begin`` before it builds (the old stamp is removed and the digest of the sources is
noted) and ``finish`` after a build that succeeded (the noted digest becomes the site's stamp).
tests/test_book.py reuses ``_build/html`` only when its stamp equals the digest of the sources as they
are now; otherwise it builds the site itself. A failed or interrupted build leaves no stamp, and a
source that changed during the build leaves a stamp that no longer matches.

    python -m llmbook._book.site begin|finish
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Everything a page depends on: the notebooks and pages (code and saved outputs), the book's
# configuration, the package (the notebooks import it and its _book extensions render them) and
# pyproject.toml (the pinned versions of the builder).
_SOURCES = ("chapters/**/*", "exercises/**/*", "llmbook/**/*", "_config.yml", "_toc.yml", "pyproject.toml")
_SKIP_PARTS = {"__pycache__", ".ipynb_checkpoints"}
_PENDING = "_build/.site-sources.pending"
STAMP = "_build/html/.site-sources"


def source_digest(root: Path = ROOT) -> str:
    """sha256 over the path and bytes of every source file the website is built from."""
    files = sorted(
        {
            path
            for pattern in _SOURCES
            for path in root.glob(pattern)
            if path.is_file() and not _SKIP_PARTS.intersection(path.parts) and path.suffix != ".pyc"
        }
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def begin(root: Path = ROOT) -> None:
    """Before a build: drop the old stamp and note the digest of the sources the build starts from."""
    (root / STAMP).unlink(missing_ok=True)
    pending = root / _PENDING
    pending.parent.mkdir(parents=True, exist_ok=True)
    pending.write_text(source_digest(root))


def finish(root: Path = ROOT) -> None:
    """After a successful build: stamp the site with the digest noted by begin()."""
    pending = root / _PENDING
    if not pending.is_file():
        raise FileNotFoundError(
            f"{pending} is missing: run `python -m llmbook._book.site begin` before the build"
        )
    (root / STAMP).write_text(pending.read_text())
    pending.unlink()


def fresh_site(root: Path = ROOT) -> Path | None:
    """_build/html when a successful build stamped it from the sources as they are now, else None."""
    stamp = root / STAMP
    if stamp.is_file() and stamp.read_text() == source_digest(root):
        return stamp.parent
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    steps = {"begin": begin, "finish": finish}
    if len(args) != 1 or args[0] not in steps:
        print(f"usage: python -m llmbook._book.site {'|'.join(steps)}", file=sys.stderr)
        return 2
    steps[args[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main())

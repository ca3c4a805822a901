"""Execute the book's notebooks in parallel into the Jupyter cache that the book build reads.

Jupyter Book 1 executes notebooks one after another; on two cores the book builds in half the time
when they run two at a time first. Notebooks whose code is unchanged since their cached run are
skipped, exactly as the build itself would skip them. Afterwards it prints each notebook's stated CPU
budget beside the execution time that jupyter-cache recorded for the cached run, and flags the ones
over budget.

    python -m llmbook._book.execute [--workers N]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from llmbook._book.toc import toc_pages

ROOT = Path(__file__).resolve().parents[2]


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    """Every notebook listed in _toc.yml, in reading order."""
    return [root / f"{page}.ipynb" for page in toc_pages(root) if (root / f"{page}.ipynb").is_file()]


def stated_budget_minutes(path: Path) -> float:
    """The "**CPU budget:** about N minutes" a chapter states in its first cell (0 when it states none)."""
    import json
    import re

    cells = json.loads(path.read_text())["cells"]
    first = "".join(cells[0]["source"]) if cells else ""
    match = re.search(r"CPU budget:\*\*\s*about ([\d.]+) minute", first)
    return float(match.group(1)) if match else 0.0


def runs_alone(path: Path) -> bool:
    """True for a notebook whose metadata says ``"llmbook": {"runs_alone": true}``: it uses every core
    itself, so it runs after the others, alone (its stated budget assumes idle cores)."""
    import json

    metadata = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
    return bool(metadata.get("llmbook", {}).get("runs_alone", False))


def execute(workers: int, timeout: int, root: Path = ROOT) -> int:
    """Run every out-of-date notebook; return the number that failed (tracebacks are printed)."""
    from jupyter_cache import get_cache
    from jupyter_cache.executors import load_executor

    cache = get_cache(str(root / "_build" / ".jupyter_cache"))
    # Longest first (by the CPU budget each chapter states), so the final chapter's training does not
    # start last and run alone while the other worker idles.
    notebooks = sorted(toc_notebooks(root), key=stated_budget_minutes, reverse=True)
    for path in notebooks:
        cache.add_nb_to_project(str(path))
    stale = [str(p) for p in notebooks if not _is_cached(cache, p)]
    if not stale:
        print(f"all {len(notebooks)} notebooks are cached; nothing to execute")
        return 0
    # A notebook that trains on every core (chapter 8's two processes) runs after the others, alone.
    alone = [uri for uri in stale if runs_alone(Path(uri))]
    shared = [uri for uri in stale if uri not in alone]
    print(f"executing {len(stale)} of {len(notebooks)} notebooks, {workers} at a time"
          + (f", then {len(alone)} alone" if alone else ""))  # fmt: skip
    logger = logging.getLogger("llmbook.execute")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def serial(uris: list[str]):
        executor = load_executor("local-serial", cache, logger=logger)
        return executor.run_and_cache(filter_uris=uris, timeout=timeout, allow_errors=False)

    results = []
    if shared and workers > 1:
        results.append(_run_balanced(cache, shared, workers, timeout, logger))
    elif shared:
        results.append(serial(shared))
    results += [serial([uri]) for uri in alone]  # after the others: each needs every core
    failed = [uri for result in results for uri in (*result.errored, *result.excepted)]
    for uri in failed:
        record = cache.get_project_record(uri)
        print(f"\n=== {uri} failed ===\n{record.traceback}", file=sys.stderr)
    return len(failed)


def budget_report(root: Path = ROOT) -> tuple[str, list[str]]:
    """Each notebook's stated CPU budget beside its measured execution time (a table); those over budget."""
    from jupyter_cache import get_cache

    cache = get_cache(str(root / "_build" / ".jupyter_cache"))
    rows, over = [], []
    for path in toc_notebooks(root):
        name = str(path.relative_to(root))
        budget = stated_budget_minutes(path)
        cache.add_nb_to_project(str(path))
        record = cache.get_cached_project_nb(str(path))
        seconds = record.data.get("execution_seconds") if record is not None else None
        if seconds is None:
            measured, verdict = "not run", "no execution record for this version of the notebook"
        else:
            measured = f"{seconds / 60:.2f} min"  # two decimals: 0.52 is over a budget of 0.5
            verdict = "" if not budget else ("ok" if seconds <= budget * 60 else "OVER BUDGET")
        if verdict == "OVER BUDGET":
            over.append(name)
        rows.append((name, f"{budget:g} min" if budget else "-", measured, verdict))
    width = max(len(row[0]) for row in rows)
    lines = [f"{'notebook':{width}s}  {'stated':>8s}  {'measured':>8s}"]
    lines += [
        f"{name:{width}s}  {budget:>8s}  {measured:>8s}  {verdict}"
        for name, budget, measured, verdict in rows
    ]
    return "\n".join(lines), over


def _run_balanced(cache, uris: list[str], workers: int, timeout: int, logger):
    """jupyter-cache's parallel execution, but each worker takes the next notebook as soon as it is free.

    (jupyter-cache's own parallel executor uses `pool.map`, which hands each worker fixed chunks of three:
    the three longest chapters then queue behind each other on one worker while the other idles.)
    """
    import multiprocessing

    from jupyter_cache.executors import load_executor
    from jupyter_cache.executors.base import ExecutorRunResult
    from jupyter_cache.executors.basic import REPORT_LEVEL, ExecutionWorkerLocalMProc, ProcessData

    order = {uri: rank for rank, uri in enumerate(uris)}  # longest first, as sorted by the caller
    executor = load_executor("local-parallel", cache, logger=logger)
    records = sorted(executor.get_records(uris, None, clear_tracebacks=True), key=lambda r: order[r.uri])
    multiprocessing.log_to_stderr(REPORT_LEVEL if logger.level <= logging.INFO else logger.level)
    jobs = [ProcessData(r.pk, r.uri, cache, timeout, False) for r in records]
    with multiprocessing.Pool(workers) as pool:
        results = list(pool.imap_unordered(ExecutionWorkerLocalMProc(), jobs, chunksize=1))
    return ExecutorRunResult(
        succeeded=[uri for status, uri in results if status == 0],
        excepted=[uri for status, uri in results if status == 1],
        errored=[uri for status, uri in results if status == 2],
    )


def _is_cached(cache, path: Path) -> bool:
    import nbformat

    try:
        cache.match_cache_notebook(nbformat.read(path, as_version=4))
    except KeyError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="1 runs them in series")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    failed = execute(args.workers, args.timeout)
    table, over = budget_report()
    # Measured by jupyter-cache around each notebook's run (two notebooks share the 2 cores at a time,
    # except those that run alone).
    print(f"\nCPU budget stated in each notebook's first cell, beside its measured execution time:\n{table}")
    if over:
        print(f"over budget: {', '.join(over)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

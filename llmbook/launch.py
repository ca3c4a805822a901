"""Training on every CPU core: `train_processes(config, processes)` runs `llmbook.train.train` under
torchrun, one process per core, and returns the run's History.

On a small model PyTorch's threads barely help: each matrix product is too small to split well (on the
book's 2-core machine, one step of chapter 8's model takes about as long on two threads as on one). Two
processes with one thread each do twice the work: each computes the gradient of its half of the global
batch, and DistributedDataParallel averages the halves (`llmbook.distributed`), so the run follows the
trajectory of one process with the whole batch. The processes are a fresh `python -m torch.distributed.run
... -m llmbook train --config FILE`, exactly what a reader would type; their evaluation lines are echoed
here as they arrive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from llmbook.checkpoint import LOCK_OWNER_ENV, hold_checkpoint_dir, load_checkpoint
from llmbook.data import atomic_write
from llmbook.train_config import History, TrainConfig

__all__ = ["train_processes", "CONFIG_FILE"]

CONFIG_FILE = "train_config.json"  # written into the run's checkpoint_dir, next to the checkpoint


def train_processes(
    config: TrainConfig, processes: int = 2, threads_per_process: int = 1, log_every: int | None = None
) -> History:
    """Train `config` on `processes` CPU processes (torchrun, gloo) and return the History it saved.

    With ``config.progress`` rank 0 prints one line per evaluation; they are echoed here (only the steps
    that are multiples of `log_every`, and the last, when it is given).
    `config.checkpoint_dir` is required: the processes write the checkpoint there, and the History is
    read back from it. `config.batch_size` is the global batch and must divide among the processes.
    A failed run raises RuntimeError with the end of its error output; its last good checkpoint stays.
    """
    if not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be a positive integer, got {processes!r}")
    if config.checkpoint_dir is None:
        raise ValueError("train_processes needs config.checkpoint_dir: the History is read from there")
    if config.batch_size % processes:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by processes={processes}")
    directory = Path(config.checkpoint_dir)
    # Hold the folder from before its config file is written until the History is read back; the
    # processes share the hold (LOCK_OWNER_ENV), any other run is refused.
    with hold_checkpoint_dir(directory):
        return _run_processes(config, directory, processes, threads_per_process, log_every)


def _run_processes(
    config: TrainConfig, directory: Path, processes: int, threads_per_process: int, log_every: int | None
) -> History:
    config_file = directory / CONFIG_FILE
    text = json.dumps(config.to_dict(), indent=1)
    atomic_write(config_file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", "llmbook", "train", "--config", str(config_file),
    ]  # fmt: skip
    threads = str(threads_per_process)
    env = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": ""}
    env[LOCK_OWNER_ENV] = str(os.getpid())
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # stderr (progress bars, warnings) goes to a file: a pipe nobody reads would fill and stall the run.
    with tempfile.TemporaryFile("w+", encoding="utf-8") as stderr:
        with subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1
        ) as process:
            for line in process.stdout:  # rank 0's evaluation lines, as they come
                if _wanted(line, log_every, config.steps):
                    print(line.rstrip(), flush=True)
        stderr.seek(0)
        errors = stderr.read()
    if process.returncode != 0:
        raise RuntimeError(
            f"training on {processes} processes failed (exit {process.returncode}):\n{errors[-3000:]}"
        )
    return load_checkpoint(directory).history


def _wanted(line: str, log_every: int | None, last_step: int) -> bool:
    """Is this line of `llmbook train`'s output one to echo? ("step N: ..." lines, filtered)."""
    if not line.startswith("step "):
        return False
    step = line.removeprefix("step ").split(":")[0]
    if log_every is None or not step.isdigit():
        return True
    return int(step) % log_every == 0 or int(step) == last_step

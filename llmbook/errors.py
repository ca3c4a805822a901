"""The errors a user of llmbook can meet, and the field checks that configs are built from.

Every class is a `ValueError` or `TypeError` (or, for training, a `FloatingPointError`), so code that
catches those keeps working; the classes only say which boundary refused the input:

- `ConfigValueError` / `ConfigTypeError` (both `ConfigError`): a `ModelConfig`/`TrainConfig` field has
  the wrong type or value; ``error.field`` names it.
- `CorruptFileError`: a file is damaged, cut short or not the kind of file expected (checkpoint,
  token file, tokenizer files); the message names the path and what the file should be.
- `RunMismatchError`: a checkpoint or token file is fine but belongs to another run or model.
- `OverwriteError`: a run would replace another run's checkpoint; pass ``overwrite=True`` (``--overwrite``).
- `RunLockedError`: another live training run holds the checkpoint folder.
- `llmbook.train_config.NonFiniteLossError` / `DivergedError`: training produced NaN/inf, or blew up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any


class ConfigError(Exception):
    """A config field or a public function's argument was refused; `field` is its name (``"model.n_heads"``
    style for nested ones), which the command line turns into the flag's name."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class ConfigValueError(ConfigError, ValueError):
    """A config field has the right type but a value outside what it allows."""


class ConfigTypeError(ConfigError, TypeError):
    """A config field has the wrong type (a string for a bool, a float for an int, ...)."""


class CorruptFileError(ValueError):
    """A file is damaged, cut short, or not the kind of file it was given as."""


class RunMismatchError(ValueError):
    """A checkpoint or data file belongs to another run or model than the one asking for it."""


class OverwriteError(FileExistsError):
    """Writing would destroy another run's checkpoint without an explicit overwrite."""


class RunLockedError(BlockingIOError):
    """Another training run, still alive, holds the checkpoint folder (its lock file) for its whole life."""


# ----------------------------------------------------------------------------------------------------
# Field checks: each returns the value (normalised where that is lossless) or raises a ConfigError.


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


# The largest seed: torch seeds are 64-bit, and a run derives seed + 1 + rank from its seed.
MAX_SEED = 2**63 - 1


def check_int(
    owner: str,
    name: str,
    value: Any,
    minimum: int | None = 1,
    optional: bool = False,
    maximum: int | None = None,
) -> Any:
    """An int (not a bool, not a float such as 4.0) in [minimum, maximum]; None allowed when optional."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "an integer or None" if optional else "an integer"
        raise ConfigTypeError(f"{owner}.{name} must be {expected}, got {_describe(value)}", name)
    if minimum is not None and value < minimum:
        raise ConfigValueError(f"{owner}.{name} must be >= {minimum}, got {value}", name)
    if maximum is not None and value > maximum:
        raise ConfigValueError(f"{owner}.{name} must be <= {maximum}, got {value}", name)
    return value


def check_float(
    owner: str,
    name: str,
    value: Any,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    optional: bool = False,
) -> Any:
    """A finite real number (an int is fine, a bool or string is not) within the given bounds."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        expected = "a number or None" if optional else "a number"
        raise ConfigTypeError(f"{owner}.{name} must be {expected}, got {_describe(value)}", name)
    if not math.isfinite(value):
        raise ConfigValueError(f"{owner}.{name} must be a finite number, got {value}", name)
    if minimum is not None and value < minimum:
        raise ConfigValueError(f"{owner}.{name} must be >= {minimum}, got {value}", name)
    if above is not None and value <= above:
        raise ConfigValueError(f"{owner}.{name} must be > {above}, got {value}", name)
    if below is not None and value >= below:
        raise ConfigValueError(f"{owner}.{name} must be < {below}, got {value}", name)
    return value


def check_bool(owner: str, name: str, value: Any) -> bool:
    """True or False only: "no", 0 and 1 are refused rather than guessed at."""
    if not isinstance(value, bool):
        raise ConfigTypeError(f"{owner}.{name} must be True or False, got {_describe(value)}", name)
    return value


def check_choice(owner: str, name: str, value: Any, allowed: Sequence[str]) -> str:
    """One of the strings in `allowed`."""
    if not isinstance(value, str) or value not in allowed:
        raise ConfigValueError(f"{owner}.{name} must be one of {tuple(allowed)}, got {value!r}", name)
    return value


def check_str(owner: str, name: str, value: Any, optional: bool = False) -> Any:
    """A non-empty string (a path-like is turned into its string); None allowed when optional."""
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        expected = "a non-empty string or None" if optional else "a non-empty string"
        raise ConfigTypeError(f"{owner}.{name} must be {expected}, got {_describe(value)}", name)
    return value


# ----------------------------------------------------------------------------------------------------
# Memory: sizes are checked against what the device has before anything that large is allocated.


def available_memory(device: Any) -> int | None:
    """Bytes free for new tensors on `device` (a torch.device): the GPU's free memory, or the host's
    MemAvailable from /proc/meminfo (free physical pages elsewhere); None when it cannot be read."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3g} GiB"


def check_fits_in_memory(n_bytes: float, device: Any, what: str, field: str) -> None:
    """Raise a ConfigValueError naming `field` when `what` needs more than the memory free on `device`."""
    free = available_memory(device)
    if free is not None and n_bytes > free:
        raise ConfigValueError(
            f"{what} needs at least {_gib(n_bytes)}, but only {_gib(free)} of memory is free on "
            f"{getattr(device, 'type', device)}",
            field,
        )

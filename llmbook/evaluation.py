"""Measuring a model on a token stream: next-token loss in nats per token.

`evaluate` is the periodic, sampled estimate the training loop logs (fixed random batches, the same
every time); `evaluate_exact` runs the model over a whole token stream once, each token after the
first predicted exactly once: the number a finished run reports (chapter 8, `llmbook.bench quality`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from jaxtyping import Int
from torch import Tensor, nn

from llmbook.tokens import batch_starts, windows


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: np.ndarray,
    batch_size: int,
    context_length: int,
    n_batches: int,
    seed: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """Mean next-token loss (nats/token) over `n_batches` batches drawn from a fresh generator seeded
    with `seed`, so every evaluation of a run sees the same windows. With world_size > 1 each process
    computes its slice of every batch and the result is the average over processes."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    local = batch_size // world_size
    total = torch.zeros((), device=device)
    for _ in range(n_batches):
        starts = batch_starts(len(tokens), batch_size, context_length, generator)
        x, y = windows(tokens, starts[rank * local : (rank + 1) * local], context_length, device)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            total += model(x, y)  # the model's own loss (TransformerLM.forward with targets)
    model.train(was_training)
    mean = total / n_batches
    if world_size > 1:
        dist.all_reduce(mean, op=dist.ReduceOp.SUM)
        mean = mean / world_size
    return mean.item()


def _consecutive_windows(
    stream: Int[Tensor, " n"], context_length: int, batch_size: int
) -> list[tuple[Int[Tensor, "rows context"], Int[Tensor, "rows context"]]]:
    """(inputs, targets) blocks covering stream[1:] once: full windows in batches, then the remainder."""
    n_targets = len(stream) - 1
    n_full = n_targets // context_length
    full = n_full * context_length
    blocks = []
    if n_full:
        inputs = stream[:full].view(n_full, context_length)
        targets = stream[1 : full + 1].view(n_full, context_length)
        for start in range(0, n_full, batch_size):
            blocks.append((inputs[start : start + batch_size], targets[start : start + batch_size]))
    if full < n_targets:
        blocks.append((stream[full:n_targets][None], stream[full + 1 :][None]))
    return blocks


@torch.no_grad()
def evaluate_exact(
    model: nn.Module, tokens: Int[Tensor, " n"] | np.ndarray, context_length: int, batch_size: int = 64
) -> tuple[float, int]:
    """(mean nats per predicted token, number of predicted tokens) over a whole token stream.

    Consecutive windows of `context_length` inputs; the targets are the same stream shifted by one, so
    tokens[1:] are each predicted exactly once (the last window may be shorter).
    """
    stream = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if stream.ndim != 1 or len(stream) < 2:
        raise ValueError(f"tokens must be a 1-D stream of at least 2 ids, got shape {tuple(stream.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nats = 0.0
    for inputs, targets in _consecutive_windows(stream, context_length, batch_size):
        logits = model(inputs.to(device)).float()
        nats = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.to(device).flatten(), reduction="sum"
        )
        total_nats += nats.item()
    model.train(was_training)
    n_targets = len(stream) - 1
    return total_nats / n_targets, n_targets

"""Running the training loop on several processes with DistributedDataParallel.

`torchrun --nproc_per_node=N -m llmbook train` starts N processes and describes the group in
environment variables (WORLD_SIZE, RANK, LOCAL_RANK); `setup_distributed` joins it. Every process
draws the same global batch offsets from the same generator and takes its own contiguous slice of rows;
DDP averages the gradients, so N processes follow the same trajectory as one process with the whole
batch, up to the rounding of the all-reduce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from llmbook.errors import ConfigValueError


@dataclass
class Distributed:
    """This process's place in a run: its rank among world_size processes and its device."""

    rank: int
    world_size: int
    device: torch.device
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: Tensor) -> Tensor:
        """The average of a scalar over all processes."""
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value = value / self.world_size
        return value

    def gather(self, tensor: Tensor) -> list[Tensor]:
        """Every process's copy of a same-shaped tensor, in rank order."""
        if self.world_size == 1:
            return [tensor]
        on_device = tensor.to(self.device)  # nccl only moves GPU tensors
        gathered = [torch.empty_like(on_device) for _ in range(self.world_size)]
        dist.all_gather(gathered, on_device)
        return [t.cpu() for t in gathered]


def usable_device(name: str) -> torch.device:
    """The device `name` names ("auto": cuda when available, else cpu), checked to exist on this machine;
    a ConfigValueError naming the "device" field otherwise (a typo, or cuda on a CPU-only torch)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigValueError(
            f"device must be 'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:0', got {name!r}",
            "device",
        ) from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:  # a CPU-only torch asserts; a missing GPU index raises
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigValueError(
            f"device {name!r} is not usable on this machine ({reason}); use 'cpu' or 'auto'", "device"
        ) from None
    return device


def setup_distributed(device_name: str) -> Distributed:
    """Join the process group torchrun describes in the environment (if any) and pick this rank's device."""
    usable_device(device_name)
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    initialized_here = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        initialized_here = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank = 0
    if use_cuda:
        if world_size > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            device = torch.device("cuda" if device_name == "auto" else device_name)
        if device.index is None:  # "cuda" -> "cuda:N", so RNG states and DDP know which GPU
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu" if device_name == "auto" else device_name)
    return Distributed(rank, world_size, device, initialized_here)

"""torch.distributed, the plain way: one process per CPU worker or GPU, launched by torchrun.

Without torchrun every function here is a no-op answer for a single process (rank 0 of 1), so
the rest of the code reads the same either way. torchrun tells each process its place through
the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): that is its launch
protocol, so it is read here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from utils.errors import UserError


@dataclasses.dataclass(frozen=True)
class Place:
    """Where this process stands: rank among world_size processes, and its device."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process writes files, prints and shows progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device) -> Place:
    """Join the process group when launched by torchrun: gloo on CPU, NCCL with one GPU per
    local rank on CUDA. Otherwise a single process on `device`."""
    if not launched_by_torchrun():
        return Place(device=device)
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started local rank {local_rank} but this machine has "
                            f"{torch.cuda.device_count()} GPUs; use --nproc_per_node <= the GPU count.")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Place(dist.get_rank(), dist.get_world_size(), device)


def stop(place: Place) -> None:
    if place.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, place: Place) -> nn.Module:
    """DistributedDataParallel averages gradients across processes during backward()."""
    if not place.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[place.device.index] if place.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The network itself, so that checkpoints never hold DDP's 'module.' prefixes."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def gather(value: Any, place: Place) -> list:
    """Every process's `value`, in rank order, on every process."""
    if not place.distributed:
        return [value]
    values = [None] * place.world_size
    dist.all_gather_object(values, value)
    return values


def any_process(flag: bool, place: Place) -> bool:
    """True on every process if `flag` is True on any (e.g. a time limit), so all stop together."""
    if not place.distributed:
        return flag
    tensor = torch.tensor([float(flag)], device=place.device if place.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier(place: Place) -> None:
    if place.distributed:
        dist.barrier()

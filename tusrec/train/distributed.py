"""Data-parallel training across processes (torch DDP), started by torchrun.

    torchrun --nproc-per-node N -m tusrec train DATA --out RUN --config CONFIG ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each process;
without them (a plain ``tusrec train``) there is one process and nothing here does
anything. Each process draws its share of every step's global batch (the clips
rank * B/N .. (rank+1) * B/N - 1, sampler.StepBatches), DDP averages the gradients, and
only rank 0 writes checkpoints, the log and the weights manifest.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tusrec.train.config import TrainError

# Rank 0 may build the data cache while the others wait at a barrier: allow it hours.
INIT_TIMEOUT = datetime.timedelta(hours=4)


@dataclass
class Context:
    """Where this process stands: rank of world processes; device its accelerator."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that writes files (rank 0)."""
        return self.rank == 0

    def clips(self, batch_size: int) -> range:
        """This process's clip indices of a global batch of ``batch_size`` clips."""
        if batch_size % self.world:
            raise TrainError(
                f"batch_size {batch_size} does not split over {self.world} processes: "
                f"use a multiple of {self.world}"
            )
        share = batch_size // self.world
        return range(self.rank * share, (self.rank + 1) * share)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """Each value averaged over the processes (float64), the same on every process."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on one (e.g. a time limit reached)."""
        if not self.distributed:
            return flag
        return self.sum([float(flag)])[0] > 0


def context(device: torch.device) -> Context:
    """This process's Context, joining the process group when torchrun started it.

    ``device``: the device asked for (pick_device). Under torchrun a cuda device becomes
    cuda:LOCAL_RANK (one GPU a process; NCCL), a cpu one stays (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context(0, 1, device)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=INIT_TIMEOUT)
    return Context(rank, world, device)

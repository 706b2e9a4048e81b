"""Process group and device: everything that differs between a GPU cluster and a CPU box is decided
here, once, at start-up. How the model is sharded is the engine's (megamora.engines)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamora.config import ParallelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launched(self) -> bool:
        """True under a launcher (torchrun, deepspeed, srun via torchrun): RANK is set."""
        return "RANK" in os.environ


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg: ParallelConfig) -> DistInfo:
    """Join the process group of a torchrun or deepspeed launch (NCCL on CUDA, gloo on CPU). A plain
    `python launch/pretrain.py` runs as one process with no group at all, except under DeepSpeed,
    which always needs one: it gets a group of one."""
    launched = "RANK" in os.environ
    if not launched and cfg.engine != "deepspeed":
        return DistInfo(0, 1, 0, pick_device(cfg.device))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        device_id = device if device.type == "cuda" else None
        if launched:
            dist.init_process_group(backend=backend, device_id=device_id)
        else:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it even for one process
            dist.init_process_group(backend=backend, device_id=device_id, rank=0, world_size=1,
                                    store=dist.HashStore())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def process_group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def destroy_distributed() -> None:
    if process_group_active():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """Leave without the interpreter's teardown once everything is saved and the process group is
    destroyed: under load, gloo's (and DeepSpeed's shm) C++ threads can still be joinable when the
    interpreter finalises, and std::terminate then turns a finished rank into a SIGABRT (exit -6)
    that torchrun or mp.spawn reports as a failure."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks in fp64 (identity without a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()

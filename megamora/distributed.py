"""Process group and device: everything that differs between a GPU cluster and a CPU box is decided
here, once, at start-up. How the model is sharded is the engine's (megamora.engines)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

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
    fp32_matmul_precision: str = "highest"  # in force for this process's fp32 matmuls

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launched(self) -> bool:
        """True under a launcher (torchrun, deepspeed, srun via torchrun): RANK is set."""
        return "RANK" in os.environ


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """The GPU of this local rank: LOCAL_RANK modulo the GPUs this process sees, so that both layouts
    work: every rank of a node sees all of its GPUs (torchrun: rank i takes cuda:i), or each task
    sees only its own (srun --gpus-per-task, CUDA_VISIBLE_DEVICES per rank: cuda:0)."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def set_fp32_matmul_precision(precision: str, device: torch.device) -> str:
    """Apply parallel.fp32_matmul_precision on CUDA ("high": TF32 tensor cores; torch's default is
    "highest", true fp32 GEMMs at a fraction of the speed) and return the precision in force. On CPU
    nothing is set: torch's global setting would reach oneDNN there too ("medium" computes fp32 GEMMs
    in bf16 on CPUs with AVX512-BF16), and CPU runs keep their exact fp32 numerics."""
    if device.type != "cuda":
        return "highest"
    torch.set_float32_matmul_precision(precision)
    return precision


@contextlib.contextmanager
def exact_fp32_matmuls():
    """fp32 matmuls in true fp32 inside (also as a decorator), whatever parallel.fp32_matmul_precision
    set: an adapter's dW must be exact for a merge to compute the forward's function, and TF32 would
    round M, A and B to 10 mantissa bits. A no-op where nothing was set (CPU runs)."""
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def cpus_per_rank() -> int:
    """This rank's share of the CPUs it may run on: the affinity set (what srun --cpus-per-task or
    taskset gave the process) split among the ranks that share it (torchrun's LOCAL_WORLD_SIZE);
    at least 1. Used for the tokenizer's threads, which would otherwise use every core in every rank."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - no affinity API (macOS)
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def init_distributed(cfg: ParallelConfig) -> DistInfo:
    """Join the process group of a torchrun or deepspeed launch (NCCL on CUDA, gloo on CPU). A plain
    `python launch/pretrain.py` runs as one process with no group at all, except under DeepSpeed,
    which always needs one: it gets a group of one."""
    launched = "RANK" in os.environ
    if not launched and cfg.engine != "deepspeed":
        device = pick_device(cfg.device)
        return DistInfo(0, 1, 0, device, set_fp32_matmul_precision(cfg.fp32_matmul_precision, device))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        device_id = device if device.type == "cuda" else None
        timeout = timedelta(seconds=cfg.timeout_s)  # how long a collective may wait for the slowest rank
        if launched:
            dist.init_process_group(backend=backend, device_id=device_id, timeout=timeout)
        else:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it even for one process
            dist.init_process_group(backend=backend, device_id=device_id, timeout=timeout, rank=0, world_size=1,
                                    store=dist.HashStore())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device,
                    set_fp32_matmul_precision(cfg.fp32_matmul_precision, device))


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


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks in fp64 (identity without a process group): one collective
    and one read to the host. `values` may be a tensor already on the device."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()

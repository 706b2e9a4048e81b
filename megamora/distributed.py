"""Process group, device and FSDP2 sharding: everything that differs between a GPU cluster and a CPU box
is decided here, once, at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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
    def sharded(self) -> bool:
        """True when the model is wrapped with FSDP2 (any torchrun launch, even with one rank)."""
        return dist.is_available() and dist.is_initialized()


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg: ParallelConfig) -> DistInfo:
    """Join the torchrun process group if launched by torchrun (NCCL on CUDA, gloo on CPU); a plain
    `python launch/pretrain.py` runs as one process with no group at all."""
    if "RANK" not in os.environ:
        return DistInfo(0, 1, 0, pick_device(cfg.device))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over all ranks in fp64 (identity without a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def shard_model(model: nn.Module, cfg: ParallelConfig) -> nn.Module:
    """FSDP2: fully_shard every transformer block, then the root (embeddings, final norm, head).
    Parameters are kept in fp32; `param_dtype` is the compute dtype of the unsharded copies and
    `reduce_dtype` the dtype of the gradient reduce-scatter."""
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype])
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    for block in model.layers:
        block.activation_checkpointing = enabled

"""Whole-tensor access to parameters and optimizer state, however an engine holds them: plain
tensors, FSDP2 DTensor shards, DeepSpeed ZeRO partitions (with their fp32 master copies).

Merges, restarts, the optimizer reset and the seeded init work on full tensors through these
functions, so they are written once for every engine. Each engine module contributes one access
class (`owns`, `full`, `set_full_`, ...); the first that owns a tensor handles it. Functions on a
sharded tensor are collectives: every rank calls them in the same order with the same values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Callable, Optional

import torch

from megamora.engines.deepspeed import ZeroAccess
from megamora.engines.fsdp2 import DTensorAccess

InitFn = Callable[[torch.Tensor, torch.Generator], None]


class PlainAccess:
    """Ordinary tensors on one process (or replicated on every rank)."""

    @staticmethod
    def owns(t: torch.Tensor) -> bool:
        return True

    @staticmethod
    def full(t: torch.Tensor) -> torch.Tensor:
        return t.detach()

    @staticmethod
    @torch.no_grad()
    def set_full_(t: torch.Tensor, value: torch.Tensor) -> None:
        t.copy_(value.to(device=t.device, dtype=t.dtype).view_as(t))

    @staticmethod
    @torch.no_grad()
    def add_full_(t: torch.Tensor, update: torch.Tensor) -> None:
        t.copy_((t.float() + update.to(t.device).float()).to(t.dtype))

    @staticmethod
    def optimizer_state(optimizer, param, key: str) -> Optional[torch.Tensor]:
        value = optimizer.state.get(param, {}).get(key)
        return None if value is None else full_tensor(value)

    @staticmethod
    def set_optimizer_state_(optimizer, param, key: str, value: torch.Tensor) -> None:
        set_full_(optimizer.state[param][key], value)

    @staticmethod
    @torch.no_grad()
    def reset_step_(optimizer, params: list[torch.Tensor]) -> None:
        for p in params:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                _local(step).zero_()
            elif step is not None:
                optimizer.state[p]["step"] = 0


# Most specific first; PlainAccess takes everything else.
_ACCESS = (DTensorAccess, ZeroAccess, PlainAccess)


def _access(t: torch.Tensor):
    return next(a for a in _ACCESS if a.owns(t))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if DTensorAccess.owns(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of `t` (gathered if sharded; a trainable ZeRO parameter's fp32 master)."""
    return _access(t).full(t)


def dcp_loadable(t: torch.Tensor) -> bool:
    """Whether torch.distributed.checkpoint can load into `t` in place: a plain tensor or an FSDP2
    shard (not a ZeRO partition, whose truth is DeepSpeed's flat master copy)."""
    return _access(t) is not ZeroAccess


def set_full_(t: torch.Tensor, value: torch.Tensor) -> None:
    """t = value, given the full value on every rank (and DeepSpeed's fp32 master copy with it)."""
    _access(t).set_full_(t, value)


def add_full_(t: torch.Tensor, update: torch.Tensor) -> None:
    """t += update in fp32, given the full update on every rank."""
    _access(t).add_full_(t, update)


def optimizer_state(optimizer, param: torch.Tensor, key: str) -> Optional[torch.Tensor]:
    """The full optimizer state `key` (exp_avg, ...) of `param`, or None before its first step."""
    return _access(param).optimizer_state(optimizer, param, key)


def set_optimizer_state_(optimizer, param: torch.Tensor, key: str, value: torch.Tensor) -> None:
    _access(param).set_optimizer_state_(optimizer, param, key, value)


def reset_step_(optimizer, params: Iterable[torch.Tensor]) -> None:
    """Set the optimizer step count of `params` to 0 (AdamW's bias correction starts again)."""
    params = list(params)
    for access in _ACCESS:
        mine = [p for p in params if _access(p) is access]
        if mine:
            access.reset_step_(optimizer, mine)


def seed_for(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def seeded_fill_(param: torch.Tensor, fill: InitFn, seed: int, key: str, owner: Optional[int] = None) -> None:
    """Fill `param` with `fill` applied to the full tensor, drawn on the CPU from a generator seeded
    by (seed, key): the values never depend on how (or whether) the tensor is sharded, nor on the
    device. `owner` (an index: the model's init passes each parameter's) spreads the drawing of
    sharded tensors over the ranks: one rank draws, the others receive their slices, so start-up
    draws the model once in all rather than once per rank."""
    shape = param.shape if not ZeroAccess.owns(param) else ZeroAccess.shape(param)

    def draw() -> torch.Tensor:
        full = torch.empty(shape, dtype=torch.float32)
        fill(full, torch.Generator().manual_seed(seed_for(seed, key)))
        return full

    if owner is not None and DTensorAccess.owns(param):
        DTensorAccess.set_full_from_(param, draw, owner)
    else:
        set_full_(param, draw())

"""PyTorch FSDP2 (`fully_shard`), the default engine; also a plain single process when launched
without torchrun (no process group: nothing is sharded and bf16 comes from autocast).

Every transformer block is its own FSDP unit, then the root (embeddings, final norm, head).
Parameters stay fp32 and sharded; `parallel.param_dtype` is the dtype of the unsharded compute
copies and `parallel.reduce_dtype` that of the gradient reduce-scatter. Checkpoints are DCP
(torch.distributed.checkpoint): they reshard on load, so a run saved on N ranks resumes on M.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from megamora.distributed import DTYPES, process_group_active
from megamora.engines.base import Engine


class FSDP2Engine(Engine):
    name = "fsdp2"

    @property
    def sharded(self) -> bool:
        return process_group_active()

    def shard(self, model: nn.Module) -> None:
        if not self.sharded:
            return
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[self.cfg.parallel.param_dtype],
                                  reduce_dtype=DTYPES[self.cfg.parallel.reduce_dtype])
        for block in model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = self.module = model
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.accum = self.cfg.grad_accum_steps(self.dist.world_size)

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        # Sharded, the mixed-precision policy casts; one plain process uses autocast instead.
        return None if self.sharded else super().autocast_dtype

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        if self.sharded:  # reduce-scatter gradients only after the last micro-batch
            self.module.set_requires_gradient_sync(last_micro_batch)
        (loss / self.accum).backward()

    def step(self) -> float:
        grad_norm = clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def save(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        _dcp(dcp.save, {"model": model_sd, "optim": optim_sd}, path)

    def load(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        _dcp(dcp.load, state, path)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    @staticmethod
    def read_model(path: Path, model: nn.Module) -> None:
        model_sd = get_model_state_dict(model)
        _dcp(dcp.load, {"model": model_sd}, path)
        set_model_state_dict(model, model_sd)


def _dcp(fn, state: dict, path: Path) -> None:
    """dcp.save / dcp.load, also in one process without a process group (no warning about it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, checkpoint_id=str(path), no_dist=not process_group_active())


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> float:
    """Global grad norm over (possibly sharded) parameters; clips in place when max_norm > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):  # reduce the per-shard norms into the global one
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total.item()


class DTensorAccess:
    """FSDP2 shards: every rank holds a slice of the full tensor (megamora.engines.tensors)."""

    @staticmethod
    def owns(t: torch.Tensor) -> bool:
        return isinstance(t, DTensor)

    @staticmethod
    def full(t: DTensor) -> torch.Tensor:
        return t.full_tensor()

    @staticmethod
    def _my_slice(t: DTensor, full: torch.Tensor) -> torch.Tensor:
        # src_data_rank=None: every rank already has the full value, so no broadcast
        local = distribute_tensor(full.to(t.device), t.device_mesh, t.placements, src_data_rank=None).to_local()
        return local

    @staticmethod
    @torch.no_grad()
    def set_full_(t: DTensor, value: torch.Tensor) -> None:
        shard = t.to_local()
        shard.copy_(DTensorAccess._my_slice(t, value))

    @staticmethod
    @torch.no_grad()
    def add_full_(t: DTensor, update: torch.Tensor) -> None:
        # each rank adds its own slice: no gather of the (large) base weight
        shard = t.to_local()
        shard.copy_((shard.float() + DTensorAccess._my_slice(t, update).float()).to(shard.dtype))

    @staticmethod
    def optimizer_state(optimizer, param, key: str) -> Optional[torch.Tensor]:
        value = optimizer.state.get(param, {}).get(key)
        if value is None:
            return None
        return value.full_tensor() if isinstance(value, DTensor) else value.detach()

    @staticmethod
    def set_optimizer_state_(optimizer, param, key: str, value: torch.Tensor) -> None:
        state = optimizer.state[param][key]
        if isinstance(state, DTensor):
            DTensorAccess.set_full_(state, value)
        else:
            state.copy_(value)

    @staticmethod
    @torch.no_grad()
    def reset_step_(optimizer, params: list[torch.Tensor]) -> None:
        for p in params:
            step = optimizer.state.get(p, {}).get("step")
            if step is not None:
                (step.to_local() if isinstance(step, DTensor) else step).zero_()

"""The engine interface: everything that depends on how the model is distributed (FSDP2, DeepSpeed
ZeRO, one plain process). The Trainer, checkpoints, adapters, restarts and the optimizer reset talk
to an Engine or to `megamora.engines.tensors`, never to DTensor or DeepSpeed directly.

Life cycle, as `megamora.run` drives it:

    engine = build_engine(cfg, dist)      # checks its inputs (e.g. DeepSpeed installed) first
    engine.shard(model)                   # on the meta-device model, before the seeded init
    materialize(model, ...)               # seeded values, identical for any sharding
    engine.setup(model, optimizer)        # wraps model and optimizer (ZeRO-3 partitioned in shard)
    loss = engine(tokens, targets); engine.backward(loss, last_micro); grad_norm = engine.step()
    engine.save(path) / engine.load(path) # model + optimizer state of one checkpoint
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from megamora.config import TrainConfig
from megamora.distributed import DTYPES, DistInfo, destroy_distributed


class Engine(ABC):
    name: ClassVar[str]
    # True when `load` restores every parameter of the model (the checkpoint's keys are checked
    # against the model's): a resume then skips drawing initial values it would overwrite.
    load_restores_all_parameters: ClassVar[bool] = False

    def __init__(self, cfg: TrainConfig, dist: DistInfo):
        self.cfg = cfg
        self.dist = dist
        self.model: Optional[nn.Module] = None  # what forward runs through (the engine's wrapper)
        self.module: Optional[nn.Module] = None  # the Llama itself (named_parameters, iter_adapters, ...)
        self.optimizer: Any = None  # what optimizer-state access and param_groups go through

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        """Raise ValueError (one line) for anything this engine cannot run, before any work."""

    @abstractmethod
    def shard(self, model: nn.Module) -> None:
        """Prepare the meta-device model for sharding (before it gets values)."""

    @abstractmethod
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Wrap the materialised model and the project's optimizer."""

    def __call__(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Forward pass: tokens (batch, seq) -> logits, or with targets the mean cross-entropy."""
        return self.model(tokens) if targets is None else self.model(tokens, targets=targets)

    @abstractmethod
    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """Backward of one micro-batch's mean loss; gradients are averaged over the accumulation
        steps and synchronised across ranks only after the last micro-batch."""

    @abstractmethod
    def step(self) -> torch.Tensor:
        """Clip to optim.grad_clip, take the optimizer step, clear gradients; return the global grad
        norm as a 0-d tensor, without waiting for the device (the Trainer reads it on log steps)."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write model and optimizer state into the (new, empty) directory `path`. Collective."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Restore model and optimizer state saved by `save` with a compatible engine. Collective."""

    @staticmethod
    @abstractmethod
    def read_model(path: Path, model: nn.Module) -> None:
        """Load the model weights of checkpoint `path` into a plain, unsharded `model` in one
        process without a process group (what the tools and warm starts use)."""

    @classmethod
    def destroy_process_group(cls) -> None:
        """Tear down the process group (and whatever the engine keeps about it)."""
        destroy_distributed()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:  # lr_scale: a group at a multiple of the LR (LoRA+'s B)
            group["lr"] = lr * group.get("lr_scale", 1.0)

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The dtype of torch.autocast around forward, or None where the engine casts itself."""
        dtype = DTYPES[self.cfg.parallel.param_dtype]
        return dtype if dtype != torch.float32 else None

    def autocast(self):
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def checkpoint_info(self) -> dict[str, Any]:
        """What a checkpoint records about the engine that wrote it (trainer_state.json)."""
        return {"engine": self.name, "world_size": self.dist.world_size}

    def check_resume(self, info: dict[str, Any], path: Path) -> None:
        """Raise ValueError (one line) if this engine cannot load a checkpoint saved with `info`."""
        saved = info.get("engine", "fsdp2")
        if saved != self.name:
            raise ValueError(f"{path} was saved by the {saved} engine; this run uses parallel.engine={self.name} "
                             f"(resume on the engine that wrote it, or export it with tools/merge_checkpoint.py)")

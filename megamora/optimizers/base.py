"""The protocol of an optimizer method (what megamora.optimizers.OPTIMIZERS names):

    check_config(cfg)          one-line ConfigError for a config the method cannot run, before any work
    build(model, cfg, seed)    the torch.optim.Optimizer over the model's trainable parameters
    state_bytes(cfg, world)    optimizer-state bytes per rank, for the --dry-run memory plan (None: AdamW's)
    label, colour, high_rank   how reports name and colour a run of it (megamora.methods)
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

from megamora.config import ConfigError, OptimConfig, TrainConfig


class OptimizerMethod:
    name: ClassVar[str]
    label: ClassVar[str] = "Full-rank"  # the row name in reports
    colour: ClassVar[str] = "#555555"
    high_rank: ClassVar[bool] = True  # Figure 5's family: full-rank updates

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        pass

    @classmethod
    def build(cls, model: nn.Module, cfg: OptimConfig, seed: int = 0) -> torch.optim.Optimizer:
        raise NotImplementedError

    @classmethod
    def state_bytes(cls, cfg: TrainConfig, world_size: int) -> Optional[int]:
        return None


def check_projection_options(section: str, options) -> None:
    """One-line ConfigError for the options every projecting method has (optim.<section>.rank, ...)."""
    for key in ("rank", "update_proj_gap"):
        if getattr(options, key) <= 0:
            raise ConfigError(f"optim.{section}.{key}={getattr(options, key)} must be positive")
    if not options.scale > 0:
        raise ConfigError(f"optim.{section}.scale={options.scale} must be positive")


def check_fsdp2_full_rank(cfg: TrainConfig, name: str) -> None:
    """The common refusals of an optimizer that projects the 2-D block weights' gradients."""
    if cfg.parallel.engine != "fsdp2":
        raise ConfigError(f"optim.name={name} needs parallel.engine=fsdp2: DeepSpeed's ZeRO optimizer steps flat "
                          "partitions of the parameters, not the 2-D matrices it projects")
    if cfg.adapter.kind != "none":
        raise ConfigError(f"optim.name={name} trains the full weights; adapter.kind={cfg.adapter.kind} "
                          "needs optim.name=adamw")

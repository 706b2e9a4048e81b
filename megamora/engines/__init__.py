"""Training engines behind one interface (megamora.engines.base.Engine): `fsdp2` (default) and
`deepspeed` (ZeRO 1/2/3). A new engine is one module here plus one line in ENGINES."""

from __future__ import annotations

import importlib

from megamora.config import TrainConfig
from megamora.distributed import DistInfo
from megamora.engines.base import Engine

# parallel.engine -> "module:class", imported on use (DeepSpeed is an optional dependency)
ENGINES = {
    "fsdp2": "megamora.engines.fsdp2:FSDP2Engine",
    "deepspeed": "megamora.engines.deepspeed:DeepSpeedEngine",
}


def engine_class(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise ValueError(f"parallel.engine={name!r} is not one of {sorted(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def check_engine(cfg: TrainConfig) -> None:
    """One-line ValueError for anything the configured engine cannot run (before any work)."""
    engine_class(cfg.parallel.engine).check(cfg)


def build_engine(cfg: TrainConfig, dist: DistInfo) -> Engine:
    return engine_class(cfg.parallel.engine)(cfg, dist)


__all__ = ["ENGINES", "Engine", "build_engine", "check_engine", "engine_class"]

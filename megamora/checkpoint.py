"""Distributed checkpoints (torch.distributed.checkpoint) that are never left half-written.

Layout of a run directory:
    run_dir/checkpoints/step_00000100/   DCP shards of model + optimizer, trainer_state.json,
                                         data/stream_<id>.json (one per data stream)
A checkpoint is written into `.tmp-step_*` and renamed once complete, so `latest_checkpoint` only
ever sees whole checkpoints. DCP reshards on load: a checkpoint saved on N ranks loads on M ranks
(or on one process without a process group).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.optim import Optimizer

from megamora.distributed import barrier

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _process_group_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dcp(fn, state: dict, path: Path) -> None:
    """dcp.save / dcp.load, also in one process without a process group (no warning about it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, checkpoint_id=str(path), no_dist=not _process_group_active())


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: Optimizer,
    trainer_state: dict[str, Any],
    data_state: dict[str, dict],
    keep_last: int,
    is_main: bool,
) -> Path:
    """Collective: every rank calls it. `data_state` holds this rank's streams only."""
    root = checkpoints_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed earlier
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _dcp(dcp.save, {"model": model_sd, "optim": optim_sd}, tmp)
    (tmp / "data").mkdir(exist_ok=True)
    for stream_id, state in data_state.items():
        _write_json(tmp / "data" / f"stream_{stream_id}.json", state)
    barrier()
    if is_main:
        _write_json(tmp / "trainer_state.json", {"step": step, **trainer_state})
        if final.exists():  # the same step saved twice (e.g. periodic + final): keep the newer
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory standing for its newest checkpoint."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a run directory with checkpoints")
    return latest


@torch.no_grad()
def load_base_weights(path: str | Path, model: nn.Module) -> None:
    """Load a full-rank checkpoint's weights into `model`, whose targeted layers may be wrapped by
    adapters (`q_proj.base.weight` <- `q_proj.weight`); the adapters keep their own initial values."""
    model_sd = get_model_state_dict(model)
    wanted = {k.replace(".base.", "."): v for k, v in model_sd.items() if ".base." in k or not _is_adapter_key(k)}
    _dcp(dcp.load, {"model": wanted}, Path(path))
    set_model_state_dict(model, model_sd)


def _is_adapter_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "M")


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "trainer_state.json").read_text())


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: Optimizer, stream_ids: list[int]) -> dict[str, dict]:
    """Load model and optimizer in place; return the data state of `stream_ids`."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    _dcp(dcp.load, state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    data_state = {}
    for sid in stream_ids:
        f = path / "data" / f"stream_{sid}.json"
        if not f.is_file():
            raise ValueError(f"checkpoint {path} has no data state for stream {sid}: it was saved with a different "
                             "global_batch_size / micro_batch_size split")
        data_state[str(sid)] = json.loads(f.read_text())
    return data_state


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())

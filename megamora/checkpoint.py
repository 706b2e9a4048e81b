"""Checkpoints that are never left half-written, whatever engine writes them.

Layout of a run directory:
    run_dir/checkpoints/step_00000100/   the engine's model + optimizer state (FSDP2: DCP shards;
                                         DeepSpeed: deepspeed/), trainer_state.json (step, engine,
                                         world size, restarts...), data/stream_<id>.json
A checkpoint is written into `.tmp-step_*` and renamed once complete, so `latest_checkpoint` only
ever sees whole checkpoints. FSDP2 checkpoints reshard on load (N ranks -> M ranks, or one process
without a process group); DeepSpeed ones resume on the same ZeRO stage and world size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megamora.distributed import barrier
from megamora.engines import Engine, engine_class
from megamora.engines.tensors import set_full_

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


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    engine: Engine,
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
    engine.save(tmp)
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    for stream_id, state in data_state.items():
        _write_json(tmp / "data" / f"stream_{stream_id}.json", state)
    barrier()
    if is_main:
        _write_json(tmp / "trainer_state.json", {"step": step, **engine.checkpoint_info(), **trainer_state})
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


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "trainer_state.json").read_text())


def saved_engine(path: str | Path) -> str:
    """The engine that wrote a checkpoint (checkpoints from before engines existed are FSDP2's)."""
    return read_trainer_state(path).get("engine", "fsdp2")


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Load a checkpoint's model weights into a plain, unsharded `model` (one process, no group),
    whichever engine wrote it."""
    engine_class(saved_engine(path)).read_model(Path(path), model)


@torch.no_grad()
def load_base_weights(path: str | Path, model: nn.Module) -> None:
    """Load a full-rank checkpoint's weights into `model` (plain or sharded), whose targeted layers
    may be wrapped by adapters (`q_proj.base.weight` <- `q_proj.weight`); the adapters keep their own
    initial values. Every rank reads the whole checkpoint and keeps its own part."""
    from megamora.model import build_model

    source = build_model(model.cfg, device="meta")
    source.to_empty(device="cpu")
    source.tie_weights()
    load_model_weights(path, source)
    weights = dict(source.named_parameters())
    for name, param in model.named_parameters():
        plain = name.replace(".base.", ".")
        if plain in weights:
            set_full_(param, weights[plain])


def load_checkpoint(path: str | Path, engine: Engine, stream_ids: list[int]) -> dict[str, dict]:
    """Load model and optimizer in place through the engine; return the data state of `stream_ids`."""
    path = Path(path)
    engine.load(path)
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

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
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import CheckpointException

from megamora.distributed import barrier, process_group_active
from megamora.engines import Engine, engine_class
from megamora import adapters
from megamora.engines.tensors import dcp_loadable, set_full_

if TYPE_CHECKING:
    from megamora.config import ModelConfig

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


class SaveFailed(Exception):
    """A checkpoint could not be written: its partial directory is gone, older checkpoints are kept."""


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    engine: Engine,
    trainer_state: dict[str, Any],
    data_state: dict[str, dict],
    keep_last: int,
    is_main: bool,
) -> Path:
    """Collective: every rank calls it. `data_state` holds this rank's streams only. If any rank
    fails to write (disk full, I/O error), every rank raises SaveFailed naming the cause, after the
    partial `.tmp-step_*` is removed; older checkpoints are only rotated out once the new one is whole,
    so the disk needs room for keep_last + 1 checkpoints."""
    root = checkpoints_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for debris in root.glob(".tmp-step_*"):  # saves that died earlier (the run lock keeps others out)
            shutil.rmtree(debris, ignore_errors=True)
    barrier()
    error = _agree(_attempt(lambda: _write(tmp, step, engine, trainer_state, data_state, is_main)))
    if error is None:
        error = _agree(_attempt(lambda: _publish(tmp, final, run_dir, keep_last)) if is_main else None)
    if error is not None:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()  # every rank leaves once the partial checkpoint is gone
        latest = latest_checkpoint(run_dir)
        intact = (f"checkpoints up to step {int(latest.name[5:])} are intact" if latest
                  else "there is no earlier checkpoint")
        raise SaveFailed(f"{error} while saving step {step}; {intact}")
    barrier()  # ends on a barrier: a rank may tear down gloo right after (a final or preemption save)
    return final


def _write(tmp: Path, step: int, engine: Engine, trainer_state: dict, data_state: dict, is_main: bool) -> None:
    engine.save(tmp)
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    for stream_id, state in data_state.items():
        _write_json(tmp / "data" / f"stream_{stream_id}.json", state)
    if is_main:
        _write_json(tmp / "trainer_state.json", {"step": step, **engine.checkpoint_info(), **trainer_state})


def _publish(tmp: Path, final: Path, run_dir: str | Path, keep_last: int) -> None:
    if final.exists():  # the same step saved twice (e.g. periodic + final): keep the newer
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)


def _attempt(fn: Callable[[], None]) -> str | None:
    """Run fn; None, or why it failed in a few words ("No space left on device")."""
    try:
        fn()
    except CheckpointException as e:  # DCP hands every rank the failures of all ranks
        rank = min(e.failures)
        return _cause(e.failures[rank][0])
    except Exception as e:
        return _cause(e)
    return None


def _cause(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    logging.getLogger("megamora").error("checkpoint write failed", exc_info=e)  # not an I/O error: a bug?
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _agree(error: str | None) -> str | None:
    """Collective: the lowest failing rank's error, or None if every rank succeeded."""
    if not process_group_active():
        return error
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory standing for its newest checkpoint; a damaged or
    crafted one fails here in one line (read_trainer_state), before a warm start or tool does any work."""
    path = Path(path)
    found = path if (path / "trainer_state.json").is_file() else latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a run directory with checkpoints")
    read_trainer_state(found)
    return found


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """trainer_state.json of checkpoint `path`, once its files are known to be whole and safe to
    load: a missing, truncated, corrupt or crafted file fails here with a one-line ValueError naming
    it, before a resume, warm start or tool loads anything (no pickle from the checkpoint is loaded)."""
    path = Path(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step recorded")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read trainer_state.json ({e})") from None
    _check_files(path, state.get("engine", "fsdp2"))
    return state


def _check_files(path: Path, engine: str) -> None:
    """Cheap whole-file checks: DCP's metadata (through its allow-list unpickler) and the shards at
    the sizes it lists; torch.save archives (DeepSpeed's) by their zip index, which a truncated file
    has lost, and their pickle, which a crafted file fills with code."""
    import zipfile

    from megamora.engines.fsdp2 import read_dcp_metadata

    if engine == "fsdp2":
        read_dcp_metadata(path)
        return
    for f in sorted(path.rglob("*.pt")):
        try:
            zipfile.ZipFile(f).close()
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{path}: cannot read {f.relative_to(path)} ({e})") from None
        _check_pickle(path, f)


def _check_pickle(path: Path, f: Path) -> None:
    """A torch.save archive's pickle through torch's weights-only unpickler (tensors memory-mapped,
    not read), so a crafted one is refused here, in one line naming it, before any run is set up."""
    import pickle

    from megamora.engines.deepspeed import weights_only_torch_load
    from megamora.engines.fsdp2 import error_cause

    try:
        with weights_only_torch_load():
            torch.load(f, map_location="cpu", mmap=True)
    except ImportError:  # DeepSpeed not installed: its reader says how to install it
        return
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: cannot read {f.relative_to(path)} ({error_cause(e)})") from None


def saved_engine(path: str | Path) -> str:
    """The engine that wrote a checkpoint (checkpoints from before engines existed are FSDP2's)."""
    return read_trainer_state(path).get("engine", "fsdp2")


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Load a checkpoint's model weights into a plain, unsharded `model` (one process, no group),
    whichever engine wrote it. Raises a one-line ValueError: CheckpointMismatch for the weights of
    another model (other keys or shapes), else naming the file that cannot be read."""
    from megamora.engines.fsdp2 import CheckpointMismatch, error_cause

    path = Path(path)
    engine = saved_engine(path)
    try:
        engine_class(engine).read_model(path, model)
    except ValueError:
        raise
    except Exception as e:  # e.g. DeepSpeed's reader; nn.Module.load_state_dict(strict=True) lists keys
        text = str(e)
        missing, unexpected = (_listed_keys(text, kind) for kind in ("Missing", "Unexpected"))
        shapes = re.findall(r"size mismatch for (\S+):", text)
        if missing or unexpected or shapes:
            raise CheckpointMismatch(path, missing, unexpected, shapes) from None
        raise ValueError(f"{path}: cannot read the {engine} checkpoint ({error_cause(e)})") from None


def _listed_keys(message: str, kind: str) -> list[str]:
    """The keys of a load_state_dict error's line `<kind> key(s) in state_dict: "a", "b".`"""
    line = next((x for x in message.splitlines() if x.strip().startswith(f"{kind} key(s) in state_dict:")), "")
    return re.findall(r'"([^"]+)"', line)


def resolve_warm_start(path: str | Path) -> Path:
    """What warm_start= names: a Hugging Face LlamaForCausalLM folder (its config.json and safetensors
    headers checked; no weight read), else a full-rank checkpoint or a run directory standing for its
    newest one (resolve_checkpoint). Fails in one line."""
    from megamora.hf import is_hf_folder, read_hf_folder

    path = Path(path)
    if is_hf_folder(path):
        read_hf_folder(path)
        return path
    return resolve_checkpoint(path)


def check_warm_start(path: str | Path, model_cfg: "ModelConfig") -> Path:
    """resolve_warm_start, and for a Hugging Face folder that its model is this run's: one line naming
    every setting that differs, with both values (a checkpoint's shapes are checked as it loads)."""
    from megamora.hf import is_hf_folder, model_differences, read_hf_folder

    resolved = resolve_warm_start(path)
    if is_hf_folder(resolved):
        differ = model_differences(read_hf_folder(resolved).model_cfg, model_cfg)
        if differ:
            what = "; ".join(f"{k}={a} in the folder vs {b} in this run" for k, (a, b) in differ.items())
            raise ValueError(f"warm_start={path} holds another model than this run's: {what}")
    return resolved


@torch.no_grad()
def load_base_weights(path: str | Path, model: nn.Module) -> None:
    """Load a full-rank checkpoint's weights, or a Hugging Face LlamaForCausalLM folder's (see
    resolve_warm_start), into `model` (plain or sharded), whose targeted layers may be wrapped by
    adapters (`q_proj.base.weight` <- `q_proj.weight`); the adapters keep their own initial values,
    but for those that follow the base weight (DoRA's magnitude: `init_from_base`). An FSDP2 checkpoint or a folder loads straight into the model's own (sharded) tensors: no rank
    holds a second, full copy of the model."""
    from megamora.hf import is_hf_folder, load_hf_weights, read_hf_folder

    targets = adapters.base_parameters(model)
    if is_hf_folder(path):
        load_hf_weights(read_hf_folder(path), model)
    elif saved_engine(path) == "fsdp2" and all(dcp_loadable(p) for p in targets.values()):
        _load_dcp_base_weights(Path(path), model, targets)
    else:
        _load_through_full_copy(path, model, targets)  # a DeepSpeed checkpoint, or ZeRO-partitioned parameters
    adapters.init_from_base(model)


def _load_dcp_base_weights(path: Path, model: nn.Module, targets: dict[str, torch.Tensor]) -> None:
    """DCP reads each rank's own slices of the plain model's weights into `targets` in place."""
    from megamora.engines.fsdp2 import CheckpointMismatch, _dcp_load, check_model_keys
    from megamora.model import build_model

    try:
        check_model_keys(path, build_model(model.cfg, device="meta").state_dict())
    except CheckpointMismatch as e:  # e.g. warm_start= names an adapter run
        raise ValueError(f"{path}: is not a full-rank checkpoint of this model's shapes: {e.detail}") from None
    _dcp_load({"model": {name: p.detach() for name, p in targets.items()}}, path)


def _load_through_full_copy(path: str | Path, model: nn.Module, targets: dict[str, torch.Tensor]) -> None:
    """Read the whole checkpoint into a plain model on the CPU, then give every tensor its value."""
    from megamora.engines.fsdp2 import CheckpointMismatch
    from megamora.model import build_model

    source = build_model(model.cfg, device="meta")
    source.to_empty(device="cpu")
    source.tie_weights()
    try:
        load_model_weights(path, source)
    except CheckpointMismatch as e:  # e.g. warm_start= names an adapter run
        raise ValueError(f"{path}: is not a full-rank checkpoint of this model's shapes: {e.detail}") from None
    weights = dict(source.named_parameters())
    for name, param in targets.items():
        set_full_(param, weights[name])


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

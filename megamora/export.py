"""A run directory -> its checkpoint, the trained model as a plain Llama (adapters merged), and its
initial weights.

This is what the tools build on: merging a checkpoint, dW analysis, perplexity and HF export. Loads
in one process without a process group, whatever the engine and number of ranks that saved it."""

from __future__ import annotations

from pathlib import Path

import torch

from megamora.adapters import apply_adapters, merge_adapters
from megamora.checkpoint import (
    latest_checkpoint,
    load_base_weights,
    load_model_weights,
    read_trainer_state,
    resolve_checkpoint,
    resolve_warm_start,
)
from megamora.config import TrainConfig, load_config
from megamora.engines.fsdp2 import CheckpointMismatch
from megamora.model import Llama, build_model, initial_state_dict, init_weights


def run_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: no config.yaml")
    return load_config(path)


def find_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """`checkpoint` as given (a checkpoint folder, a run folder, or a name under run_dir/checkpoints),
    or the newest checkpoint of the run. Raises FileNotFoundError naming what is missing."""
    run_config(run_dir)  # "not a run directory" comes first
    if checkpoint is None:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
        return found
    path = Path(checkpoint)
    if not path.exists() and (Path(run_dir) / "checkpoints" / path).exists():
        path = Path(run_dir) / "checkpoints" / path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    return resolve_checkpoint(path)


def load_merged_model(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[TrainConfig, Llama]:
    """The model of `checkpoint` (default: the newest in `run_dir`) with every adapter folded in."""
    cfg = run_config(run_dir)
    checkpoint = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints")
    state = read_trainer_state(checkpoint)  # a damaged checkpoint fails before the model is built
    model = build_model(cfg.model, device="meta")
    apply_adapters(model, cfg.adapter)
    model.to_empty(device="cpu")
    init_weights(model, cfg.seed, cfg.model.init_std)  # buffers; every parameter is then loaded
    mismatch = f"{checkpoint}: does not match {Path(run_dir) / 'config.yaml'}"
    if cfg.restarts.every:  # MoRA layers go back to the operator type they had when saved
        from megamora.restarts import Restarts

        saved = state.get("restarts")
        if not (isinstance(saved, dict) and isinstance(saved.get("count"), int)):
            raise ValueError(f"{mismatch}: restarts.every={cfg.restarts.every} but no restart count was saved")
        Restarts(cfg.restarts, cfg.seed, cfg.steps).load_state_dict(state["restarts"], model)
    try:
        load_model_weights(checkpoint, model)
    except CheckpointMismatch as e:  # e.g. config.yaml says lora, the checkpoint holds MoRA weights
        raise ValueError(f"{mismatch}: {e.detail}") from None
    return cfg, merge_adapters(model)


def initial_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """W_init of a run: reproduced exactly from its config and seed, or its warm start (a full-rank
    checkpoint or a Hugging Face folder)."""
    cfg = run_config(run_dir)
    if cfg.warm_start:
        model = build_model(cfg.model, device="cpu")
        load_base_weights(resolve_warm_start(cfg.warm_start), model)
        return model.state_dict()
    return initial_state_dict(cfg.model, cfg.seed)

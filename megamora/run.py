"""Build a training run from a TrainConfig (model -> adapters -> shard -> init, optimizer, data,
resume) and hand it to the Trainer. Inputs are checked before the run directory is touched."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from megamora import adapters
from megamora.checkpoint import (
    latest_checkpoint,
    load_base_weights,
    load_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
)
from megamora.config import ConfigError, TrainConfig, to_dict, to_yaml
from megamora.data import build_train_loader, check_data_source, validation_batches
from megamora.distributed import (
    DistInfo,
    init_distributed,
    process_group_active,
    set_activation_checkpointing,
)
from megamora.engines import build_engine, check_engine, engine_class
from megamora.metrics import MetricsLogger
from megamora.model import build_model, flops_per_token, materialize
from megamora.optim import build_optimizer
from megamora.tokenizer import load_tokenizer
from megamora.train import Trainer, grad_accum_steps

log = logging.getLogger("megamora")


@dataclass
class RunResult:
    run_dir: Path
    losses: list[float]  # per step, of the steps this process ran
    final_eval: dict[str, float]
    resumed_from: Path | None


def check_inputs(cfg: TrainConfig, dist: DistInfo):
    """Everything that can be wrong with the inputs, checked before any compute or file write;
    raised as one-line ConfigErrors."""
    try:
        check_engine(cfg)
        grad_accum_steps(cfg, dist.world_size)
        check_data_source(cfg.data)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        if cfg.warm_start:
            resolve_checkpoint(cfg.warm_start)
        check_resume(cfg, dist)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size})")
    return tokenizer


def check_resume(cfg: TrainConfig, dist: DistInfo) -> None:
    """A run directory's newest checkpoint must be loadable by this run's engine and data split."""
    ckpt = latest_checkpoint(cfg.run_dir)
    if ckpt is None:
        return
    state = read_trainer_state(ckpt)
    build_engine(cfg, dist).check_resume(state, ckpt)
    streams = grad_accum_steps(cfg, dist.world_size) * dist.world_size
    if state["num_streams"] != streams:
        raise ValueError(f"{ckpt} was saved with {state['num_streams']} data streams; this run has {streams} "
                         "(keep global_batch_size / micro_batch_size unchanged)")


def build_trainer(cfg: TrainConfig, dist: DistInfo, progress_bar: bool = False) -> tuple[Trainer, Path | None]:
    tokenizer = check_inputs(cfg, dist)
    run_dir = Path(cfg.run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    engine = build_engine(cfg, dist)
    model = build_model(cfg.model, device="meta")
    summary = adapters.apply_adapters(model, cfg.adapter)
    set_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    engine.shard(model)
    materialize(model, dist.device, cfg.seed, cfg.model.init_std)
    if cfg.warm_start and latest_checkpoint(run_dir) is None:
        load_base_weights(resolve_checkpoint(cfg.warm_start), model)
    engine.setup(model, build_optimizer(model, cfg.optim))

    accum = grad_accum_steps(cfg, dist.world_size)
    stream_ids = [a * dist.world_size + dist.rank for a in range(accum)]
    loader = build_train_loader(cfg.data, tokenizer, stream_ids=stream_ids, num_streams=accum * dist.world_size,
                                micro_batch_size=cfg.micro_batch_size, seed=cfg.seed)
    eval_tokens = max(cfg.eval_tokens, cfg.final_eval_tokens or 0)
    validation = validation_batches(cfg.data, tokenizer, eval_tokens)

    restarts = None
    if cfg.restarts.every:
        from megamora.restarts import Restarts

        restarts = Restarts(cfg.restarts, cfg.adapter, cfg.seed, cfg.steps)
    metrics = MetricsLogger(run_dir, dist.is_main, cfg.logging.wandb_mode, cfg.logging.wandb_project, to_dict(cfg))
    trainer = Trainer(cfg, engine, loader, validation, dist, metrics,
                      flops_per_token(cfg.model, cfg.data.seq_len), run_dir, restarts)

    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = read_trainer_state(ckpt)
        if restarts is not None:  # layers must be on the operator type they were saved with
            restarts.load_state_dict(state["restarts"], engine.module)
        loader.load_state_dict(load_checkpoint(ckpt, engine, stream_ids))
        trainer.step = state["step"]
    metrics.log(trainer.step, {
        "world_size": dist.world_size, "grad_accum": accum, "device": str(dist.device), **engine.checkpoint_info(),
        **summary, "resumed_from": str(ckpt) if ckpt else None,
    }, kind="setup")
    return trainer, ckpt


def pretrain(cfg: TrainConfig, progress_bar: bool = False) -> RunResult:
    """Train (or resume) the run described by `cfg` to `cfg.steps`. Works with or without torchrun."""
    try:  # before a process group exists (DeepSpeed makes one even for one process)
        check_engine(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    had_group = process_group_active()
    dist = init_distributed(cfg.parallel)
    try:
        trainer, ckpt = build_trainer(cfg, dist)
        show = progress_bar and dist.is_main
        try:
            with logging_redirect_tqdm(), tqdm(total=cfg.steps, initial=trainer.step, desc="train",
                                               dynamic_ncols=True, disable=not show) as progress:
                final_eval = trainer.fit(progress)
        finally:
            trainer.metrics.close()
    finally:
        if not had_group and not dist.launched and process_group_active():  # the group of one made above
            engine_class(cfg.parallel.engine).destroy_process_group()
    return RunResult(Path(cfg.run_dir), trainer.losses, final_eval, ckpt)

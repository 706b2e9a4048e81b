"""Build a training run from a TrainConfig (model -> adapters -> shard -> init, optimizer, data,
resume) and hand it to the Trainer. Inputs are checked before the run directory is touched."""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from megamora import adapters
from megamora.checkpoint import (
    check_warm_start,
    latest_checkpoint,
    load_base_weights,
    load_checkpoint,
    read_trainer_state,
    resolve_warm_start,
)
from megamora.config import ConfigError, TrainConfig, load_config, to_dict, to_yaml
from megamora.data import (
    build_train_loader,
    check_data_source,
    check_train_documents,
    ValidationShare,
    check_validation_size,
    train_source,
    validation_share,
)
from megamora.compute import configure_compute
from megamora.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    process_group_active,
)
from megamora.engines import build_engine, check_engine, engine_class
from megamora.metrics import MetricsLogger, read_metrics
from megamora.model import build_model, materialize
from megamora.optim import build_optimizer
from megamora.plan import flops_per_token
from megamora.preemption import StopSignals
from megamora.runlock import lock_run_dir, unlock_run_dir
from megamora.tokenizer import load_tokenizer
from megamora.versions import check_versions
from megamora.train import Trainer, grad_accum_steps

log = logging.getLogger("megamora")


@dataclass
class RunResult:
    run_dir: Path
    losses: list[float]  # per step, of the steps this process ran
    final_eval: dict[str, float]
    resumed_from: Path | None


def check_inputs(cfg: TrainConfig, dist: DistInfo) -> tuple[Any, ValidationShare, int]:
    """Everything that can be wrong with the inputs, checked before any compute or file write;
    raised as one-line ConfigErrors. Returns the tokenizer, this rank's share of the validation
    sequences (read here, so that missing validation data is one of these errors) and the number of
    sequences of all the shares (a collective)."""
    try:
        check_engine(cfg)
        cfg.parallel.mesh_shape(dist.world_size)  # HSDP: shard_size divides the world
        streams = grad_accum_steps(cfg, dist.world_size) * dist.world_size
        check_data_source(cfg.data)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({tokenizer.vocab_size})")
        if cfg.warm_start:  # a checkpoint, or a Hugging Face folder of this run's model shape
            check_warm_start(cfg.warm_start, cfg.model)
        check_resume(cfg, dist)
        check_adapters(cfg)
        check_train_documents(cfg.data, streams)
        validation = validation_share(cfg.data, tokenizer, eval_tokens_asked(cfg), rank=dist.rank,
                                      world_size=dist.world_size, at_most=True)  # tokenizes this rank's pieces
        held = int(all_reduce_sum([len(validation.index)], dist.device)[0])
        check_validation_size(held, cfg.data)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    return tokenizer, validation, held


def eval_tokens_asked(cfg: TrainConfig) -> int:
    return max(cfg.eval_tokens, cfg.final_eval_tokens or 0)


def check_adapters(cfg: TrainConfig) -> None:
    """One-line ValueError for adapters this model cannot take: one larger than the weight it adapts
    (no saving over full-rank training, and a huge r runs for minutes before anyone notices), or
    restarts a layer cannot go through (a ReMoRA cycle whose types change r_hat: `check_restarts`).
    Built on the meta device: no memory, no init."""
    if cfg.adapter.kind == "none":
        return
    model = build_model(cfg.model, device="meta")
    adapters.apply_adapters(model, cfg.adapter)
    for name, layer in adapters.iter_adapters(model):  # every layer: shapes differ by module type
        n_in, n_out = layer.in_features, layer.out_features
        size = sum(p.numel() for _, p in layer.own_parameters())
        if size > n_in * n_out:
            raise ValueError(f"adapter.r={cfg.adapter.r}: {layer.size_description()} would hold {size} parameters on "
                             f"{name} ({n_in} -> {n_out}: {n_in * n_out} weights), more than the weight it adapts")
        if cfg.restarts.every:
            layer.check_restarts(cfg.restarts, name)


# What a resume may not change: what the checkpoint's weights, operator types and reader positions
# were made with. Everything else (steps, eval / save cadence, keep_last, optim, parallel, logging)
# may change; write_config records it.
FROZEN = ("seed", "warm_start", "model", "adapter", "restarts", "data")
NOT_FROZEN = ("data.prefetch_batches",)  # how the data is read, not which: the same batches


def check_resume(cfg: TrainConfig, dist: DistInfo) -> None:
    """A run directory's newest checkpoint must be loadable by this run: the settings of the run's
    config.yaml that the checkpoint depends on, the engine and the data split."""
    ckpt = latest_checkpoint(cfg.run_dir)
    if ckpt is None:
        return
    check_same_run(cfg, ckpt)
    state = read_trainer_state(ckpt)
    build_engine(cfg, dist).check_resume(state, ckpt)
    streams = grad_accum_steps(cfg, dist.world_size) * dist.world_size
    if state["num_streams"] != streams:
        raise ValueError(f"{ckpt} was saved with {state['num_streams']} data streams; this run has {streams} "
                         "(keep global_batch_size / micro_batch_size unchanged)")


def check_same_run(cfg: TrainConfig, ckpt: Path) -> None:
    """Refuse a resume whose FROZEN settings differ from the run's config.yaml, naming every one.
    Paths are compared by what they hold: the training files by the names the checkpoint's data
    state recorded (the data may move), the tokenizer by its bytes."""
    path = Path(cfg.run_dir) / "config.yaml"
    if not path.is_file():  # a run directory from before config.yaml: nothing to compare with
        return
    try:
        run_cfg = load_config(path)
    except ConfigError as e:
        raise ValueError(f"cannot resume {cfg.run_dir}: its config.yaml does not load ({e})") from None
    moved = ("data.local_dir", "data.tokenizer")
    differ = [k for k in config_changes(run_cfg, cfg) if k.split(".")[0] in FROZEN and k not in moved + NOT_FROZEN]
    saved = saved_train_source(ckpt)  # None: a checkpoint from before sources were recorded
    if saved != train_source(cfg.data) if saved else run_cfg.data.local_dir != cfg.data.local_dir:
        differ.append("data.local_dir")
    if run_cfg.data.tokenizer != cfg.data.tokenizer and not same_file(run_cfg.data.tokenizer, cfg.data.tokenizer):
        differ.append("data.tokenizer")
    if differ:
        old, new = flat_config(run_cfg), flat_config(cfg)
        what = "; ".join(f"{k}: {old.get(k)} (run) vs {new.get(k)} (this command)" for k in sorted(differ))
        if "data.local_dir" in differ and old.get("data.local_dir") == new.get("data.local_dir"):
            what += f" (the training files changed: {saved} in {ckpt.name}, {train_source(cfg.data)} now)"
        raise ValueError(f"cannot resume {cfg.run_dir} with other settings than it was trained with: {what}; "
                         "keep them, or start a new run_dir")


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """Dotted key -> value (lists stay whole)."""
    def walk(prefix: str, d: dict) -> Iterator[tuple[str, Any]]:
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from walk(f"{prefix}{k}.", v)
            else:
                yield f"{prefix}{k}", v

    return dict(walk("", to_dict(cfg)))


def config_changes(old: TrainConfig, new: TrainConfig) -> dict[str, list]:
    """Dotted key -> [old, new] of every setting that differs, run_dir aside (one directory, maybe
    spelt differently)."""
    a, b = flat_config(old), flat_config(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys())
            if k != "run_dir" and a.get(k) != b.get(k)}


def saved_train_source(ckpt: Path) -> str | None:
    """The training data a checkpoint was read from (its data state's "source")."""
    for f in sorted((ckpt / "data").glob("stream_*.json")):
        return json.loads(f.read_text()).get("source")
    return None


def same_file(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_file() and pb.is_file() and pa.read_bytes() == pb.read_bytes()


def write_config(run_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Write config.yaml. One already there that differs (a resume that changes steps, cadence...;
    check_resume refused every other change) is kept as config.<N>.yaml, N = 1, 2, ... Returns what
    the setup record says about it: {} when nothing changed."""
    path = run_dir / "config.yaml"
    record: dict[str, Any] = {}
    if path.is_file():
        try:
            changes = config_changes(load_config(path), cfg)
        except ConfigError:  # unreadable, and no checkpoint depends on it (check_resume)
            changes = {"config.yaml": ["unreadable", "replaced"]}
        if not changes:
            return record  # the run's own file stays as it is
        kept = next(f"config.{n}.yaml" for n in itertools.count(1) if not (run_dir / f"config.{n}.yaml").exists())
        os.replace(path, run_dir / kept)
        record = {"config_changes": changes, "previous_config": kept}
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return record


def build_trainer(cfg: TrainConfig, dist: DistInfo, progress_bar: bool = False) -> tuple[Trainer, Path | None]:
    tokenizer, validation, held = check_inputs(cfg, dist)
    run_dir = Path(cfg.run_dir)
    lock_run_dir(run_dir, dist)  # before anything is written: one writer per run directory
    config_record = write_config(run_dir, cfg) if dist.is_main else {}
    asked = eval_tokens_asked(cfg)
    if dist.is_main and held < max(1, asked // cfg.data.seq_len):
        log.warning("the validation split holds only %d tokens (%d sequences of %d), fewer than the %d eval tokens "
                    "asked: evaluating on those", held * cfg.data.seq_len, held,
                    cfg.data.seq_len, asked)

    engine = build_engine(cfg, dist)
    model = build_model(cfg.model, device="meta")
    summary = adapters.apply_adapters(model, cfg.adapter)
    configure_compute(model, cfg.parallel)
    engine.shard(model)
    resuming = latest_checkpoint(run_dir) is not None
    # a resume's checkpoint overwrites every parameter: drawing their initial values is wasted start-up
    draw = not (resuming and engine.load_restores_all_parameters)
    materialize(model, dist.device, cfg.seed, cfg.model.init_std, draw)
    if cfg.warm_start and not resuming:
        load_base_weights(resolve_warm_start(cfg.warm_start), model)
    engine.setup(model, build_optimizer(model, cfg.optim, seed=cfg.seed))

    accum = grad_accum_steps(cfg, dist.world_size)
    stream_ids = [a * dist.world_size + dist.rank for a in range(accum)]
    loader = build_train_loader(cfg.data, tokenizer, stream_ids=stream_ids, num_streams=accum * dist.world_size,
                                micro_batch_size=cfg.micro_batch_size, seed=cfg.seed, pin_memory_device=dist.device)

    restarts = None
    if cfg.restarts.every:
        from megamora.restarts import Restarts

        restarts = Restarts(cfg.restarts, cfg.seed, cfg.steps)
    metrics = MetricsLogger(run_dir, dist.is_main, cfg.logging.wandb_mode, cfg.logging.wandb_project, to_dict(cfg))
    trainer = Trainer(cfg, engine, loader, validation, dist, metrics,
                      flops_per_token(cfg), run_dir, restarts)

    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = read_trainer_state(ckpt)
        if restarts is not None:  # layers must be on the operator type they were saved with
            restarts.load_state_dict(state["restarts"], engine.module)
        loader.load_state_dict(load_checkpoint(ckpt, engine, stream_ids))
        trainer.step = state["step"]
    metrics.log(trainer.step, {
        "world_size": dist.world_size, "grad_accum": accum, "device": str(dist.device),
        "fp32_matmul_precision": dist.fp32_matmul_precision, **engine.checkpoint_info(),
        **summary, "resumed_from": str(ckpt) if ckpt else None, **config_record,
    }, kind="setup")
    return trainer, ckpt


def finished_eval(trainer: Trainer) -> dict[str, Any]:
    """A run already at (or past) cfg.steps trains nothing: its final eval again, from metrics.jsonl,
    else evaluated now. {} for a run that stopped early."""
    cfg, step = trainer.cfg, trainer.step
    if trainer.losses or step < cfg.steps:
        return {}
    if trainer.dist.is_main:
        log.info("run %s is already at step %d (steps=%d): nothing to train", trainer.run_dir, step, cfg.steps)
    has_metrics = (trainer.run_dir / "metrics.jsonl").is_file()
    records = [r for r in read_metrics(trainer.run_dir, "eval") if r["step"] == step] if has_metrics else []
    if records:  # every rank reads the same file: all take the same branch
        return {k: v for k, v in records[-1].items() if k not in ("kind", "step")}
    result = trainer.evaluate(cfg.final_eval_tokens)
    trainer.metrics.log(step, result, kind="eval")
    return result


def pretrain(cfg: TrainConfig, progress_bar: bool = False) -> RunResult:
    """Train (or resume) the run described by `cfg` to `cfg.steps`. Works with or without torchrun.
    Holds the run directory's lock throughout (RunDirLocked if another run has it); SIGTERM, SIGINT or
    SIGUSR1 end it after the current step with a checkpoint (Preempted); a failed save raises SaveFailed."""
    try:  # before a process group exists (DeepSpeed makes one even for one process)
        check_versions(("torch", "deepspeed") if cfg.parallel.engine == "deepspeed" else ("torch",))
        check_engine(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    had_group = process_group_active()
    dist = init_distributed(cfg.parallel)
    try:
        trainer, ckpt = build_trainer(cfg, dist)
        show = progress_bar and dist.is_main and sys.stderr.isatty()  # else: the log lines every log_every
        try:
            with (logging_redirect_tqdm(), StopSignals() as stop,
                  tqdm(total=cfg.steps, initial=trainer.step, desc="train", dynamic_ncols=True,
                       disable=not show) as progress):
                final_eval = trainer.fit(progress, stop) or finished_eval(trainer)
            barrier()  # no rank tears down gloo while another still talks to it
        finally:
            trainer.loader.close()  # ends the prefetch thread
            trainer.metrics.close()
    finally:
        unlock_run_dir(cfg.run_dir)
        if not had_group and not dist.launched and process_group_active():  # the group of one made above
            engine_class(cfg.parallel.engine).destroy_process_group()
    return RunResult(Path(cfg.run_dir), trainer.losses, final_eval, ckpt)

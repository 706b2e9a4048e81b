"""The Trainer: the loop over micro-batches and optimizer steps, and the things that happen every N
steps (log, restart, eval, save). How forward, backward, clipping, the step and checkpoints run on
the chosen parallelism is the engine's (megamora.engines); everything is built elsewhere."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from megamora.checkpoint import save_checkpoint
from megamora.config import TrainConfig
from megamora.distributed import DistInfo, all_reduce_sum
from megamora.engines import Engine
from megamora.evaluate import evaluate_loss, perplexity
from megamora.metrics import MetricsLogger, Throughput, peak_memory_gib
from megamora.optim import lr_at
from megamora.preemption import Preempted, StopSignals


class RestartHook(Protocol):
    """ReLoRA / ReMoRA merge-and-reinit; see megamora.restarts."""

    def due(self, step: int) -> bool: ...

    def apply(self, step: int, model: nn.Module, optimizer: Any) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...


def micro_batch_seed(seed: int, step: int, stream_id: int) -> int:
    """Dropout RNG of one micro-batch: a function of its data stream, not of the rank that runs it, so
    one process with gradient accumulation reproduces N ranks exactly."""
    digest = hashlib.sha256(f"{seed}:{step}:{stream_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    return cfg.grad_accum_steps(world_size)


def global_data_stats(stats: dict[str, int], dist: DistInfo) -> dict[str, int]:
    """The data counters of all ranks: sums, except `epochs`, the most over ranks (as on one rank).
    A collective: every rank calls it at the same step."""
    keys = sorted(k for k in stats if k != "epochs")  # the same order on every rank
    epochs = [0.0] * dist.world_size  # one slot per rank: a sum that gathers them, for the max
    epochs[dist.rank] = float(stats.get("epochs", 0))
    totals = all_reduce_sum([float(stats[k]) for k in keys] + epochs, dist.device)  # fp64: exact ints
    out = {k: int(v) for k, v in zip(keys, totals)} | {"epochs": int(max(totals[len(keys):]))}
    return {k: out[k] for k in stats}  # in the loader's order


@dataclass
class Trainer:
    cfg: TrainConfig
    engine: Engine  # owns the model and optimizer
    loader: Any  # megamora.data.TrainLoader
    validation: torch.Tensor  # (n_seq, seq_len + 1)
    dist: DistInfo
    metrics: MetricsLogger
    flops_per_token: float
    run_dir: Path
    restarts: RestartHook | None = None
    step: int = 0

    def __post_init__(self):
        self.accum = grad_accum_steps(self.cfg, self.dist.world_size)
        self.losses: list[float] = []  # global mean loss of every step this process ran

    def stream_id(self, micro_step: int) -> int:
        return micro_step * self.dist.world_size + self.dist.rank

    def set_lr(self) -> float:
        lr = self.cfg.optim.lr * lr_at(self.step, total_steps=self.cfg.steps, cfg=self.cfg.optim,
                                       restarts=self.cfg.restarts if self.cfg.restarts.every else None)
        self.engine.set_lr(lr)
        return lr

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over the global batch; returns (global mean loss, grad norm)."""
        loss_sum = 0.0
        for a in range(self.accum):
            batch = self.loader.next_batch(self.stream_id(a)).to(self.dist.device, non_blocking=True)
            torch.manual_seed(micro_batch_seed(self.cfg.seed, self.step, self.stream_id(a)))
            with self.engine.autocast():
                loss = self.engine(batch[:, :-1], targets=batch[:, 1:])  # fp32 mean cross-entropy
            self.engine.backward(loss, last_micro_batch=a == self.accum - 1)
            loss_sum += loss.detach()
        grad_norm = self.engine.step()
        (total,) = all_reduce_sum([float(loss_sum)], self.dist.device)
        return total / (self.accum * self.dist.world_size), grad_norm

    def evaluate(self, num_tokens: int | None = None) -> dict[str, float]:
        """Loss and perplexity over the first `num_tokens` validation tokens (None: all loaded). The
        record has the tokens evaluated and those asked (whole sequences: a few less), and
        validation_short when the validation split held fewer sequences than asked (it is then
        evaluated whole, see run.check_inputs)."""
        seqs = self.validation
        asked = num_tokens if num_tokens is not None else max(self.cfg.eval_tokens, self.cfg.final_eval_tokens or 0)
        want = max(1, asked // (seqs.shape[1] - 1))
        seqs = seqs[:want]
        with self.engine.autocast():
            loss, tokens = evaluate_loss(self.engine.model, seqs, self.cfg.micro_batch_size, self.dist.rank,
                                         self.dist.world_size, self.dist.device)
        record = {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens, "tokens_requested": asked}
        if seqs.shape[0] < want:
            record["validation_short"] = True
        return record

    def save(self) -> Path:
        state = {"num_streams": self.accum * self.dist.world_size}
        if self.restarts is not None:
            state["restarts"] = self.restarts.state_dict()
        return save_checkpoint(self.run_dir, self.step, self.engine, state,
                               self.loader.state_dict(), self.cfg.keep_last, self.dist.is_main)

    def fit(self, progress=None, stop: StopSignals | None = None) -> dict[str, float]:
        """Train to cfg.steps. With `stop`, a signal ends the run after the current step with a
        checkpoint and Preempted."""
        cfg = self.cfg
        tokens_per_step = cfg.global_batch_size * cfg.data.seq_len
        meter = Throughput(self.flops_per_token, self.dist.world_size, self.dist.device)
        last_eval: dict[str, float] = {}
        while self.step < cfg.steps:
            lr = self.set_lr()
            t0 = time.perf_counter()
            loss, grad_norm = self.train_step()
            step_time = time.perf_counter() - t0
            self.step += 1
            self.losses.append(loss)
            meter.add(tokens_per_step, step_time)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.3f}")
            if self.step % cfg.logging.log_every == 0 or self.step == cfg.steps:
                self.metrics.log(self.step, {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                                             "step_time_s": step_time, **meter.measure(),
                                             "peak_memory_gib": peak_memory_gib(self.dist.device),
                                             "data": global_data_stats(self.loader.stats(), self.dist)})
            if self.restarts is not None and self.restarts.due(self.step):
                event = self.restarts.apply(self.step, self.engine.module, self.engine.optimizer)
                self.metrics.log(self.step, event, kind="restart")
            final = self.step == cfg.steps
            if final or (cfg.eval_every and self.step % cfg.eval_every == 0):
                last_eval = self.evaluate(cfg.final_eval_tokens if final else cfg.eval_tokens)
                self.metrics.log(self.step, last_eval, kind="eval")
            saved = None
            if final or (cfg.save_every and self.step % cfg.save_every == 0):
                saved = self.save()
            # Collective, so every rank stops after this same step; not after the last one.
            signame = stop.requested(self.dist.device) if stop is not None and not final else None
            if signame:
                saved = saved or self.save()
                self.metrics.log(self.step, {"signal": signame, "checkpoint": str(saved)}, kind="stop")
                raise Preempted(signame, self.step, saved)
        return last_eval

"""The Trainer: the loop over micro-batches and optimizer steps, and the things that happen every N
steps (log, restart, eval, save). How forward, backward, clipping, the step and checkpoints run on
the chosen parallelism is the engine's (megamora.engines); everything is built elsewhere."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from megamora.checkpoint import save_checkpoint
from megamora.config import TrainConfig
from megamora.data import ValidationShare
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


def log_values(step_losses: list[torch.Tensor], grad_norm: torch.Tensor, stats: dict[str, int], divisor: int,
               dist: DistInfo) -> tuple[list[float], float, dict[str, int]]:
    """What a log step reports, in one all-reduce and one read to the host: the global mean loss of
    each step since the last log step (this rank's loss sums, summed over ranks, / `divisor`), the
    grad norm (the same on every rank: rank 0's is kept) and the data counters of all ranks (sums,
    except `epochs`, the most over ranks, as on one rank). A collective: every rank calls it at the
    same step."""
    keys = sorted(k for k in stats if k != "epochs")  # the same order on every rank
    epochs = [0.0] * dist.world_size  # one slot per rank: a sum that gathers them, for the max
    epochs[dist.rank] = float(stats.get("epochs", 0))
    device = dist.device
    norm = grad_norm.to(device, torch.float64).reshape(1) if dist.is_main else torch.zeros(1, dtype=torch.float64,
                                                                                             device=device)
    counters = torch.tensor([float(stats[k]) for k in keys] + epochs, dtype=torch.float64)  # fp64: exact ints
    values = torch.cat([torch.stack(step_losses).to(torch.float64), norm, counters.to(device)])
    totals = all_reduce_sum(values, device)
    n = len(step_losses)
    losses = [total / divisor for total in totals[:n]]  # divided on the host, exactly as one process does
    out = {k: int(v) for k, v in zip(keys, totals[n + 1 :])} | {"epochs": int(max(totals[n + 1 + len(keys) :]))}
    return losses, totals[n], {k: out[k] for k in stats}  # the counters in the loader's order


@dataclass
class Trainer:
    cfg: TrainConfig
    engine: Engine  # owns the model and optimizer
    loader: Any  # megamora.data.TrainLoader
    validation: ValidationShare  # this rank's validation sequences
    dist: DistInfo
    metrics: MetricsLogger
    flops_per_token: float
    run_dir: Path
    restarts: RestartHook | None = None
    step: int = 0

    def __post_init__(self):
        self.accum = grad_accum_steps(self.cfg, self.dist.world_size)
        self.losses: list[float] = []  # global mean loss of every step this process ran, up to the last log
        self.unlogged: list[torch.Tensor] = []  # this rank's loss sum of each step since, on the device

    def stream_id(self, micro_step: int) -> int:
        return micro_step * self.dist.world_size + self.dist.rank

    def set_lr(self) -> float:
        lr = self.cfg.optim.lr * lr_at(self.step, total_steps=self.cfg.steps, cfg=self.cfg.optim,
                                       restarts=self.cfg.restarts if self.cfg.restarts.every else None)
        self.engine.set_lr(lr)
        return lr

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over the global batch. Returns this rank's sum of its micro-batches' mean
        losses and the global grad norm, both 0-d tensors on the device: nothing here waits for the
        device (log_step reads them)."""
        loss_sum = 0.0
        for a in range(self.accum):
            batch = self.loader.next_batch(self.stream_id(a)).to(self.dist.device, non_blocking=True)
            torch.manual_seed(micro_batch_seed(self.cfg.seed, self.step, self.stream_id(a)))
            with self.engine.autocast():
                loss = self.engine(batch[:, :-1], targets=batch[:, 1:])  # fp32 mean cross-entropy
            self.engine.backward(loss, last_micro_batch=a == self.accum - 1)
            loss_sum += loss.detach()
        return loss_sum, self.engine.step()

    def mean_losses(self, loss_sums: list[torch.Tensor]) -> list[float]:
        """The global mean loss of steps from train_step's loss sums (a collective; log_step reads them
        with the other logged values in one)."""
        totals = all_reduce_sum(torch.stack(loss_sums), self.dist.device)
        return [total / (self.accum * self.dist.world_size) for total in totals]  # divided on the host

    def log_step(self, lr: float, grad_norm: torch.Tensor, meter: Throughput, progress) -> None:
        """Read and log what the steps since the last log step left on the device (a collective)."""
        losses, norm, data = log_values(self.unlogged, grad_norm, self.loader.stats(),
                                        self.accum * self.dist.world_size, self.dist)
        self.losses += losses
        self.unlogged = []
        if progress is not None:
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
        self.metrics.log(self.step, {"loss": losses[-1], "lr": lr, "grad_norm": norm, **meter.measure(),
                                     "peak_memory_gib": peak_memory_gib(self.dist.device), "data": data})

    def evaluate(self, num_tokens: int | None = None) -> dict[str, float]:
        """Loss and perplexity over the first `num_tokens` validation tokens (None: all loaded). The
        record has the tokens evaluated and those asked (whole sequences: a few less), and
        validation_short when the validation split held fewer sequences than asked (it is then
        evaluated whole, see run.check_inputs). A collective."""
        seq_len = self.cfg.data.seq_len
        asked = num_tokens if num_tokens is not None else max(self.cfg.eval_tokens, self.cfg.final_eval_tokens or 0)
        want = max(1, asked // seq_len)
        with self.engine.autocast():
            loss, tokens = evaluate_loss(self.engine.model, self.validation.first(want), self.cfg.micro_batch_size,
                                         self.dist.device)
        record = {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens, "tokens_requested": asked}
        if tokens < want * seq_len:
            record["validation_short"] = True
        return record

    def save(self) -> Path:
        state = {"num_streams": self.accum * self.dist.world_size}
        if self.restarts is not None:
            state["restarts"] = self.restarts.state_dict()
        return save_checkpoint(self.run_dir, self.step, self.engine, state,
                               self.loader.state_dict(), self.cfg.keep_last, self.dist.is_main)

    def stop_requested(self, stop: StopSignals | None) -> str | None:
        """The stop signal any rank got, asked every stop_check_every steps (a collective and a host
        sync), so every rank stops after the same step; never after the last one."""
        if stop is None or self.step == self.cfg.steps or self.step % self.cfg.stop_check_every:
            return None
        return stop.requested(self.dist.device)

    def fit(self, progress=None, stop: StopSignals | None = None) -> dict[str, float]:
        """Train to cfg.steps. With `stop`, a signal ends the run (after the step that checks it, see
        stop_requested) with a checkpoint and Preempted. Between log steps nothing waits for the
        device: losses and the grad norm stay there until log_step reads them."""
        cfg = self.cfg
        meter = Throughput(self.flops_per_token, self.dist.world_size, self.dist.device)
        last_eval: dict[str, float] = {}
        while self.step < cfg.steps:
            lr = self.set_lr()
            loss_sum, grad_norm = self.train_step()
            self.step += 1
            self.unlogged.append(loss_sum)
            meter.add(cfg.global_batch_size * cfg.data.seq_len)
            if progress is not None:
                progress.update(1)
            final = self.step == cfg.steps
            signame = self.stop_requested(stop)
            if final or signame or self.step % cfg.logging.log_every == 0:
                with meter.paused():
                    self.log_step(lr, grad_norm, meter, progress)
            if self.restarts is not None and self.restarts.due(self.step):
                with meter.paused():
                    event = self.restarts.apply(self.step, self.engine.module, self.engine.optimizer)
                    self.metrics.log(self.step, event, kind="restart")
            if final or (cfg.eval_every and self.step % cfg.eval_every == 0):
                with meter.paused():
                    last_eval = self.evaluate(cfg.final_eval_tokens if final else cfg.eval_tokens)
                    self.metrics.log(self.step, last_eval, kind="eval")
            saved = None
            if final or signame or (cfg.save_every and self.step % cfg.save_every == 0):
                with meter.paused():
                    saved = self.save()
            if signame:
                self.metrics.log(self.step, {"signal": signame, "checkpoint": str(saved)}, kind="stop")
                raise Preempted(signame, self.step, saved)
        return last_eval

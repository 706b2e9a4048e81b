"""AdamW construction, learning-rate schedules (cosine, restart re-warmup, jagged cosine) and the
optimizer-state reset applied to adapter parameters at each ReLoRA / ReMoRA restart.

Schedules are pure functions of the 0-based optimizer step, so a resumed run needs no schedule
state beyond the step. Notation (all values are multipliers of `cfg.lr`):

    W0 = optim.warmup_steps, T = total_steps, m = optim.min_lr_ratio, W = restarts.warmup
    cos(t; a, b, floor) = floor + (1 - floor) * 0.5 * (1 + cos(pi * clamp((t - a) / max(1, b - a), 0, 1)))

    base(t)    = (t + 1) / W0                   if t < W0
               = cos(t; W0, T, m)               otherwise

A warmup of length W ends, at its last step, on the value the decay starts from at the next step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import partial

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from megamora.config import OptimConfig, RestartConfig

RESET_STRATEGIES = ("delete", "random_prune", "magnitude_prune")
RESTART_LR_SCHEDULES = ("restart_warmup", "jagged_cosine")
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


# ---------------------------------------------------------------------------------------------
# Optimizer


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # Norm gains, biases and embeddings are not weight-decayed (the usual LLaMA / HF convention).
    return param.ndim < 2 or "norm" in name or "embed" in name


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (plain or FSDP2 DTensors), in a decay and a no-decay group."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("build_optimizer: the model has no parameter with requires_grad=True")
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        # fused kernels on CUDA; the multi-tensor path elsewhere (both accept DTensor parameters)
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules


def _cosine(t: int, start: int, end: int, floor: float) -> float:
    progress = min(max((t - start) / max(1, end - start), 0.0), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _base(t: int, total: int, warmup: int, floor: float) -> float:
    if t < warmup:
        return (t + 1) / warmup
    return _cosine(t, warmup, total, floor)


def restart_schedule_steps(total_steps: int, restarts: RestartConfig | None) -> list[int]:
    """The steps before which a restart (merge and re-init) happens: multiples of `every` in (0, T)."""
    if restarts is None or restarts.every <= 0:
        return []
    return list(range(restarts.every, total_steps, restarts.every))


def _restart_warmup(t: int, total: int, cfg: OptimConfig, restarts: Sequence[int], warmup: int) -> float:
    """Released MoRA code's default: each restart at s restarts the schedule from the current LR.

        f_0 = base;   P_j = f_{j-1}(s_j)   (the LR the schedule in force would have given at s_j)
        f_j(t) = P_j * (k + 1) / W                      if k = t - s_j < W
               = P_j * cos(t; s_j + W, T, 0)            otherwise (a fresh cosine to 0)
    """
    value = partial(_base, total=total, warmup=cfg.warmup_steps, floor=cfg.min_lr_ratio)
    for s in restarts:
        if s > t:
            break
        peak = value(s)
        value = partial(_rewarmed_cosine, start=s, peak=peak, warmup=warmup, total=total)
    return value(t)


def _rewarmed_cosine(t: int, *, start: int, peak: float, warmup: int, total: int) -> float:
    k = t - start
    if k < warmup:
        return peak * (k + 1) / warmup
    return peak * _cosine(t, start + warmup, total, 0.0)


def _jagged_cosine(t: int, total: int, cfg: OptimConfig, restarts: Sequence[int], warmup: int) -> float:
    """ReLoRA: the global envelope base(t) (floor m), re-warmed after the latest restart s <= t:

        j(t) = (k + 1) / W * base(s + W)    if k = t - s < W
             = base(t)                      otherwise
    """
    base = partial(_base, total=total, warmup=cfg.warmup_steps, floor=cfg.min_lr_ratio)
    latest = max((s for s in restarts if s <= t), default=None)
    if latest is not None and t - latest < warmup:
        return (t - latest + 1) / warmup * base(latest + warmup)
    return base(t)


def lr_at(
    step: int,
    *,
    total_steps: int,
    cfg: OptimConfig,
    restarts: RestartConfig | None = None,
    restart_steps: Sequence[int] = (),
) -> float:
    """LR multiplier (times cfg.lr) for the 0-based optimizer `step` about to be taken.

    Without restarts (restarts None or restarts.every == 0 and no restart_steps): base(step).
    With restarts, `restart_steps` (default: multiples of restarts.every) are shaped by restarts.lr.
    """
    if step < 0:
        raise ValueError(f"lr_at: step={step} must be >= 0")
    if total_steps <= 0:
        raise ValueError(f"lr_at: total_steps={total_steps} must be positive")
    if restart_steps and restarts is None:
        raise ValueError(f"lr_at: restart_steps={list(restart_steps)} given without a restarts config")
    steps = sorted(restart_steps) if restart_steps else restart_schedule_steps(total_steps, restarts)
    if restarts is None or not steps:
        return _base(step, total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
    if restarts.lr == "restart_warmup":
        return _restart_warmup(step, total_steps, cfg, steps, restarts.warmup)
    if restarts.lr == "jagged_cosine":
        return _jagged_cosine(step, total_steps, cfg, steps, restarts.warmup)
    raise ValueError(f"restarts.lr={restarts.lr!r} is not one of {list(RESTART_LR_SCHEDULES)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    cfg: OptimConfig,
    restarts: RestartConfig | None = None,
    restart_steps: Sequence[int] = (),
    last_epoch: int = -1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_at`: after n calls to scheduler.step() the LR is cfg.lr * lr_at(n)."""
    lr_at(0, total_steps=total_steps, cfg=cfg, restarts=restarts, restart_steps=restart_steps)  # validate now
    fn = partial(lr_at, total_steps=total_steps, cfg=cfg, restarts=restarts, restart_steps=tuple(restart_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn, last_epoch=last_epoch)


# ---------------------------------------------------------------------------------------------
# Optimizer reset at a restart


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The piece of a full-shape tensor that `like` (plain or DTensor) holds on this rank."""
    if isinstance(like, DTensor):
        full = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return full.to(_local(like).device)


@torch.no_grad()
def _random_prune_(t: torch.Tensor, ratio: float, generator: torch.Generator | None) -> None:
    # The mask is drawn on the full shape so it is the same for any world size (given the same
    # generator state on every rank); each rank then keeps its own slice.
    device = generator.device if generator is not None else torch.device("cpu")
    keep = torch.rand(t.shape, generator=generator, device=device) >= ratio
    _local(t).mul_(_local_part(keep, t))


@torch.no_grad()
def _magnitude_prune_(t: torch.Tensor, ratio: float) -> None:
    # Zero the k = round(ratio * numel) smallest magnitudes of the full tensor (ties at the
    # threshold are zeroed too). full_tensor() is a collective, so every rank must call this.
    k = round(ratio * t.numel())
    if k == 0:
        return
    mag = (t.full_tensor() if isinstance(t, DTensor) else t).abs().float().flatten()
    threshold = mag.kthvalue(k).values
    local = _local(t)
    local.mul_(local.abs().float() > threshold.to(local.device))


def reset_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    strategy: str,
    ratio: float = 0.999,
    generator: torch.Generator | None = None,
) -> None:
    """Reset the AdamW state of `params` only (the adapter parameters); other state is untouched.

    delete:          forget the state (moments and step: bias correction restarts). It is reset in place
                     to exactly what AdamW builds for a parameter without state (step 0, zero moments),
                     so checkpoints keep one structure across restarts (DCP loads need every key).
    random_prune:    zero a random `ratio` fraction of the moments, keep the step (ReLoRA).
    magnitude_prune: zero the `ratio` fraction of smallest-magnitude moments per tensor, keep the step.
    """
    if strategy not in RESET_STRATEGIES:
        raise ValueError(f"optimizer reset strategy={strategy!r} is not one of {list(RESET_STRATEGIES)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"optimizer reset ratio={ratio} must be in [0, 1]")
    for p in params:
        if p not in optimizer.state:  # no step taken yet: nothing to reset
            continue
        state = optimizer.state[p]
        if strategy == "delete":
            for value in state.values():
                if torch.is_tensor(value):
                    _local(value).zero_()
            continue
        for key in _MOMENT_KEYS:
            if key not in state:
                continue
            if strategy == "random_prune":
                _random_prune_(state[key], ratio, generator)
            else:
                _magnitude_prune_(state[key], ratio)

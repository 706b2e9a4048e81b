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

from megamora.config import OptimConfig, RestartConfig
from megamora.engines.tensors import optimizer_state, reset_step_, set_optimizer_state_

RESET_STRATEGIES = ("delete", "random_prune", "magnitude_prune")
RESTART_LR_SCHEDULES = ("restart_warmup", "jagged_cosine")
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


# ---------------------------------------------------------------------------------------------
# Optimizer


def _no_decay(name: str, param: torch.Tensor) -> bool:
    # Norm gains, biases and embeddings are not weight-decayed (the usual LLaMA / HF convention).
    return param.ndim < 2 or "norm" in name or "embed" in name


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """The trainable parameters (plain or sharded) in named groups: each adapter group its kind asks
    for (`optim_group`: "adapters" unless a kind says otherwise, e.g. LoRA+'s B at lambda x lr; a
    restart resets their step count, which DeepSpeed keeps per group), then the other decayed
    parameters, and the no-decay ones. Empty groups are left out. A group whose LR differs from
    optim.lr carries `lr_scale` (the schedule multiplies it: megamora.engines.base.Engine.set_lr)."""
    from megamora.adapters import adapter_optim_groups

    adapter_groups = adapter_optim_groups(model)
    by_group: dict = {}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in adapter_groups:
            by_group.setdefault(adapter_groups[id(param)], []).append(param)
        else:
            (no_decay if _no_decay(name, param) else decay).append(param)
    if not (by_group or decay or no_decay):
        raise ValueError("build_optimizer: the model has no parameter with requires_grad=True")
    groups = []
    for spec, params in by_group.items():
        group = {"name": spec.name, "params": params, "weight_decay": cfg.weight_decay * spec.weight_decay_scale}
        if spec.lr_scale != 1.0:  # only then: groups (and checkpoints) of other runs stay as they were
            group |= {"lr": cfg.lr * spec.lr_scale, "lr_scale": spec.lr_scale}
        groups.append(group)
    groups += [g for g in ({"name": "decay", "params": decay, "weight_decay": cfg.weight_decay},
                           {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig, seed: int = 0) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` names (megamora.optimizers.OPTIMIZERS; adamw: torch's fused AdamW over
    `param_groups(model, cfg)`). `seed`: the run seed, for methods that draw random projections."""
    from megamora.optimizers import optimizer_class

    return optimizer_class(cfg.name).build(model, cfg, seed)


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


@torch.no_grad()
def _pruned(moment: torch.Tensor, strategy: str, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """A full moment tensor after pruning. random_prune draws its mask on the full shape, so it is the
    same for any world size; magnitude_prune zeroes the k = round(ratio * numel) smallest
    magnitudes (ties at the threshold too)."""
    if strategy == "random_prune":
        device = generator.device if generator is not None else torch.device("cpu")
        keep = torch.rand(moment.shape, generator=generator, device=device) >= ratio
        return moment * keep.to(moment.device)
    k = round(ratio * moment.numel())
    if k == 0:
        return moment
    threshold = moment.abs().float().flatten().kthvalue(k).values
    return moment * (moment.abs().float() > threshold)


def reset_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    strategy: str,
    ratio: float = 0.999,
    generator: torch.Generator | None = None,
) -> None:
    """Reset the AdamW state of `params` only (the adapter parameters); other state is untouched.
    Works on the full tensors of any engine (megamora.engines.tensors): collective when sharded.

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
    params = list(params)
    for p in params:
        for key in _MOMENT_KEYS:
            moment = optimizer_state(optimizer, p, key)  # the full tensor; None before the first step
            if moment is None:
                continue
            new = torch.zeros_like(moment) if strategy == "delete" else _pruned(moment, strategy, ratio, generator)
            set_optimizer_state_(optimizer, p, key, new)
    if strategy == "delete":
        reset_step_(optimizer, params)

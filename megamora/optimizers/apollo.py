"""APOLLO (Zhu et al. 2025, "APOLLO: SGD-like Memory, AdamW-level Performance"): Adam moments of a
random projection (redrawn every T steps) only estimate a channel-wise (or tensor-wise) scaling
factor s = ||direction|| / ||projected gradient|| per row or column; the update is the raw gradient
times s, times sqrt(scale), its norm held to 1.01x growth per step (Fira's norm-growth limiter).

Equal step by step to APOLLOAdamW of the `apollo-torch` package on one process
(tests/test_optimizers.py). Where they differ, on purpose:
- seeds: the reference seeds each matrix's projections with its 1-based index among the optimizer's
  parameters; here seed_for(run seed, "apollo:" + parameter name) (megamora.engines.tensors), so the
  projections follow the run seed and the name, not the group layout (ApolloAdamW(seeds=None) keeps
  the index, as the reference); the chain of later seeds is the reference's (next_seed).
- the random matrices are drawn on the CPU (the same on any device and world size).
- the reference picks the norm dimension from the shape (rows when m >= n), not from the side it
  projects, so only proj_type std is consistent; other proj_types are refused.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from megamora.config import ConfigError, OptimConfig, TrainConfig
from megamora.engines.tensors import seed_for
from megamora.optimizers.base import OptimizerMethod, check_fsdp2_full_rank, check_projection_options
from megamora.optimizers.lowrank import (
    LowRankAdamW, _local, full_norm, is_projected, rows_like, split_groups, state_bytes, svd_projection,
)

PROJECTIONS = ("random", "svd")
SCALE_TYPES = ("channel", "tensor")


def next_seed(seed: int, advance: int = 0xF) -> int:
    """The seed of the next refresh (apollo-torch's chain: the last of `advance` int64 draws)."""
    draws = torch.randint(0, torch.iinfo(torch.int64).max, (advance,), generator=torch.Generator().manual_seed(seed))
    return int(draws[-1])


class ApolloAdamW(LowRankAdamW):
    """Projected groups carry rank, update_proj_gap, scale, proj_type (std), proj, scale_type,
    scale_front, norm_growth_limiter. `seeds`: parameter -> seed of its first projection."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 seeds: Optional[dict] = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._seeds = seeds if seeds is not None else {p: i + 1 for p, i in self._index.items()}
        self._chains: dict = {}  # parameter -> the seeds of its refreshes so far

    def _seed(self, p: torch.Tensor, refresh: int) -> int:
        chain = self._chains.setdefault(p, [self._seeds[p]])
        while len(chain) <= refresh:
            chain.append(next_seed(chain[-1]))
        return chain[refresh]

    def _new_projection(self, p, group, side, step):
        if group["proj"] == "svd":
            return svd_projection(self, p, group["rank"], side)
        m, n, r = *p.shape, group["rank"]
        generator = torch.Generator().manual_seed(self._seed(p, step // group["update_proj_gap"]))
        full = torch.randn((r, n) if side == "right" else (m, r), generator=generator) / math.sqrt(r)
        full = full.to(device=_local(p).device, dtype=p.dtype)
        return full if side == "right" else rows_like(p, full)

    def _full_rank_update(self, p, grad, low, direction, proj, side, group, state):
        if group["scale_type"] == "channel":  # per row (right side) or per column (left side)
            dim = 1 if side == "right" else 0
            factor = torch.linalg.vector_norm(direction, dim=dim) / (torch.linalg.vector_norm(low, dim=dim) + 1e-8)
            if dim == 1:
                factor = factor.unsqueeze(1)
        elif side == "right":  # tensor-wise: the low-rank tensors are row shards
            factor = full_norm(direction, p) / (full_norm(low, p) + 1e-8)
        else:
            factor = torch.linalg.vector_norm(direction) / (torch.linalg.vector_norm(low) + 1e-8)
        scaled = grad * factor
        root = math.sqrt(group["scale"])
        if group["scale_front"]:
            scaled *= root
        if group["norm_growth_limiter"]:
            norm = full_norm(scaled, p)
            if "scaled_grad_norm" in state:  # growth above 1.01x is cut back to 1.01x
                limiter = torch.clamp(norm / (state["scaled_grad_norm"] + 1e-8), min=1.01) / 1.01
                scaled = scaled / limiter
                state["scaled_grad_norm"] = norm / limiter
            else:
                state["scaled_grad_norm"] = norm
        if not group["scale_front"]:
            scaled *= root
        return scaled


class ApolloMethod(OptimizerMethod):
    name = "apollo_adamw"
    label = "APOLLO"
    colour = "#bcbd22"
    high_rank = True  # full-rank (scaled raw-gradient) updates

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        check_fsdp2_full_rank(cfg, cls.name)
        a = cfg.optim.apollo
        check_projection_options("apollo", a)
        if a.proj not in PROJECTIONS:
            raise ConfigError(f"optim.apollo.proj={a.proj!r} is not one of {list(PROJECTIONS)}")
        if a.scale_type not in SCALE_TYPES:
            raise ConfigError(f"optim.apollo.scale_type={a.scale_type!r} is not one of {list(SCALE_TYPES)}")

    @classmethod
    def build(cls, model: nn.Module, cfg: OptimConfig, seed: int = 0) -> ApolloAdamW:
        a = cfg.apollo
        options = dict(rank=a.rank, update_proj_gap=a.update_proj_gap, scale=a.scale, proj_type="std", proj=a.proj,
                       scale_type=a.scale_type, scale_front=a.scale_front, norm_growth_limiter=a.norm_growth_limiter)
        seeds = {p: seed_for(seed, f"apollo:{name}") for name, p in model.named_parameters() if is_projected(name, p)}
        return ApolloAdamW(split_groups(model, cfg, options), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, seeds=seeds)

    @classmethod
    def state_bytes(cls, cfg: TrainConfig, world_size: int) -> int:
        a = cfg.optim.apollo
        rank_of = (lambda m, n: min(a.rank, m, n)) if a.proj == "svd" else (lambda m, n: a.rank)
        return state_bytes(cfg, world_size, rank_of, "std", scalars=int(a.norm_growth_limiter))

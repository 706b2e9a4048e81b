"""GaLore (Zhao et al. 2024, "Memory-Efficient LLM Training by Gradient Low-Rank Projection"):
Adam moments of each 2-D block weight kept on the top-r singular vectors of its gradient, refreshed
every T steps by an SVD; the update is projected back and scaled by alpha.

Equal step by step to GaLoreAdamW of the `galore-torch` package on one process
(tests/test_optimizers.py); see megamora/optimizers/lowrank.py for what it shares with APOLLO and
how FSDP2 shards it. One difference, kept on purpose: the reference keeps its projector as a slice
of the SVD's U or Vh, so each matrix holds min(m, n) basis vectors in memory, not r; this keeps r.
"""

from __future__ import annotations

from torch import nn

from megamora.config import ConfigError, OptimConfig, TrainConfig
from megamora.optimizers.base import OptimizerMethod, check_fsdp2_full_rank, check_projection_options
from megamora.optimizers.lowrank import SIDES, LowRankAdamW, split_groups, state_bytes, svd_projection


class GaLoreAdamW(LowRankAdamW):
    """Projected groups carry rank, update_proj_gap, scale, proj_type (GaLoreAdamW's group keys)."""

    def _new_projection(self, p, group, side, step):
        return svd_projection(self, p, group["rank"], side)

    def _full_rank_update(self, p, grad, low, direction, proj, side, group, state):
        # right: (rows x k) @ (k x n); left: this rank's rows of P (rows x k) @ (k x n)
        back = direction @ proj if side == "right" else proj @ direction
        return back * group["scale"]


class GaLoreMethod(OptimizerMethod):
    name = "galore_adamw"
    label = "GaLore"
    colour = "#8c564b"
    high_rank = True  # full-rank weights, updated in a subspace that changes every T steps

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        check_fsdp2_full_rank(cfg, cls.name)
        g = cfg.optim.galore
        check_projection_options("galore", g)
        if g.proj_type not in SIDES:
            raise ConfigError(f"optim.galore.proj_type={g.proj_type!r} is not one of {list(SIDES)}")

    @classmethod
    def build(cls, model: nn.Module, cfg: OptimConfig, seed: int = 0) -> GaLoreAdamW:
        g = cfg.galore
        options = dict(rank=g.rank, update_proj_gap=g.update_proj_gap, scale=g.scale, proj_type=g.proj_type)
        return GaLoreAdamW(split_groups(model, cfg, options), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                           weight_decay=cfg.weight_decay)

    @classmethod
    def state_bytes(cls, cfg: TrainConfig, world_size: int) -> int:
        r = cfg.optim.galore.rank
        return state_bytes(cfg, world_size, lambda m, n: min(r, m, n), cfg.optim.galore.proj_type)

"""ReLoRA / ReMoRA: every `restarts.every` steps, merge each adapter into its (sharded) base weight,
re-initialise it (each kind's `merge_and_reinit`: LoRA redraws A and zeroes B; MoRA zeroes M and moves
to the next operator type of the cycle), and reset the adapters' optimizer state. The LR re-warmup is
part of the schedule (megamora.optim.lr_at).

The only state is the number of restarts done: whatever a layer's state depends on (MoRA's operator
type) follows from it, so a resumed run re-derives it before loading its weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megamora.adapters import adapter_parameters, iter_adapters
from megamora.config import RestartConfig
from megamora.engines.tensors import seed_for
from megamora.optim import reset_optimizer_state

__all__ = ["Restarts", "adapter_parameters"]


class Restarts:
    def __init__(self, cfg: RestartConfig, seed: int, total_steps: int):
        self.cfg = cfg
        self.seed = seed
        self.total_steps = total_steps
        self.count = 0  # restarts done so far

    def due(self, step: int) -> bool:
        """After `step` optimizer steps; never at the very end, where a merge would change nothing."""
        return self.cfg.every > 0 and step % self.cfg.every == 0 and 0 < step < self.total_steps

    @torch.no_grad()
    def apply(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        restart = self.count + 1
        event: dict[str, Any] = {"restart": restart, "optimizer_reset": self.cfg.optimizer_reset}
        for i, (name, module) in enumerate(iter_adapters(model)):
            module.merge_and_reinit(seed=self.seed, key=f"{name}@restart{restart}", restart=restart, restarts=self.cfg)
            if i == 0:
                event |= module.restart_event(self.cfg, restart)
        generator = torch.Generator().manual_seed(seed_for(self.seed, f"optimizer-reset@{step}"))
        reset_optimizer_state(optimizer, adapter_parameters(model), self.cfg.optimizer_reset,
                              self.cfg.prune_ratio, generator=generator)
        self.count = restart
        return event

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Restore the count and put every layer back in the state it had (MoRA: its operator type)."""
        self.count = int(state["count"])
        for _, module in iter_adapters(model):
            module.restore_restarts(self.count, self.cfg)

"""ReLoRA / ReMoRA: every `restarts.every` steps, merge each adapter into its (sharded) base weight,
re-initialise it (LoRA: A kaiming, B = 0; MoRA: M = 0 and the next operator type of the cycle), and
reset the adapters' optimizer state. The LR re-warmup is part of the schedule (megamora.optim.lr_at).

The only state is the number of restarts done: the current MoRA type of every layer follows from it,
so a resumed run re-derives the types before loading its weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megamora.adapters import MoRALinear, iter_adapters
from megamora.config import AdapterConfig, RestartConfig
from megamora.engines.tensors import seed_for
from megamora.optim import reset_optimizer_state


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors of every adapter (not the frozen base weights they wrap)."""
    return [p for _, module in iter_adapters(model)
            for name, p in module.named_parameters() if not name.startswith("base.")]


class Restarts:
    def __init__(self, cfg: RestartConfig, adapter_cfg: AdapterConfig, seed: int, total_steps: int):
        self.cfg = cfg
        self.kind = adapter_cfg.kind
        self.seed = seed
        self.total_steps = total_steps
        self.count = 0  # restarts done so far

    def mora_type_after(self, restarts_done: int) -> str:
        return self.cfg.mora_types[restarts_done % len(self.cfg.mora_types)]

    def due(self, step: int) -> bool:
        """After `step` optimizer steps; never at the very end, where a merge would change nothing."""
        return self.cfg.every > 0 and step % self.cfg.every == 0 and 0 < step < self.total_steps

    @torch.no_grad()
    def apply(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        next_type = self.mora_type_after(self.count + 1)
        for name, module in iter_adapters(model):
            key = f"{name}@restart{self.count + 1}"
            if isinstance(module, MoRALinear):
                module.merge_and_reinit(next_type=next_type, seed=self.seed, key=key)
            else:
                module.merge_and_reinit(seed=self.seed, key=key)
        generator = torch.Generator().manual_seed(seed_for(self.seed, f"optimizer-reset@{step}"))
        reset_optimizer_state(optimizer, adapter_parameters(model), self.cfg.optimizer_reset,
                              self.cfg.prune_ratio, generator=generator)
        self.count += 1
        event = {"restart": self.count, "optimizer_reset": self.cfg.optimizer_reset}
        if self.kind == "mora":
            event["mora_type"] = next_type
        return event

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module) -> None:
        """Restore the count and put every MoRA layer back on the operator type it had."""
        self.count = int(state["count"])
        if self.kind == "mora":
            for _, module in iter_adapters(model):
                module.set_type(self.mora_type_after(self.count))

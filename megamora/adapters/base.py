"""The adapter protocol: what every adapter kind declares, and all the rest of the code asks for.

An adapter wraps one frozen nn.Linear (`base`) and adds a trainable update dW to it. A kind is one
module in megamora/adapters/ with a subclass of AdapterLinear, registered under its `adapter.kind`
in `megamora.adapters.ADAPTERS`. The subclass declares:

    from_config(base, cfg)       how it wraps a Linear from the adapter config (its own options included)
    check_config(cfg)            one-line ConfigError for its own options, before anything is built
    param_init                   initial values of its own parameters (seeded: same for any world size)
    frozen_parameters            its own parameters that never train (AsyLoRA's A)
    optim_group(name)            the optimizer group of each trainable parameter, with LR / weight-decay
                                 multipliers (LoRA+ puts B at lambda x lr)
    delta_weight()               the exact fp32 dW: W_merged x == forward(x) (paper Eq. 3)
    merge_and_reinit(...)        a ReLoRA-style restart: fold dW into W, re-initialise
    init_from_base()             values that depend on the base weight (DoRA's magnitude), set again
                                 whenever the base weight is (re)loaded
    describe()                   its sizes for the run log and the plan ({"r": 8}, {"r_hat": 115, "type": "1"})
    flops_per_token(...)         its own GEMMs per token, for the plan and MFU
    size_description()           what a too-large adapter's error message calls its parameters
and, for reports: `label` / `restart_label`, `colour` / `restart_colour`, `high_rank`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from megamora.config import AdapterConfig, RestartConfig, TrainConfig
    from megamora.model import InitFn


@dataclass(frozen=True)
class OptimGroup:
    """The optimizer group an adapter parameter joins: a name and multipliers of optim.lr and
    optim.weight_decay. Parameters with the same group share one (DeepSpeed keeps a step count per group)."""

    name: str = "adapters"
    lr_scale: float = 1.0
    weight_decay_scale: float = 1.0


ADAPTER_GROUP = OptimGroup()


class AdapterLinear(nn.Module):
    kind: ClassVar[str] = ""  # adapter.kind
    label: ClassVar[str] = ""  # the row name in reports ("LoRA"), and with restarts ("ReLoRA")
    restart_label: ClassVar[str] = ""
    colour: ClassVar[str] = "#2ca02c"
    restart_colour: ClassVar[str] = "#2ca02c"
    high_rank: ClassVar[bool] = False  # Figure 5's family: MoRA-like (True) or LoRA-like (False)
    param_init: ClassVar[dict[str, InitFn]] = {}
    frozen_parameters: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base: nn.Linear, dropout: float):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    # --- construction and configuration

    @classmethod
    def from_config(cls, base: nn.Linear, cfg: AdapterConfig) -> AdapterLinear:
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        """Raise ConfigError (one line) for a bad value of this kind's own options."""

    # --- parameters and the optimizer

    def own_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The adapter's parameters, frozen ones included (not the wrapped base layer's)."""
        return ((n, p) for n, p in self.named_parameters() if not n.startswith("base."))

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.own_parameters() if n not in self.frozen_parameters)

    def optim_group(self, name: str) -> OptimGroup:
        return ADAPTER_GROUP

    # --- the update and restarts

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merge_and_reinit(self, seed: int = 0, key: str = "", restart: int = 1,
                         restarts: RestartConfig | None = None) -> None:
        """Restart number `restart` (1-based): fold dW into the base weight and re-initialise. Every
        rank must call it when sharded."""
        raise NotImplementedError

    def restore_restarts(self, restarts_done: int, restarts: RestartConfig) -> None:
        """Put the layer back in the state it has after `restarts_done` restarts (before its weights load)."""

    def restart_event(self, restarts: RestartConfig, restart: int) -> dict[str, Any]:
        """What the restart record says about this kind (MoRA: the operator type that comes next)."""
        return {}

    def check_restarts(self, restarts: RestartConfig, name: str) -> None:
        """ValueError (one line) where this layer cannot go through the configured restarts."""

    def init_from_base(self) -> None:
        """Set what depends on the base weight's values (called after init and after a warm start)."""

    # --- describing it

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def flops_per_token(self, input_grad: bool, tokens: int) -> int:
        """The adapter's own FLOPs per token of a training step (forward and backward); `tokens`: tokens
        in one forward, for work done once per forward (DoRA's weight norm)."""
        raise NotImplementedError

    def size_description(self) -> str:
        """What the run's size check names when the adapter outnumbers the weight it adapts."""
        return f"{self.label}'s parameters"

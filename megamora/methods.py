"""What a run is, as tables and figures name it: its label, colour and rank family, read from its
config (adapter kind and restarts; an optimizer-level method). The adapter and optimizer registries
are the only places that know the kinds; this module only asks them."""

from __future__ import annotations

from dataclasses import dataclass

from megamora.config import TrainConfig

FULL_RANK_COLOUR = "#555555"


@dataclass(frozen=True)
class Method:
    label: str  # "LoRA", "ReMoRA", "Full-rank", ...
    colour: str  # one colour per method in every figure
    high_rank: bool  # Figure 5's family: full-rank updates (MoRA, full rank) vs low-rank ones (LoRA)
    restarts: bool = False


def method_of(cfg: TrainConfig) -> Method:
    """The Table 3 row a run belongs to, from its config alone."""
    if cfg.optim.name != "adamw":  # an optimizer-level method (GaLore, APOLLO): full weights, its own row
        from megamora.optimizers import optimizer_class

        opt = optimizer_class(cfg.optim.name)
        return Method(opt.label, opt.colour, opt.high_rank)
    if cfg.adapter.kind == "none":
        return Method("Full-rank", FULL_RANK_COLOUR, high_rank=True)
    from megamora.adapters import adapter_class

    cls = adapter_class(cfg.adapter.kind)
    if cfg.restarts.every:
        return Method(cls.restart_label, cls.restart_colour, cls.high_rank, restarts=True)
    return Method(cls.label, cls.colour, cls.high_rank)

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


FULL_RANK = Method("Full-rank", FULL_RANK_COLOUR, high_rank=True)  # no adapter: the baseline every method is held to


def method_of(cfg: TrainConfig) -> Method:
    """The Table 3 row a run belongs to, from its config alone."""
    if cfg.optim.name != "adamw":  # an optimizer-level method (GaLore, APOLLO): full weights, its own row
        from megamora.optimizers import optimizer_class

        opt = optimizer_class(cfg.optim.name)
        return Method(opt.label, opt.colour, opt.high_rank)
    if cfg.adapter.kind == "none":
        return FULL_RANK
    from megamora.adapters import adapter_class

    return _adapter_method(adapter_class(cfg.adapter.kind), restarts=bool(cfg.restarts.every))


def _adapter_method(cls: type, restarts: bool) -> Method:
    if restarts:
        return Method(cls.restart_label, cls.restart_colour, cls.high_rank, restarts=True)
    return Method(cls.label, cls.colour, cls.high_rank)


def known_methods() -> list[Method]:
    """Every method a config can name: full rank, each registered adapter kind without and with
    restarts, each optimizer-level method (e.g. to tell which method a run's free-text name names)."""
    from megamora.adapters import ADAPTERS, adapter_class
    from megamora.optimizers import OPTIMIZERS, optimizer_class

    optimizers = [optimizer_class(name) for name in OPTIMIZERS if name != "adamw"]
    return [FULL_RANK, *(_adapter_method(adapter_class(kind), restarts) for kind in ADAPTERS
                         for restarts in (False, True)),
            *(Method(opt.label, opt.colour, opt.high_rank) for opt in optimizers)]

"""Optimizers behind one seam: `optim.name` picks one. `adamw` (torch's fused AdamW, the default)
and the optimizer-level methods that pretraining compares against adapters: GaLore (gradient
low-rank projection) and APOLLO (random projection, channel-wise scaling).

A method is one module here (the protocol: megamora/optimizers/base.py) plus one line in OPTIMIZERS.
"""

from __future__ import annotations

import importlib

# optim.name -> "module:class", imported on use (the one place that lists the optimizers)
OPTIMIZERS = {
    "adamw": "megamora.optimizers.adamw:AdamWMethod",
    "galore_adamw": "megamora.optimizers.galore:GaLoreMethod",
    "apollo_adamw": "megamora.optimizers.apollo:ApolloMethod",
}


def optimizer_class(name: str):
    """The OptimizerMethod class of `optim.name`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r} is not one of {list(OPTIMIZERS)}")
    module, cls = OPTIMIZERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["OPTIMIZERS", "optimizer_class"]

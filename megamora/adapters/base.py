"""What every adapter layer shares: a frozen wrapped nn.Linear (`base`) and dropout on the adapter's input."""

from __future__ import annotations

from typing import ClassVar

from torch import nn


class AdapterLinear(nn.Module):
    # How reports name and colour a run of this kind, without and with ReLoRA-style restarts, and
    # whether Figure 5 counts it with the high-rank family (MoRA) or the low-rank one (LoRA).
    kind: ClassVar[str] = ""
    label: ClassVar[str] = ""
    restart_label: ClassVar[str] = ""
    colour: ClassVar[str] = "#2ca02c"
    restart_colour: ClassVar[str] = "#2ca02c"
    high_rank: ClassVar[bool] = False

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

"""What every adapter layer shares: a frozen wrapped nn.Linear (`base`) and dropout on the adapter's input."""

from __future__ import annotations

from torch import nn


class AdapterLinear(nn.Module):
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

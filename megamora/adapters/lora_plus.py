"""LoRA+ (Hayou et al., 2024): LoRA whose B learns at lambda times A's learning rate, for efficient
feature learning at large width. The layer is LoRA's; only the optimizer groups differ, as PEFT's
`create_loraplus_optimizer` builds them for the adapter parameters (A at lr, B at lambda x lr, both
weight-decayed). lambda is `adapter.loraplus_lr_ratio`; default 4, the larger of the MoRA paper's
search {2, 4} (Sec. 5.1) and the nearer to LoRA+'s own recommendation (2^4)."""

from __future__ import annotations

from torch import nn

from megamora.adapters.base import ADAPTER_GROUP, OptimGroup
from megamora.adapters.lora import LoRALinear
from megamora.config import AdapterConfig, ConfigError, TrainConfig


class LoRAPlusLinear(LoRALinear):
    kind, label, restart_label = "lora_plus", "LoRA+", "ReLoRA+"
    colour, restart_colour = "#17becf", "#0e7c86"  # teal: a LoRA variant, apart from LoRA's blues

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, lr_ratio: float = 4.0):
        super().__init__(base, r, alpha, dropout)
        self.lr_ratio = lr_ratio
        self.b_group = OptimGroup("adapters_lora_B", lr_scale=lr_ratio)

    @classmethod
    def from_config(cls, base: nn.Linear, cfg: AdapterConfig) -> LoRAPlusLinear:
        return cls(base, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, lr_ratio=cfg.loraplus_lr_ratio)

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        if not cfg.adapter.loraplus_lr_ratio > 0:
            raise ConfigError(f"adapter.loraplus_lr_ratio={cfg.adapter.loraplus_lr_ratio} must be positive")

    def optim_group(self, name: str) -> OptimGroup:
        return self.b_group if name == "lora_B" else ADAPTER_GROUP

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lr_ratio={self.lr_ratio}"

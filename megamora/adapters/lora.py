"""LoRA (Hu et al., 2021) as PEFT implements it: h = W0 x + (alpha / r) B A dropout(x), A kaiming-
uniform(a=sqrt(5)), B = 0 at start (dW = 0, yet B gets a gradient because A != 0), and the
ReLoRA restart (merge B A into W0, redraw A, zero B)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from megamora.adapters.base import AdapterLinear
from megamora.config import AdapterConfig, RestartConfig
from megamora.distributed import exact_fp32_matmuls
from megamora.engines.tensors import add_full_, full_tensor, seeded_fill_, set_full_
from megamora.model import InitFn, kaiming_uniform_init, zeros_init


class LoRALinear(AdapterLinear):
    """A frozen nn.Linear (`base`) plus `lora_A` (r, in) and `lora_B` (out, r), scaled by alpha / r."""

    kind, label, restart_label = "lora", "LoRA", "ReLoRA"
    colour, restart_colour = "#6baed6", "#08519c"  # the LoRA family in blues
    param_init: ClassVar[dict[str, InitFn]] = {"lora_A": kaiming_uniform_init, "lora_B": zeros_init}

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        if r <= 0:
            raise ValueError(f"r={r} must be positive")
        super().__init__(base, dropout)
        self.r = r
        self.alpha = alpha
        self.scale = alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        if w.device.type != "meta":  # eager construction; a meta model gets A from init_weights
            self.init_lora_A_eagerly()

    @torch.no_grad()
    def init_lora_A_eagerly(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # from the global RNG, as PEFT

    @classmethod
    def from_config(cls, base: nn.Linear, cfg: AdapterConfig) -> LoRALinear:
        return cls(base, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = nn.functional.linear(self.dropout(x), self.lora_A)
        # addmm folds the scale and the residual add into the second GEMM
        out = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, self.r), self.lora_B.t(), alpha=self.scale)
        return out.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    @exact_fp32_matmuls()
    def delta_weight(self) -> torch.Tensor:
        """(out, in) fp32: scale * B A. With sharded factors every rank must call this (a gather)."""
        return (full_tensor(self.lora_B).float() @ full_tensor(self.lora_A).float()) * self.scale

    @torch.no_grad()
    def merge_and_reinit(self, seed: int = 0, key: str = "", restart: int = 1,
                         restarts: RestartConfig | None = None) -> None:
        """ReLoRA restart: W0 += scale B A; A drawn again as at init (`param_init`) from (seed, key),
        the same values for any world size; B = 0. Every rank must call it when sharded."""
        add_full_(self.base.weight, self.delta_weight())
        seeded_fill_(self.lora_A, self.param_init["lora_A"], seed, key)
        set_full_(self.lora_B, torch.zeros(self.out_features, self.r))

    def describe(self) -> dict:
        return {"r": self.r}

    def flops_per_token(self, input_grad: bool, tokens: int) -> int:
        # x A^T, then h B^T; grads of B, h and A; then x's
        n_in, n_out, r = self.in_features, self.out_features, self.r
        return 2 * r * (n_in + n_out) + 2 * r * (2 * n_out + n_in) + (2 * r * n_in if input_grad else 0)

    def size_description(self) -> str:
        return f"{self.label}'s A and B (r x (in + out))"

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"

"""DoRA (Liu et al., 2024): the weight split into a magnitude m (one per output row) and a direction,
with LoRA on the direction:

    W' = m * (W + s B A) / ||W + s B A||        (row norms: PEFT's per-output-feature norm; s = alpha / r)
    h  = W' x + b

as PEFT's `LoraConfig(use_dora=True)` computes it: m starts at the row norms of W (so W' = W at
start, B = 0), and the norm is detached from the graph by default (DoRA Sec. 4.3, the memory-saving
variant PEFT uses; `adapter.dora_detach_norm=false` back-propagates through it). With dropout in
training, PEFT's form W x + (m / ||.|| - 1) W x_d + (m / ||.||) s B A x_d (x_d = dropout(x)) is kept.

A restart merges W' into the base weight, redraws A, zeroes B and sets m to the merged rows' norms:
the layer computes the same function before and after."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from megamora.adapters.lora import LoRALinear
from megamora.config import AdapterConfig, RestartConfig
from megamora.distributed import exact_fp32_matmuls
from megamora.engines.tensors import full_tensor, set_full_
from megamora.model import InitFn, kaiming_uniform_init, zeros_init


def _ones_init(t: torch.Tensor, g: torch.Generator | None) -> None:
    t.fill_(1.0)  # a placeholder: init_from_base sets the norms once the base weight has its values


class DoRALinear(LoRALinear):
    kind, label, restart_label = "dora", "DoRA", "ReDoRA"
    colour, restart_colour = "#9467bd", "#54278f"  # purples
    # dW = (diag(m / ||W + s B A||) - I) W + ...: the magnitude rescales every row of the full W, so dW is
    # not rank-limited (measured: numerical rank 255-256 of 256 at r 40 in the CPU recipe)
    high_rank = True
    param_init: ClassVar[dict[str, InitFn]] = {"lora_A": kaiming_uniform_init, "lora_B": zeros_init,
                                               "magnitude": _ones_init}

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, detach_norm: bool = True):
        super().__init__(base, r, alpha, dropout)
        self.detach_norm = detach_norm
        w = base.weight
        self.magnitude = nn.Parameter(torch.empty(base.out_features, device=w.device, dtype=w.dtype))
        if w.device.type != "meta":
            self.init_from_base()

    @classmethod
    def from_config(cls, base: nn.Linear, cfg: AdapterConfig) -> DoRALinear:
        return cls(base, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, detach_norm=cfg.dora_detach_norm)

    @torch.no_grad()
    def init_from_base(self) -> None:
        """m = the row norms of the base weight (every rank must call it when sharded)."""
        set_full_(self.magnitude, full_tensor(self.base.weight).float().norm(dim=1))

    def _row_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output row, in fp32 whatever autocast says."""
        with torch.autocast(weight.device.type, enabled=False), torch.set_grad_enabled(
                torch.is_grad_enabled() and not self.detach_norm):
            v = weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())
            return torch.linalg.vector_norm(v, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.base.weight, self.base.bias
        xd = self.dropout(x)
        lora = F.linear(F.linear(xd, self.lora_A), self.lora_B)
        ratio = self.magnitude / self._row_norm(weight)
        if xd is x:  # no dropout (or eval): W' x + b in one pass
            y = (F.linear(x, weight) + self.scale * lora) * ratio.to(lora.dtype)
            return y + bias if bias is not None else y
        ratio = ratio.to(lora.dtype)
        # F.linear, not self.base(x): ZeRO-3 would free the gathered weight after base's own forward
        return F.linear(x, weight, bias) + (ratio - 1) * F.linear(xd, weight) + ratio * (self.scale * lora)

    @torch.no_grad()
    @exact_fp32_matmuls()
    def delta_weight(self) -> torch.Tensor:
        """(out, in) fp32: W' - W. With sharded parameters every rank must call this (a gather)."""
        w = full_tensor(self.base.weight).float()
        v = w + self.scale * (full_tensor(self.lora_B).float() @ full_tensor(self.lora_A).float())
        m = full_tensor(self.magnitude).float()
        return (m / torch.linalg.vector_norm(v, dim=1)).unsqueeze(1) * v - w

    @torch.no_grad()
    def merge_and_reinit(self, seed: int = 0, key: str = "", restart: int = 1,
                         restarts: RestartConfig | None = None) -> None:
        """W = W'; A redrawn, B = 0 (LoRA's restart); m = the merged rows' norms (W' again at once)."""
        super().merge_and_reinit(seed, key, restart, restarts)
        self.init_from_base()

    def flops_per_token(self, input_grad: bool, tokens: int) -> float:
        n_in, n_out, r = self.in_features, self.out_features, self.r
        per_forward = 2 * n_out * r * n_in  # B A, for the norm
        if not self.detach_norm:  # its gradient: into B and into A
            per_forward *= 3
        dropout = not isinstance(self.dropout, nn.Identity)  # PEFT's form: W x_d once more, and its x grad
        extra = 2 * n_in * n_out * (1 + input_grad) if dropout else 0
        return super().flops_per_token(input_grad, tokens) + extra + per_forward / tokens

    def size_description(self) -> str:
        return f"{self.label}'s A, B and m (r x (in + out) + out)"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, detach_norm={self.detach_norm}"

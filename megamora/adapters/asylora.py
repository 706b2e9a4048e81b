"""AsyLoRA (Zhu et al., 2024, "Asymmetry in Low-Rank Adapters of Foundation Models"): LoRA whose A
is a random orthonormal projection that never trains, and whose B (zero at start) does all the
learning. The paper shows B carries what the adapter learns while a random A does as well as a
learned one (and generalises better); the MoRA paper adopts this initialisation (its Sec. 5.1).
So A is drawn with orthonormal rows from (seed, name), frozen; B = 0, trained; scale alpha / r.
A restart (ReLoRA-style) merges B A and draws a new random A: each segment learns in a new subspace."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from megamora.adapters.lora import LoRALinear
from megamora.model import InitFn, zeros_init


def orthonormal_rows_init(t: torch.Tensor, g: torch.Generator | None) -> None:
    """A random (r, in) matrix with orthonormal rows (r <= in; orthonormal columns otherwise)."""
    nn.init.orthogonal_(t, generator=g)


class AsyLoRALinear(LoRALinear):
    kind, label, restart_label = "asylora", "AsyLoRA", "ReAsyLoRA"
    colour, restart_colour = "#9ecae1", "#3182bd"  # the LoRA family's blues, lighter
    param_init: ClassVar[dict[str, InitFn]] = {"lora_A": orthonormal_rows_init, "lora_B": zeros_init}
    frozen_parameters = ("lora_A",)

    @torch.no_grad()
    def init_lora_A_eagerly(self) -> None:
        orthonormal_rows_init(self.lora_A, None)

    def flops_per_token(self, input_grad: bool, tokens: int) -> int:
        # x A^T, then h B^T; B's grad; h's and x's only where x needs one (A is frozen)
        n_in, n_out, r = self.in_features, self.out_features, self.r
        return 2 * r * (n_in + n_out) + 2 * r * n_out + (2 * r * (n_out + n_in) if input_grad else 0)

    def size_description(self) -> str:
        return f"{self.label}'s A and B (r x (in + out))"

"""Adapters swapped into the Llama: LoRA and MoRA wrappers around the targeted nn.Linear layers.

    apply_adapters(model, cfg.adapter)  # on the meta-device model, before sharding; returns a summary
    for name, layer in iter_adapters(model): ...
    merge_adapters(model)               # fold every dW into its base weight: a plain Llama again
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from megamora.adapters.lora import LoRALinear
from megamora.adapters.mora import MORA_TYPES, MoRALinear, canonical_mora_type, mora_r_hat
from megamora.config import AdapterConfig
from megamora.engines.tensors import add_full_
from megamora.model import RMSNorm, count_parameters

__all__ = [
    "MORA_TYPES", "LoRALinear", "MoRALinear", "apply_adapters", "canonical_mora_type", "describe_adapters",
    "base_parameters", "iter_adapters", "merge_adapters", "mora_r_hat",
]

ADAPTER_TYPES = (LoRALinear, MoRALinear)

# adapter.kind -> "module:class": the one place that lists the kinds (as ENGINES does for engines).
ADAPTERS = {
    "lora": "megamora.adapters.lora:LoRALinear",
    "mora": "megamora.adapters.mora:MoRALinear",
}


def adapter_class(kind: str) -> type:
    if kind not in ADAPTERS:
        raise ValueError(f"adapter.kind={kind!r} is not one of {['none', *ADAPTERS]}")
    module, cls = ADAPTERS[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, adapter layer) in module order: the same order on every rank."""
    for name, module in model.named_modules():
        if isinstance(module, ADAPTER_TYPES):
            yield name, module


def _wrap(linear: nn.Linear, cfg: AdapterConfig) -> nn.Module:
    if cfg.kind == "lora":
        return LoRALinear(linear, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
    return MoRALinear(linear, r=cfg.r, mora_type=cfg.mora_type, dropout=cfg.dropout, r_hat_rule=cfg.r_hat_rule)


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> dict[str, Any]:
    """Replace every nn.Linear named in `cfg.target_modules` by a LoRA / MoRA wrapper (in place),
    freeze everything but the adapters and, as the config says, the embeddings, head and norms.
    Works on a meta-device model. kind "none" changes nothing. Returns `describe_adapters(model)`."""
    if cfg.kind == "none":
        return describe_adapters(model)
    if cfg.kind not in ("lora", "mora"):
        raise ValueError(f"adapter.kind={cfg.kind!r} is not one of ['none', 'lora', 'mora']")
    targets = set(cfg.target_modules)
    wrapped = 0
    for parent in list(model.modules()):
        if isinstance(parent, ADAPTER_TYPES):
            continue
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(parent, child_name, _wrap(child, cfg))
                wrapped += 1
    if wrapped == 0:
        raise ValueError(f"adapter.target_modules={list(cfg.target_modules)} matched no nn.Linear in the model")
    _set_trainable(model, cfg)
    return describe_adapters(model)


def _set_trainable(model: nn.Module, cfg: AdapterConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in iter_adapters(model):
        for name, p in layer.named_parameters():
            if not name.startswith("base."):
                p.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, (RMSNorm, nn.RMSNorm, nn.LayerNorm)):
            for p in module.parameters():
                p.requires_grad_(cfg.train_norms)
    embed, head = getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)
    if head is not None:
        head.weight.requires_grad_(cfg.train_head)
    if embed is not None:  # a tied head trains if either flag asks for it
        embed.weight.requires_grad_(cfg.train_embeddings or (head is not None and head.weight is embed.weight
                                                             and cfg.train_head))


def describe_adapters(model: nn.Module) -> dict[str, Any]:
    """What the run log states: trainable / total parameters and, per module type (q_proj, ...),
    LoRA's r or MoRA's r_hat and operator type. JSON-serialisable."""
    kinds: set[str] = set()
    sizes: dict[str, set[int]] = defaultdict(set)
    types: dict[str, set[str]] = defaultdict(set)
    adapter_params = 0
    for name, layer in iter_adapters(model):
        short = name.rsplit(".", 1)[-1]
        adapter_params += sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base."))
        if isinstance(layer, MoRALinear):
            kinds.add("mora")
            sizes[short].add(layer.r_hat)
            types[short].add(layer.mora_type)
        else:
            kinds.add("lora")
            sizes[short].add(layer.r)
    summary: dict[str, Any] = {
        "adapter_kind": "+".join(sorted(kinds)) or "none",
        "trainable_params": count_parameters(model, trainable_only=True),
        "total_params": count_parameters(model),
        "adapter_params": adapter_params,
    }
    flat = {k: min(v) if len(v) == 1 else sorted(v) for k, v in sizes.items()}
    if kinds == {"lora"}:
        summary["lora_r"] = flat
    elif kinds:
        summary["mora_r_hat"] = flat
        summary["mora_type"] = {k: min(v) if len(v) == 1 else sorted(v) for k, v in types.items()}
    return summary


@torch.no_grad()
def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a plain (full-rank) model of the same shapes also has, under its names
    (`q_proj.base.weight` as `q_proj.weight`); the adapters' own parameters left out, tied weights once."""
    own = {id(p) for _, layer in iter_adapters(model) for n, p in layer.named_parameters() if not n.startswith("base.")}
    return {name.replace(".base.", "."): p for name, p in model.named_parameters() if id(p) not in own}


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter's exact dW into its base weight and put the base nn.Linear back in its
    place: the result is a plain Llama computing the same function (in place; returned). Works on
    a sharded model too (every rank must call it; the adapters' M / A / B are gathered)."""
    for name, layer in list(iter_adapters(model)):
        add_full_(layer.base.weight, layer.delta_weight())
        if not name:
            return layer.base
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    return model

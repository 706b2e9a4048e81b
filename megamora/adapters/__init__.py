"""Adapters swapped into the Llama: one wrapper kind around the targeted nn.Linear layers.

    apply_adapters(model, cfg.adapter)  # on the meta-device model, before sharding; returns a summary
    for name, layer in iter_adapters(model): ...
    merge_adapters(model)               # fold every dW into its base weight: a plain Llama again

A kind is one module here (the protocol: megamora/adapters/base.py) plus one line in ADAPTERS.
Nothing outside this package names a kind.
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from megamora.adapters.base import ADAPTER_GROUP, AdapterLinear, OptimGroup
from megamora.adapters.lora import LoRALinear
from megamora.adapters.mora import MORA_TYPES, MoRALinear, canonical_mora_type, mora_r_hat
from megamora.config import AdapterConfig
from megamora.engines.tensors import add_full_
from megamora.model import RMSNorm, count_parameters

__all__ = [
    "ADAPTERS", "ADAPTER_GROUP", "AdapterLinear", "MORA_TYPES", "LoRALinear", "MoRALinear", "OptimGroup",
    "adapter_class", "adapter_parameters", "apply_adapters", "base_parameters", "canonical_mora_type",
    "describe_adapters", "init_from_base", "iter_adapters", "merge_adapters", "mora_r_hat",
]

# adapter.kind -> "module:class": the one place that lists the kinds (as ENGINES does for engines).
ADAPTERS = {
    "lora": "megamora.adapters.lora:LoRALinear",
    "mora": "megamora.adapters.mora:MoRALinear",
    "lora_plus": "megamora.adapters.lora_plus:LoRAPlusLinear",
    "asylora": "megamora.adapters.asylora:AsyLoRALinear",
    "dora": "megamora.adapters.dora:DoRALinear",
}


def adapter_class(kind: str) -> type[AdapterLinear]:
    if kind not in ADAPTERS:
        raise ValueError(f"adapter.kind={kind!r} is not one of {['none', *ADAPTERS]}")
    module, cls = ADAPTERS[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def iter_adapters(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(qualified name, adapter layer) in module order: the same order on every rank."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> dict[str, Any]:
    """Replace every nn.Linear named in `cfg.target_modules` by the configured kind's wrapper (in
    place), freeze everything but the adapters' trainable parameters and, as the config says, the
    embeddings, head and norms. Works on a meta-device model. kind "none" changes nothing. Returns
    `describe_adapters(model)`."""
    if cfg.kind == "none":
        return describe_adapters(model)
    cls = adapter_class(cfg.kind)
    targets = set(cfg.target_modules)
    wrapped = 0
    for parent in list(model.modules()):
        if isinstance(parent, AdapterLinear):
            continue
        for child_name, child in list(parent.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(parent, child_name, cls.from_config(child, cfg))
                wrapped += 1
    if wrapped == 0:
        raise ValueError(f"adapter.target_modules={list(cfg.target_modules)} matched no nn.Linear in the model")
    _set_trainable(model, cfg)
    return describe_adapters(model)


def _set_trainable(model: nn.Module, cfg: AdapterConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model):
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


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors of every adapter (not the frozen base weights they wrap, nor frozen
    adapter tensors such as AsyLoRA's A): what a restart re-initialises and resets in the optimizer."""
    return [p for _, layer in iter_adapters(model) for _, p in layer.trainable_parameters()]


def adapter_optim_groups(model: nn.Module) -> dict[int, OptimGroup]:
    """id(parameter) -> its optimizer group, for every adapter's trainable parameters."""
    return {id(p): layer.optim_group(n) for _, layer in iter_adapters(model) for n, p in layer.trainable_parameters()}


def describe_adapters(model: nn.Module) -> dict[str, Any]:
    """What the run log states: trainable / total parameters and, per module type (q_proj, ...), what
    each kind says of its size (`describe()`: LoRA's r, MoRA's r_hat and operator type), as
    `<kind>_<key>`. JSON-serialisable."""
    kinds: set[str] = set()
    values: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    adapter_params = 0
    for name, layer in iter_adapters(model):
        short = name.rsplit(".", 1)[-1]
        adapter_params += sum(p.numel() for _, p in layer.own_parameters())
        kinds.add(layer.kind)
        for key, value in layer.describe().items():
            values[f"{layer.kind}_{key}"][short].add(value)
    summary: dict[str, Any] = {
        "adapter_kind": "+".join(sorted(kinds)) or "none",
        "trainable_params": count_parameters(model, trainable_only=True),
        "total_params": count_parameters(model),
        "adapter_params": adapter_params,
    }
    for key, per_module in values.items():
        summary[key] = {k: min(v) if len(v) == 1 else sorted(v) for k, v in per_module.items()}
    return summary


@torch.no_grad()
def base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a plain (full-rank) model of the same shapes also has, under its names
    (`q_proj.base.weight` as `q_proj.weight`); the adapters' own parameters left out, tied weights once."""
    own = {id(p) for _, layer in iter_adapters(model) for _, p in layer.own_parameters()}
    return {name.replace(".base.", "."): p for name, p in model.named_parameters() if id(p) not in own}


@torch.no_grad()
def init_from_base(model: nn.Module) -> None:
    """Let every adapter set what depends on its base weight's values (DoRA's magnitude): after the
    weights are drawn and again after a warm start loads them. Every rank must call it when sharded."""
    for _, layer in iter_adapters(model):
        layer.init_from_base()


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter's exact dW into its base weight and put the base nn.Linear back in its
    place: the result is a plain Llama computing the same function (in place; returned). Works on
    a sharded model too (every rank must call it; the adapters' parameters are gathered)."""
    for name, layer in list(iter_adapters(model)):
        add_full_(layer.base.weight, layer.delta_weight())
        if not name:
            return layer.base
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base)
    return model

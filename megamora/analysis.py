"""The accumulated update dW = W_now - W_init of each projection, and its spectrum (Figure 5); of
state dicts, or of a run directory's checkpoint (run_deltas, run_singular_value_counts).

Keys follow the plain model's naming ("layers.{i}.self_attn.q_proj.weight"); an adapted layer's
wrapped weight ("...q_proj.base.weight") maps to the same name, so full-rank, LoRA and MoRA runs
compare directly. For un-merged adapter runs, merge the adapters into the base weights first.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from megamora.engines.tensors import full_tensor
from megamora.export import find_checkpoint, initial_weights, load_merged_model

MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PROJ_WEIGHT = re.compile(r"(?:^|\.)(" + "|".join(MODULE_TYPES) + r")\.weight$")
# Name levels added by wrappers (torch.compile, DDP, activation checkpointing) or by an adapter.
_DROPPED_LEVELS = {"_orig_mod", "module", "_checkpoint_wrapped_module", "base"}


def plain_name(key: str) -> str:
    """The plain-model name of a state-dict key (drops wrapper levels and the adapter's `base`)."""
    parts = key.split(".")
    return ".".join([p for p in parts[:-1] if p not in _DROPPED_LEVELS] + parts[-1:])


def module_type(name: str) -> str | None:
    """`q_proj` ... `down_proj` for a projection weight's name, None for anything else."""
    match = _PROJ_WEIGHT.search(plain_name(name))
    return match.group(1) if match else None


def delta_weights(initial: dict[str, Tensor], current: dict[str, Tensor]) -> dict[str, Tensor]:
    """dW = current - initial (fp32) for every 2-D projection weight present in both state dicts."""
    init = {plain_name(k): v for k, v in initial.items() if module_type(k)}
    deltas = {}
    for key, now in current.items():
        name = plain_name(key)
        if not module_type(key) or name not in init or now.ndim != 2:
            continue
        before = init[name]
        if tuple(before.shape) != tuple(now.shape):
            raise ValueError(
                f"delta_weights: {name} has shape {tuple(now.shape)} now but {tuple(before.shape)} initially"
            )
        deltas[name] = full_tensor(now).float() - full_tensor(before).float().to(now.device)
    return deltas


def _check_2d(dw: Tensor) -> None:
    if dw.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(dw.shape)}")


def singular_values(dw: Tensor) -> Tensor:
    """Singular values of dW in fp32, descending."""
    _check_2d(dw)
    return torch.linalg.svdvals(full_tensor(dw).float())


def count_above(dw: Tensor, threshold: float = 0.1) -> int:
    """Number of singular values strictly above `threshold` (Figure 5 uses 0.1)."""
    return int((singular_values(dw) > threshold).sum())


def rank_of(dw: Tensor, rtol: float | None = None) -> int:
    """Numerical rank, computed in fp64: singular values above rtol * sigma_max count.

    Default rtol = max(m, n) * eps of dw's own dtype (torch's rule, but with the precision the data
    was computed in: an fp32 dW carries fp32 rounding noise that fp64's eps would count as rank).
    """
    _check_2d(dw)
    dw = full_tensor(dw)
    if rtol is None:
        eps = torch.finfo(dw.dtype).eps if dw.is_floating_point() else torch.finfo(torch.float64).eps
        rtol = max(dw.shape) * eps
    return int(torch.linalg.matrix_rank(dw.double(), rtol=rtol))


def singular_value_counts(deltas: dict[str, Tensor], threshold: float = 0.1) -> dict[str, float]:
    """Per module type ("q_proj", ...): the mean over layers of the count of singular values > threshold."""
    counts: dict[str, list[int]] = {}
    for name, dw in deltas.items():
        kind = module_type(name)
        if kind is None:
            raise ValueError(f"singular_value_counts: {name!r} is not a projection weight ({', '.join(MODULE_TYPES)})")
        counts.setdefault(kind, []).append(count_above(dw, threshold))
    return {kind: sum(counts[kind]) / len(counts[kind]) for kind in MODULE_TYPES if kind in counts}


def numerical_ranks(deltas: dict[str, Tensor]) -> dict[str, float]:
    """Per module type: the mean over layers of the numerical rank of dW (rank_of)."""
    ranks: dict[str, list[int]] = {}
    for name, dw in deltas.items():
        ranks.setdefault(module_type(name), []).append(rank_of(dw))
    return {kind: sum(v) / len(v) for kind, v in ranks.items()}


# --------------------------------------------------------------------------- of a run directory


@torch.no_grad()
def run_deltas(run_dir: str | Path, checkpoint: str | Path | None = None,
               device: str | torch.device = "cpu", since: str | Path | None = None) -> dict[str, Tensor]:
    """dW = W_final (adapters merged) - W_init of a run's checkpoint (default: the newest), in fp32;
    W_init is the seeded initialisation, or the warm start's weights. With `since` (an earlier
    checkpoint of the run), W_init is that checkpoint's merged weights: the update of one stretch of
    the run, such as one ReLoRA merge segment."""
    _, model = load_merged_model(run_dir, find_checkpoint(run_dir, checkpoint))
    current = {k: v.to(device) for k, v in model.state_dict().items() if module_type(k)}
    if since is None:
        initial = initial_weights(run_dir)
    else:
        initial = load_merged_model(run_dir, find_checkpoint(run_dir, since))[1].state_dict()
    return delta_weights(initial, current)


def run_singular_value_counts(run_dir: str | Path, checkpoint: str | Path | None = None, threshold: float = 0.1,
                              device: str | torch.device = "cpu",
                              since: str | Path | None = None) -> dict[str, float]:
    """Figure 5 for one run: per module type, the mean over layers of the number of singular values
    above `threshold` of its dW (since `since`, an earlier checkpoint, where given)."""
    return singular_value_counts(run_deltas(run_dir, checkpoint, device, since), threshold)

"""The oldest torch and DeepSpeed releases the code works with, and why: each floor is the newest of
the features below. setup.cfg states the same floors (tests/test_versions.py holds them equal, and
fails when an entry here is newer than setup.cfg's floor); `check_versions` refuses an older
install at start-up in one line, instead of an AttributeError or a TypeError deep in the run.
Tested on: torch 2.13.0 (CPU), DeepSpeed 0.19.8 (the versions CI installs); the floors themselves
are derived from the releases that introduced each feature, not run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class Feature:
    package: str  # distribution name, as in setup.cfg
    version: str  # the first release that has it
    what: str  # the feature, as the code spells it
    where: str  # the file that uses it (relative to the repository root)
    why: str


FEATURES: tuple[Feature, ...] = (
    Feature("torch", "2.7", "src_data_rank", "megamora/engines/fsdp2.py",
            "distribute_tensor(src_data_rank=None): shard a full value every rank holds, without a broadcast"),
    Feature("torch", "2.7", "recompile_limit", "megamora/compute.py",
            "torch._dynamo.config.recompile_limit (torch 2.6 calls it cache_size_limit)"),
    Feature("torch", "2.6", "from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard",
            "megamora/engines/fsdp2.py", "FSDP2 in its public namespace"),
    Feature("torch", "2.6", "torch.accelerator.synchronize", "megamora/metrics.py",
            "device-agnostic wait for queued work before timing"),
    Feature("torch", "2.5", "enable_gqa", "megamora/model.py", "scaled_dot_product_attention(enable_gqa=...)"),
    Feature("deepspeed", "0.19.3", "use_reentrant=False", "megamora/model.py",
            "ZeRO-3 + non-reentrant activation checkpointing with frozen parameters (LoRA / MoRA base weights): "
            "older releases partition a frozen weight during the recompute (CheckpointError, DeepSpeed PR #8148)"),
)


def parse_version(text: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '0.19.3' -> (0, 19, 3); local and pre-release tags ignored."""
    match = re.match(r"\d+(\.\d+)*", text.strip())
    if not match:
        raise ValueError(f"cannot read a version number from {text!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def floors() -> dict[str, str]:
    """package -> the oldest release with every feature the code uses."""
    out: dict[str, str] = {}
    for f in FEATURES:
        if f.package not in out or parse_version(f.version) > parse_version(out[f.package]):
            out[f.package] = f.version
    return out


def too_old(package: str, installed: str) -> Feature | None:
    """The newest feature `installed` lacks, or None."""
    missing = [f for f in FEATURES if f.package == package and parse_version(installed) < parse_version(f.version)]
    return max(missing, key=lambda f: parse_version(f.version), default=None)


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_versions(packages: tuple[str, ...] = ("torch",)) -> None:
    """Raise one ValueError naming the first installed package older than its floor (packages not
    installed are left to the code that imports them)."""
    for package in packages:
        version = installed_version(package)
        feature = too_old(package, version) if version else None
        if feature is not None:
            raise ValueError(f"{package} {version} is older than {feature.version}, the oldest release megamora runs on "
                             f"({feature.why}): pip install '{package}>={floors()[package]}'")

"""Version floors (issue 16, item 14): setup.cfg's torch and DeepSpeed floors are the newest of the
features the code uses (megamora/versions.py), every listed feature is real (in the file named, and
in the installed release), and an older install is refused at start-up in one line."""

from __future__ import annotations

import configparser
import inspect
import re
from pathlib import Path

import pytest

from megamora import versions
from megamora.config import ConfigError, load_config
from megamora.versions import FEATURES, check_versions, floors, parse_version, too_old

REPO = Path(__file__).resolve().parents[1]


def setup_cfg_floors() -> dict[str, str]:
    """package -> the version after '>=' in setup.cfg's install_requires and extras."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    lines = parser["options"]["install_requires"].splitlines()
    for extra in parser["options.extras_require"].values():
        lines += extra.splitlines()
    out = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)\s*", line)
        if match:
            out[match.group(1).lower()] = match.group(2)
    return out


def test_setup_cfg_floors_are_the_newest_feature_used():
    stated = setup_cfg_floors()
    for package, needed in floors().items():
        assert package in stated, f"setup.cfg states no floor for {package}"
        assert parse_version(stated[package]) >= parse_version(needed), (
            f"setup.cfg says {package}>={stated[package]}, but the code uses {too_old(package, stated[package]).what} "
            f"({needed}+)")
        assert stated[package] == needed, f"{package}: setup.cfg {stated[package]}, newest feature {needed}"


def test_every_listed_feature_is_used_where_it_says():
    for f in FEATURES:
        assert f.what in (REPO / f.where).read_text(), f"{f.what!r} not in {f.where}"


def _deepspeed_recompute_fix() -> bool:
    from deepspeed.runtime.zero import partitioned_param_coordinator

    return "_current_graph_task_id" in inspect.getsource(partitioned_param_coordinator)


def _has_fsdp2_public() -> bool:
    from torch.distributed import fsdp

    return hasattr(fsdp, "fully_shard") and hasattr(fsdp, "MixedPrecisionPolicy")


# How to see each feature in an installed release: the entries are checked against the real thing.
PROBES = {
    "src_data_rank": lambda: "src_data_rank" in inspect.signature(
        __import__("torch.distributed.tensor", fromlist=["distribute_tensor"]).distribute_tensor).parameters,
    "recompile_limit": lambda: hasattr(__import__("torch._dynamo", fromlist=["config"]).config, "recompile_limit"),
    "from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard": _has_fsdp2_public,
    "torch.accelerator.synchronize": lambda: hasattr(__import__("torch").accelerator, "synchronize"),
    "enable_gqa": lambda: "enable_gqa" in (
        __import__("torch").nn.functional.scaled_dot_product_attention.__doc__ or ""),
    "use_reentrant=False": _deepspeed_recompute_fix,
}


@pytest.mark.parametrize("feature", FEATURES, ids=lambda f: f.what[:40])
def test_every_listed_feature_exists_in_the_installed_release(feature):
    assert feature.what in PROBES, f"add a probe for {feature.what!r}"
    if feature.package == "deepspeed":
        pytest.importorskip("deepspeed")
    assert PROBES[feature.what](), f"{feature.package} {versions.installed_version(feature.package)} lacks {feature.what}"


def test_installed_releases_meet_the_floors():
    check_versions(("torch", "deepspeed"))


@pytest.mark.parametrize("package, version, newest", [
    ("torch", "2.6.0", "2.7"), ("torch", "2.7.0a0+git1234", None), ("torch", "2.13.0+cpu", None),
    ("deepspeed", "0.19.2", "0.19.3"), ("deepspeed", "0.16.9", "0.19.3"), ("deepspeed", "0.19.3", None),
])
def test_too_old(package, version, newest):
    feature = too_old(package, version)
    assert (feature.version if feature else None) == newest


def test_an_old_torch_is_refused_naming_the_version(monkeypatch):
    monkeypatch.setattr(versions, "installed_version", lambda package: "2.6.0" if package == "torch" else None)
    with pytest.raises(ValueError, match=r"^torch 2\.6\.0 is older than 2\.7, .*pip install 'torch>=2\.7'$"):
        check_versions()


def test_start_up_refuses_an_old_deepspeed_before_anything_runs(monkeypatch, tmp_path):
    from megamora.run import pretrain

    monkeypatch.setattr(versions, "installed_version", lambda package: "0.16.0" if package == "deepspeed" else "2.13.0")
    cfg = load_config(overrides=[f"run_dir={tmp_path / 'run'}", "parallel.engine=deepspeed"])
    with pytest.raises(ConfigError, match=r"^deepspeed 0\.16\.0 is older than 0\.19\.3, .*PR #8148"):
        pretrain(cfg)
    assert not (tmp_path / "run").exists()

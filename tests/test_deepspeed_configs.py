"""Every DeepSpeed config the project ships (configs/deepspeed/*.json, listed at collection time, so
a new file is covered without editing this test) trains on 2 gloo ranks: the losses of FSDP2 on
the same tiny model and data step by step, and a run killed after its first checkpoint resumes bit
for bit."""

import json
import shutil
from pathlib import Path

import pytest

from megamora.metrics import read_metrics
from test_train import REPO, crash_after_first_checkpoint, launch, losses, tiny_overrides

CONFIGS = sorted((REPO / "configs" / "deepspeed").glob("*.json"))
STEPS = ["steps=4", "save_every=2", "eval_every=0"]


def zero_stage(config: Path) -> int:
    """The stage a config needs: parameter offload is ZeRO-3 only; everything else runs on ZeRO-2
    (the stage of ZeRO-Offload)."""
    return 3 if "offload_param" in json.loads(config.read_text()).get("zero_optimization", {}) else 2


def test_every_config_is_listed():
    assert len(CONFIGS) >= 3 and {"offload_optimizer.json", "zero3_offload.json"} <= {c.name for c in CONFIGS}


@pytest.fixture(scope="module")
def fsdp2_losses(shared_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp2") / "run"
    launch(tiny_overrides(shared_data, run_dir, *STEPS), nproc=2)
    return losses(run_dir)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_deepspeed_config_trains_as_fsdp2_and_resumes_bitwise(shared_data, tmp_path, fsdp2_losses, config):
    ds = ["parallel.engine=deepspeed", f"parallel.zero_stage={zero_stage(config)}",
          f"parallel.deepspeed_config={config}"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    launch(tiny_overrides(shared_data, whole, *STEPS, *ds), nproc=2)
    got = losses(whole)
    assert sorted(got) == sorted(fsdp2_losses) == [1, 2, 3, 4]
    for step, want in fsdp2_losses.items():  # the same AdamW arithmetic, ZeRO's flat reduction order
        assert got[step] == pytest.approx(want, rel=1e-5), step

    shutil.copytree(whole, killed)
    crash_after_first_checkpoint(killed)  # killed after its step-2 checkpoint
    launch(tiny_overrides(shared_data, killed, *STEPS, *ds), nproc=2)
    assert read_metrics(killed, "setup")[-1]["resumed_from"].endswith("step_00000002")
    assert [r["step"] for r in read_metrics(killed, "train")] == [1, 2, 3, 4, 3, 4]  # steps 3, 4 again
    assert losses(killed) == got  # bit for bit

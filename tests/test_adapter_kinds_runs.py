"""The paper's other baselines (LoRA+, AsyLoRA, DoRA) through the real trainer: bitwise resume across a
restart, and every tool on their run directories (merge, eval, singular values, convert to Hugging
Face, --dry-run). The kinds' own maths is tests/test_adapter_kinds.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megamora.export import load_merged_model
from megamora.hf import to_hf_names
from megamora.metrics import read_metrics
from test_train import REPO, killed_copy, launch_env, run_in_process, tiny_overrides

KINDS = {
    "lora_plus": ["adapter.kind=lora_plus", "adapter.r=4", "adapter.loraplus_lr_ratio=4"],
    "asylora": ["adapter.kind=asylora", "adapter.r=4"],
    # restarts at steps 2 and 4 around the step-3 checkpoint: a resume crosses a merge and m's re-init
    "redora": ["adapter.kind=dora", "adapter.r=4", "adapter.dropout=0.1", "restarts.every=2", "restarts.warmup=1"],
}


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    return {name: (root / name, run_in_process(tiny_overrides(shared_data, root / name, *extra)))
            for name, extra in KINDS.items()}


@pytest.mark.parametrize("name", KINDS)
def test_resume_is_bitwise_identical(shared_data, runs, tmp_path, name):
    run_dir, full = runs[name]
    assert len(full.losses) == 6
    resumed = run_in_process(tiny_overrides(shared_data, killed_copy(run_dir, tmp_path / "b"), *KINDS[name]))
    assert resumed.resumed_from.name == "step_00000003"
    assert resumed.losses == full.losses[3:]
    assert resumed.final_eval == full.final_eval


def test_the_run_log_names_the_kind_and_the_restarts(runs):
    # (B's LR group itself: tests/test_adapter_kinds.py::test_loraplus_ratio_follows_the_schedule)
    setup = read_metrics(runs["lora_plus"][0], "setup")[0]
    assert setup["adapter_kind"] == "lora_plus" and setup["lora_plus_r"]["q_proj"] == 4
    restarts = read_metrics(runs["redora"][0], "restart")
    assert [r["step"] for r in restarts] == [2, 4]


def _tool(*args) -> str:
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**launch_env(), "OMP_NUM_THREADS": "1"}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("name", KINDS)
def test_tools_on_each_kind(runs, tmp_path, name):
    run_dir, result = runs[name]
    ppl = json.loads(_tool("tools/eval_ppl.py", run_dir).strip().splitlines()[-1])
    assert ppl["perplexity"] == pytest.approx(result.final_eval["perplexity"], rel=1e-5)

    counts = json.loads(_tool("tools/count_singular_values.py", run_dir, "--json", "--threshold", "1e-4"))
    assert set(counts) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(c >= 1 for c in counts.values())
    if name == "redora":  # two merges plus the last segment: more than one segment's rank r = 4
        assert max(counts.values()) > 4, counts

    _tool("tools/merge_checkpoint.py", run_dir, "--out", tmp_path / "merged.safetensors")
    _tool("tools/convert_to_hf.py", run_dir, "--out", tmp_path / "hf")
    cfg, merged = load_merged_model(run_dir)
    want = merged.state_dict()
    flat = load_file(tmp_path / "merged.safetensors")
    assert flat.keys() == want.keys() and all(torch.equal(flat[k], want[k]) for k in want)
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    hf_want = to_hf_names(want, cfg.model.tie_embeddings)
    assert hf.keys() == hf_want.keys() and all(torch.equal(hf[k], hf_want[k]) for k in hf_want)


@pytest.mark.parametrize("kind", ["lora_plus", "asylora", "dora"])
def test_dry_run_plans_each_kind(kind):
    out = _tool("launch/pretrain.py", "--config", "configs/cpu/base.yaml", "configs/cpu/lora.yaml",
                f"configs/recipes/deltas/{kind}.yaml", "run_dir=/tmp/never-written", "--dry-run")
    assert f"({kind})" in out and f"{kind} r=40" in out

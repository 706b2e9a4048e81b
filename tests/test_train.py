"""End-to-end: exact resume, distributed == single process, and bad input through the real entry point."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megamora.checkpoint import list_checkpoints
from megamora.config import load_config
from megamora.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
ENTRY = str(REPO / "launch" / "pretrain.py")


def tiny_overrides(shared_data: Path, run_dir: Path, *extra: str) -> list[str]:
    """A model small enough for 2 CPU cores, on the real C4 sample and t5-base tokenizer."""
    return [
        f"run_dir={run_dir}", "steps=6", "global_batch_size=4", "micro_batch_size=2",
        "model.dim=32", "model.ffn_dim=64", "model.n_layers=2", "model.n_heads=2",
        f"data.local_dir={shared_data}/c4-sample/en",
        f"data.tokenizer={shared_data}/tokenizers/t5-base/spiece.model",
        "data.seq_len=32", "data.shuffle_buffer=16",
        "eval_every=3", "eval_tokens=512", "save_every=3", "keep_last=3",
        "optim.lr=1e-2", "optim.warmup_steps=2", "logging.log_every=1", "logging.progress_bar=false",
        *extra,
    ]


def launch(args: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    if nproc == 1:
        cmd = [sys.executable, ENTRY, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", ENTRY, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}  # later records win


def run_in_process(overrides: list[str]):
    from megamora.run import pretrain

    return pretrain(load_config(None, overrides))


def crash_after_first_checkpoint(run_dir: Path) -> None:
    """Simulate a job killed after its first checkpoint: drop every later one."""
    for ckpt in list_checkpoints(run_dir)[1:]:
        shutil.rmtree(ckpt)


RESUME_CASES = {
    "full": [],
    "mora-dropout": ["adapter.kind=mora", "adapter.r=4", "adapter.dropout=0.1"],
    # restarts at steps 2 and 4 around the step-3 checkpoint: resume crosses a merge boundary
    "remora-across-restart": ["adapter.kind=mora", "adapter.r=4", "restarts.every=2", "restarts.warmup=1"],
    # a restart at step 3, saved right after it (optimizer state just reset)
    "relora-at-restart": ["adapter.kind=lora", "adapter.r=4", "restarts.every=3", "restarts.warmup=1",
                          "restarts.optimizer_reset=random_prune", "restarts.prune_ratio=0.5"],
}


@pytest.mark.parametrize("adapter", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_resume_is_bitwise_identical(shared_data, tmp_path, adapter):
    full = run_in_process(tiny_overrides(shared_data, tmp_path / "a", *adapter))
    assert len(full.losses) == 6
    run_in_process(tiny_overrides(shared_data, tmp_path / "b", *adapter))
    crash_after_first_checkpoint(tmp_path / "b")
    resumed = run_in_process(tiny_overrides(shared_data, tmp_path / "b", *adapter))
    assert resumed.resumed_from.name == "step_00000003"
    assert resumed.losses == full.losses[3:]  # bitwise: same data position, weights, optimizer, RNG
    assert resumed.final_eval == full.final_eval


PARITY_CASES = {
    "full": [],
    # the smoke MoRA config (dropout 0.05 included: its masks follow the data stream, not the rank)
    "smoke-mora": ["--config", str(REPO / "configs" / "smoke" / "mora.yaml"), "adapter.r=4"],
}


@pytest.mark.parametrize("extra", PARITY_CASES.values(), ids=PARITY_CASES.keys())
def test_two_ranks_match_one_process_and_resume_on_one(shared_data, tmp_path, extra):
    single, double = tmp_path / "single", tmp_path / "double"
    launch(tiny_overrides(shared_data, single, *extra))
    launch(tiny_overrides(shared_data, double, *extra), nproc=2)
    one, two = losses(single), losses(double)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    setup = read_metrics(double, "setup")[0]
    assert setup["world_size"] == 2 and setup["grad_accum"] == 1
    assert read_metrics(single, "setup")[0]["grad_accum"] == 2

    # a checkpoint written by 2 ranks resumes on 1 process and continues the same trajectory
    crash_after_first_checkpoint(double)
    proc = launch(tiny_overrides(shared_data, double, *extra))
    assert "run directory" in proc.stdout
    resumed = losses(double)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    evals = read_metrics(double, "eval")
    assert evals[-1]["perplexity"] == pytest.approx(read_metrics(single, "eval")[-1]["perplexity"], rel=1e-5)


def test_bad_key_value_or_data_path_fails_cleanly(shared_data, tmp_path):
    run_dir = tmp_path / "run"
    for bad, needle in [(["model.dimm=3"], "model.dimm"), (["optim.lr=fast"], "optim.lr"),
                        ([f"data.local_dir={tmp_path}/nowhere"], "nowhere"),
                        (["data.tokenizer=/no/such/spiece.model"], "spiece.model")]:
        proc = launch(tiny_overrides(shared_data, run_dir, *bad), check=False)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
        assert not run_dir.exists()

    # an existing run keeps its checkpoints and metrics byte for byte when a restart is refused
    launch(tiny_overrides(shared_data, run_dir, "steps=3"))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = launch(tiny_overrides(shared_data, run_dir, "steps=6", f"data.local_dir={tmp_path}/gone"), check=False)
    assert proc.returncode == 2
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_full_rank_warm_start(shared_data, tmp_path):
    """ReLoRA's recipe: a full-rank run, then an adapter run starting from its weights."""
    import torch

    from megamora.distributed import DistInfo
    from megamora.export import initial_weights, load_merged_model
    from megamora.run import build_trainer

    warm = run_in_process(tiny_overrides(shared_data, tmp_path / "warm", "steps=3"))
    cfg = load_config(None, tiny_overrides(shared_data, tmp_path / "relora", "adapter.kind=lora", "adapter.r=4",
                                           f"warm_start={warm.run_dir}"))
    trainer, _ = build_trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    # before any adapter step the model is the warm-start model: same validation loss
    assert trainer.evaluate(cfg.final_eval_tokens)["loss"] == pytest.approx(warm.final_eval["loss"], rel=1e-6)
    trainer.metrics.close()
    _, warm_model = load_merged_model(warm.run_dir)
    w_init = initial_weights(tmp_path / "relora")
    for k, v in warm_model.state_dict().items():
        assert torch.equal(w_init[k], v), k

    proc = launch(tiny_overrides(shared_data, tmp_path / "x", f"warm_start={tmp_path}/none"), check=False)
    assert proc.returncode == 2 and f"{tmp_path}/none" in proc.stderr and not (tmp_path / "x").exists()

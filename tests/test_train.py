"""End-to-end: exact resume, distributed == single process, and bad input through the real entry point."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from megamora.checkpoint import list_checkpoints
from megamora.config import load_config
from megamora.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
ENTRY = str(REPO / "launch" / "pretrain.py")
# A guard against a hung run, not a speed limit: tiny runs take seconds alone and minutes on a busy machine.
LAUNCH_TIMEOUT_S = 900


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


def command(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, ENTRY, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", ENTRY, *args]


def launch_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def _failed(cmd: list[str], proc: subprocess.CompletedProcess) -> AssertionError:
    return AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def launch(args: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    cmd = command(args, nproc)
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise _failed(cmd, proc)
    return proc


def launch_together(*runs: tuple[list[str], int], check: bool = True,
                    timeout: float = LAUNCH_TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """Several (args, nproc) runs started at once (independent run directories); with `check`, the
    first one that fails kills the others and fails the caller."""
    cmds = [command(args, nproc) for args, nproc in runs]
    logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in cmds]
    procs = [subprocess.Popen(cmd, env=launch_env(), stdout=out, stderr=err, text=True, start_new_session=True)
             for cmd, (out, err) in zip(cmds, logs)]

    def completed(i: int) -> subprocess.CompletedProcess:
        out, err = logs[i]
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmds[i], procs[i].returncode, out.read(), err.read())

    deadline = time.monotonic() + timeout
    try:
        while any(proc.poll() is None for proc in procs):
            for i, proc in enumerate(procs):
                if check and proc.returncode not in (None, 0):
                    raise _failed(cmds[i], completed(i))
            if time.monotonic() > deadline:
                raise AssertionError(f"{cmds} still running after {timeout} s")
            time.sleep(0.1)
        done = [completed(i) for i in range(len(procs))]
        for cmd, proc in zip(cmds, done):
            if check and proc.returncode != 0:
                raise _failed(cmd, proc)
        return done
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
                proc.wait()
        for out, err in logs:
            out.close(), err.close()


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}  # later records win


def run_in_process(overrides: list[str]):
    from megamora.run import pretrain

    return pretrain(load_config(None, overrides))


def crash_after_first_checkpoint(run_dir: Path) -> None:
    """Simulate a job killed after its first checkpoint: drop every later one."""
    for ckpt in list_checkpoints(run_dir)[1:]:
        shutil.rmtree(ckpt)


def killed_copy(run_dir: Path, dst: Path) -> Path:
    """A copy of a finished run as a job killed after its first checkpoint leaves it (the run is
    deterministic: the copy is what a second identical run would have written)."""
    shutil.copytree(run_dir, dst)
    crash_after_first_checkpoint(dst)
    return dst


def last_pass(run_dir: Path) -> tuple[dict, list[int]]:
    """The last setup record of an append-only metrics.jsonl and the steps trained after it."""
    records = read_metrics(run_dir)
    start = max(i for i, r in enumerate(records) if r["kind"] == "setup")
    return records[start], [r["step"] for r in records[start:] if r["kind"] == "train"]


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
    killed_copy(tmp_path / "a", tmp_path / "b")
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
def test_two_ranks_match_one_process_and_resume_across(shared_data, tmp_path, extra):
    single, double = tmp_path / "single", tmp_path / "double"
    launch_together((tiny_overrides(shared_data, single, *extra), 1), (tiny_overrides(shared_data, double, *extra), 2))
    one, two = losses(single), losses(double)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    setup = read_metrics(double, "setup")[0]
    assert setup["world_size"] == 2 and setup["grad_accum"] == 1
    assert read_metrics(single, "setup")[0]["grad_accum"] == 2

    # a checkpoint written by 2 ranks resumes on 1 process, one written by 1 process on 2 ranks, and
    # both continue the same trajectory from step 4
    two_to_one, one_to_two = killed_copy(double, tmp_path / "2to1"), killed_copy(single, tmp_path / "1to2")
    launch_together((tiny_overrides(shared_data, two_to_one, *extra), 1),
                    (tiny_overrides(shared_data, one_to_two, *extra), 2))
    for run_dir, world_size in ((two_to_one, 1), (one_to_two, 2)):
        setup, trained = last_pass(run_dir)
        assert setup["resumed_from"] == str(run_dir / "checkpoints" / "step_00000003"), run_dir.name
        assert setup["world_size"] == world_size and trained == [4, 5, 6], run_dir.name
        resumed = losses(run_dir)
        for step in (4, 5, 6):
            assert resumed[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), (run_dir.name, step)
        evals = read_metrics(run_dir, "eval")
        assert evals[-1]["perplexity"] == pytest.approx(read_metrics(single, "eval")[-1]["perplexity"], rel=1e-5)


def test_bad_key_value_or_data_path_fails_cleanly(shared_data, tmp_path):
    run_dir = tmp_path / "run"
    cases = [(["model.dimm=3"], "model.dimm"), (["optim.lr=fast"], "optim.lr"),
             ([f"data.local_dir={tmp_path}/nowhere"], "nowhere"),
             (["data.tokenizer=/no/such/spiece.model"], "spiece.model")]
    procs = launch_together(*[(tiny_overrides(shared_data, run_dir, *bad), 1) for bad, _ in cases], check=False)
    for (bad, needle), proc in zip(cases, procs):
        assert proc.returncode == 2, proc.stderr  # the README's exit code for bad input
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

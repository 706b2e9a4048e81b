"""A run's life cycle through the real entry point: one writer per run directory, a save that fails
(disk full), and stopping on a signal with a checkpoint that resumes bit for bit. Runs are tiny models
slowed down by tests/lifecycle_entry.py, so that a signal or a second run lands mid-run."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megamora.checkpoint import latest_checkpoint, read_trainer_state
from megamora.metrics import read_metrics
from spawn_ranks import spawn_ranks
from test_train import LAUNCH_TIMEOUT_S, REPO, losses, tiny_overrides

ENTRY = str(REPO / "tests" / "lifecycle_entry.py")
# The README's exit codes (literals: a test reading them from the code under test could not catch a change)
EXIT_BAD_INPUT, EXIT_SAVE_FAILED, EXIT_STOPPED = 2, 74, 75
TORCHRUN_FAILED = 1  # torchrun's own exit code when a worker exits non-zero


def start(log: Path, args: list[str], nproc: int = 1, **env: str) -> subprocess.Popen:
    """A run in the background, stdout and stderr into `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **env}
    cmd = [sys.executable, ENTRY, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def finish(proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT_S) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    return rc, proc.log.read_text()


def run(log: Path, args: list[str], nproc: int = 1, **env: str) -> tuple[int, str]:
    return finish(start(log, args, nproc, **env))


def records(run_dir: Path, kind: str) -> list[dict]:
    """metrics.jsonl of a run that may be writing it (the last line may be half-written)."""
    path, out = run_dir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in out if r["kind"] == kind]


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before step {step}:\n{proc.log.read_text()[-3000:]}"
        if any(r["step"] >= step for r in records(run_dir, "train")):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s:\n{proc.log.read_text()[-3000:]}")


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def rank_dir(tmp_path: Path) -> Path:
    """Where lifecycle_entry.py writes each rank's pid and exit code (MEGAMORA_TEST_RANK_DIR)."""
    folder = tmp_path / "ranks"
    folder.mkdir(exist_ok=True)
    return folder


def rank_exit_codes(folder: Path, nproc: int) -> list[int | None]:
    return [int(f.read_text()) if (f := folder / f"rank{r}.rc").is_file() else None for r in range(nproc)]


def rank_pid(folder: Path, rank: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline, path = time.monotonic() + timeout, folder / f"rank{rank}.pid"
    while not (path.is_file() and path.read_text()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.log.read_text()[-3000:]
        time.sleep(0.05)
    return int(path.read_text())


# --- one writer per run directory -------------------------------------------------------------------

def test_second_run_is_refused_and_a_killed_holder_never_blocks_resume(shared_data, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_overrides(shared_data, run_dir, "steps=60")
    holder = start(tmp_path / "holder.log", args, MEGAMORA_TEST_STEP_SLEEP="0.5")
    try:
        wait_for_step(holder, run_dir, 1)
        config = (run_dir / "config.yaml").read_bytes()
        for nproc in (1, 2):
            rc, out = run(tmp_path / f"second-{nproc}.log", args, nproc)
            assert rc == (EXIT_BAD_INPUT if nproc == 1 else TORCHRUN_FAILED), out
            errors = lines_with(out, "error:")
            assert len(errors) == 1, out  # said once, by rank 0
            assert f"is in use by pid {holder.pid} on host {socket.gethostname()}" in errors[0], out
            if nproc == 1:
                assert "Traceback" not in out, out
        assert holder.poll() is None  # the holder runs on, and nothing of the refused runs was written
        assert (run_dir / "config.yaml").read_bytes() == config
        assert len(records(run_dir, "setup")) == 1
    finally:
        holder.kill()  # SIGKILL: no chance to release anything; the kernel drops the flock
        holder.wait()
    # what a kill during a save leaves behind: the next run's first save removes it
    debris = run_dir / "checkpoints" / ".tmp-step_00000002"
    debris.mkdir(parents=True, exist_ok=True)
    (debris / "__0_0.distcp").write_bytes(b"\0" * 64)

    resume = start(tmp_path / "resume.log", args)
    rc, out = finish(resume)
    assert rc == 0, out
    assert read_metrics(run_dir, "setup")[-1]["resumed_from"] is not None
    assert max(losses(run_dir)) == 60
    assert (run_dir / ".lock").read_text().split() == [socket.gethostname(), str(resume.pid)]
    assert not list((run_dir / "checkpoints").glob(".tmp-step_*"))  # the killed run's debris is gone


def _lock_worker(rank: int, run_dir: str, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from megamora.distributed import DistInfo
    from megamora.runlock import RunDirLocked, lock_run_dir

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        lock_run_dir(run_dir, DistInfo(rank, 2, rank, torch.device("cpu")))
        outcome = "locked"
    except RunDirLocked as e:
        outcome = str(e)
    Path(out_dir, f"rank{rank}").write_text(outcome)
    dist.destroy_process_group()


def test_lock_refusal_reaches_every_rank(tmp_path):
    from megamora.distributed import DistInfo
    from megamora.runlock import lock_run_dir, unlock_run_dir

    lock_run_dir(tmp_path, DistInfo(0, 1, 0, torch.device("cpu")))  # this process holds it
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        spawn_ranks(_lock_worker, str(tmp_path), port, str(tmp_path), nprocs=2)
    finally:
        unlock_run_dir(tmp_path)
    for rank in (0, 1):  # rank 1 never touches the lock: it learns the outcome from rank 0
        assert f"in use by pid {os.getpid()} on host {socket.gethostname()}" in (tmp_path / f"rank{rank}").read_text()


# --- a failed save -----------------------------------------------------------------------------------

@pytest.mark.parametrize("nproc,fault", [(1, "6"), (2, "6:1:data")], ids=["dcp-shard", "rank1-data-state"])
def test_failed_save_removes_partial_checkpoint_keeps_older_ones(shared_data, tmp_path, nproc, fault):
    """ENOSPC while writing step 6's checkpoint: on the one process inside DCP; on 2 ranks in rank 1's
    own data-state file only, which rank 0 learns through the save's closing collective."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(shared_data, run_dir, "steps=9")
    ranks = rank_dir(tmp_path)
    rc, out = run(tmp_path / "full.log", args, nproc, MEGAMORA_TEST_ENOSPC=fault, MEGAMORA_TEST_RANK_DIR=str(ranks))
    assert rc == (EXIT_SAVE_FAILED if nproc == 1 else TORCHRUN_FAILED), out
    assert rank_exit_codes(ranks, nproc) == [EXIT_SAVE_FAILED] * nproc, out  # every rank stopped, same code
    assert lines_with(out, "No space left") == [
        "error: No space left on device while saving step 6; checkpoints up to step 3 are intact"], out
    if nproc == 1:
        assert "Traceback" not in out, out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000003"]  # no .tmp-step_6
    assert read_trainer_state(run_dir / "checkpoints" / "step_00000003")["step"] == 3

    rc, out = run(tmp_path / "resume.log", args, nproc)  # room again: resume from the intact checkpoint
    assert rc == 0, out
    assert read_metrics(run_dir, "setup")[-1]["resumed_from"].endswith("step_00000003")
    assert max(losses(run_dir)) == 9


# --- stopping on a signal ----------------------------------------------------------------------------

STOP_STEPS = 20


@pytest.fixture(scope="module")
def uninterrupted(shared_data, tmp_path_factory) -> dict[int, dict[int, float]]:
    """Loss per step of the uninterrupted run on 1 process and on 2 ranks (started together)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    procs = {nproc: start(root / f"{nproc}.log", tiny_overrides(shared_data, root / str(nproc), f"steps={STOP_STEPS}"),
                          nproc) for nproc in (1, 2)}
    for proc in procs.values():
        rc, out = finish(proc)
        assert rc == 0, out
    return {nproc: losses(root / str(nproc)) for nproc in procs}


SIGNAL_CASES = {  # (ranks, signal, whom: torchrun forwards to every rank; "rank1": that rank's pid only)
    "SIGTERM": (1, signal.SIGTERM, None), "SIGINT": (1, signal.SIGINT, None), "SIGUSR1": (1, signal.SIGUSR1, None),
    "2-ranks-SIGTERM": (2, signal.SIGTERM, None),
    # only rank 1 is told: the MAX all-reduce of the per-rank flag stops rank 0 after the same step
    "2-ranks-SIGTERM-rank1-only": (2, signal.SIGTERM, 1),
}


@pytest.mark.parametrize("nproc,sig,rank", SIGNAL_CASES.values(), ids=SIGNAL_CASES.keys())
def test_signal_saves_stops_and_resumes_bitwise(shared_data, tmp_path, uninterrupted, nproc, sig, rank):
    run_dir, ranks = tmp_path / "run", rank_dir(tmp_path)
    args = tiny_overrides(shared_data, run_dir, f"steps={STOP_STEPS}")
    proc = start(tmp_path / "stopped.log", args, nproc, MEGAMORA_TEST_STEP_SLEEP="0.25",
                 MEGAMORA_TEST_RANK_DIR=str(ranks))
    wait_for_step(proc, run_dir, 2)
    if rank is None:
        proc.send_signal(sig)  # under torchrun: to torchrun, which forwards it to the workers
    else:
        os.kill(rank_pid(ranks, rank, proc), sig)
    rc, out = finish(proc)

    stops = lines_with(out, "stopped by")
    assert len(stops) == 1, out  # one line, from rank 0
    m = re.fullmatch(rf"stopped by {sig.name} at step (\d+); checkpoint saved: (\S+)", stops[0])
    assert m, stops[0]
    step = int(m[1])
    assert 2 <= step < STOP_STEPS
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    assert Path(m[2]) == ckpt == latest_checkpoint(run_dir)
    assert read_trainer_state(ckpt)["step"] == step
    assert max(losses(run_dir)) == step  # rank 0 stopped after the step it saved
    assert [(r["step"], r["signal"]) for r in read_metrics(run_dir, "stop")] == [(step, sig.name)]
    assert rank_exit_codes(ranks, nproc) == [EXIT_STOPPED] * nproc, out  # every rank stopped, same code
    if nproc == 1:
        assert rc == EXIT_STOPPED, out
        assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    else:
        assert rc == TORCHRUN_FAILED, out

    rc, out = run(tmp_path / "resumed.log", args, nproc)
    assert rc == 0, out
    assert read_metrics(run_dir, "setup")[-1]["resumed_from"] == str(ckpt)
    assert losses(run_dir) == uninterrupted[nproc]  # bit for bit, every step


def test_stop_signals_set_a_flag_and_restore_handlers():
    from megamora.preemption import STOP_SIGNALS, StopSignals

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    with StopSignals() as stop:
        assert stop.requested(torch.device("cpu")) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal names the stop
        assert stop.requested(torch.device("cpu")) == "SIGUSR1"
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before


def test_progress_bar_only_on_a_terminal(shared_data, tmp_path, capsys, monkeypatch):
    """Not a terminal (a batch job's log, here pytest's capture): no bar, the log lines only."""
    from megamora.config import load_config
    from megamora.run import pretrain

    def bar_shown(run_dir: Path) -> bool:
        pretrain(load_config(None, tiny_overrides(shared_data, run_dir, "steps=2")), progress_bar=True)
        return "train:" in capsys.readouterr().err

    assert not bar_shown(tmp_path / "batch")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert bar_shown(tmp_path / "terminal")

"""launch/slurm.sbatch and `tools/reproduce.py --launcher slurm` under a real SLURM: CI brings up a
one-node cluster with .ci/local-slurm.sh (as root). Skipped, saying why, where sbatch cannot run jobs.

- A time limit stops the run with a checkpoint at the step it stopped; the job requeues itself and
  the run resumes from that step and finishes. The stop comes from SLURM's own time-limit warning
  (the script's `--signal=B:USR1@120`): the test brings the limit forward once the run trains, so the
  warning comes at the controller's next time-limit check (every 30 s) instead of minutes later.
- The script gives the job step the job's CPUs (SRUN_CPUS_PER_TASK), the threads that go with them,
  and a rendezvous port of the job's own.
- tools/reproduce.py --launcher slurm: the chain runs on one node by default and each finished run's
  log ends cleanly; a chain that would wait for ever is cancelled with one line."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_reproduce import write_recipe

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm.sbatch"
# The tiny model of the other tests on the smoke config: the run's steps come from a file of the test's.
TINY = ["global_batch_size=4", "micro_batch_size=2", "model.dim=32", "model.ffn_dim=64", "model.n_layers=2",
        "model.n_heads=2", "data.seq_len=32", "data.shuffle_buffer=16", "eval_every=1000", "eval_tokens=512",
        "save_every=1000", "optim.warmup_steps=1", "logging.log_every=1", "logging.progress_bar=false",
        "parallel.device=cpu"]
ONE_CPU_JOB = ["--nodes=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10", "--export=ALL,NPROC_PER_NODE=1"]


def run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def cluster_problem() -> str | None:
    """Why SLURM cannot run this file's jobs here, or None."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (as root, .ci/local-slurm.sh brings up a one-node cluster)"
    try:
        if " is UP" not in run("scontrol", "ping", timeout=20).stdout:  # at once, where sinfo retries for 9 s
            return "slurmctld is not up (scontrol ping; as root, .ci/local-slurm.sh starts a one-node cluster)"
        proc = run("sinfo", "-h", "-o", "%t", timeout=20)
    except subprocess.TimeoutExpired:
        return "scontrol ping or sinfo did not answer in 20 s"
    if proc.returncode != 0:
        return f"sinfo failed: {(proc.stderr.strip() or 'no output').splitlines()[0]}"
    if not {"idle", "mix", "alloc", "comp"} & set(proc.stdout.split()):
        return f"no SLURM node up (states: {' '.join(sorted(set(proc.stdout.split()))) or 'none'})"
    if os.geteuid() != 0:
        return "needs root: the time-limit test raises a job's limit again"
    return None


@pytest.fixture(scope="module")
def slurm() -> dict:
    """The environment the jobs get (sbatch passes it on): this venv's torchrun first on PATH."""
    problem = cluster_problem()
    if problem:
        pytest.skip(f"SLURM not available: {problem}")
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def sbatch(env: dict, *args: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", f"--chdir={REPO}", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(job: str) -> dict:
    """scontrol's fields of a job (finished jobs stay listed for MinJobAge, 300 s by default)."""
    proc = run("scontrol", "show", "job", "-o", job)
    return dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f) if proc.returncode == 0 else {}


def seconds(clock: str) -> int:
    """SLURM's [D-]HH:MM:SS."""
    days, _, hms = clock.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def wait_for(what: str, predicate, timeout: float, log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def records(run_dir: Path, kind: str) -> list[dict]:
    """metrics.jsonl's records of a kind, read while the run writes it (a last line may be cut short)."""
    path = run_dir / "metrics.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == kind:
            out.append(record)
    return out


def ended(job: str) -> bool:
    return job_info(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "")


def test_time_limit_stops_with_checkpoint_requeues_resumes_and_finishes(slurm, tmp_path):
    run_dir, log, steps = tmp_path / "run", tmp_path / "job.log", tmp_path / "steps.yaml"
    steps.write_text("steps: 100000\n")  # more than a time slot holds; shortened once the run has stopped
    job = sbatch(slurm, *ONE_CPU_JOB, f"--output={log}", SBATCH, "configs/smoke/full.yaml", steps,
                 f"run_dir={run_dir}", *TINY)
    try:
        wait_for("the run's second step", lambda: len(records(run_dir, "train")) >= 2, 150, log)
        # Bring the end of the job to 60-120 s from now: inside the script's --signal=B:USR1@120 window.
        elapsed = seconds(job_info(job)["RunTime"])
        assert run("scontrol", "update", f"JobId={job}", f"TimeLimit={elapsed // 60 + 2}").returncode == 0
        stop = wait_for("the stop at the time limit", lambda: records(run_dir, "stop"), 90, log)[0]
        # The next time slot: a run that ends 2 steps later, and a limit it does not reach.
        steps.write_text(f"steps: {stop['step'] + 2}\n")
        assert run("scontrol", "update", f"JobId={job}", "TimeLimit=10").returncode == 0
        wait_for("the requeued job to finish", lambda: ended(job), 150, log)
    finally:
        run("scancel", job)
    text = log.read_text()
    assert job_info(job)["JobState"] == "COMPLETED", text[-3000:]
    assert int(job_info(job)["Restarts"]) == 1, text[-3000:]
    assert "time limit near: stopping the run" in text and f"requeueing job {job}" in text
    assert stop["signal"] == "SIGTERM", stop
    checkpoint = run_dir / "checkpoints" / f"step_{stop['step']:08d}"
    assert stop["checkpoint"] == str(checkpoint)
    setups = records(run_dir, "setup")
    assert [s["resumed_from"] for s in setups] == [None, str(checkpoint)], setups
    assert [r["step"] for r in records(run_dir, "train")][-2:] == [stop["step"] + 1, stop["step"] + 2]
    assert [r["step"] for r in records(run_dir, "eval")] == [stop["step"] + 2]
    assert "final validation perplexity" in text


def test_script_gives_the_step_the_jobs_cpus_threads_and_a_port_of_its_own(slurm, tmp_path):
    """A stand-in torchrun reports what the script gave it. SLURM_EXACT=1 makes srun give the step
    only what it asks for (as --exact, or sites that set it): since Slurm 22.05 srun does not take the
    job's --cpus-per-task, and without SRUN_CPUS_PER_TASK the step would get one CPU."""
    cpus = int(run("sinfo", "-h", "-o", "%c").stdout.split()[0])
    if cpus < 2:
        pytest.skip("the node has one CPU: the step's share cannot differ from the job's")
    bin_dir, seen, log = tmp_path / "bin", tmp_path / "seen", tmp_path / "job.log"
    bin_dir.mkdir()
    # nproc: the CPUs the process may run on (it would say OMP_NUM_THREADS if that were set).
    report = '"$(env -u OMP_NUM_THREADS nproc) $OMP_NUM_THREADS $*"'
    (bin_dir / "torchrun").write_text(f"#!/bin/sh\necho {report} > {seen}\n")
    (bin_dir / "torchrun").chmod(0o755)
    job = sbatch({**slurm, "PATH": f"{bin_dir}{os.pathsep}{slurm['PATH']}", "SLURM_EXACT": "1"}, "--wait",
                 "--nodes=1", f"--cpus-per-task={cpus}", "--gpus-per-node=0", "--time=2", f"--output={log}",
                 "--export=ALL,NPROC_PER_NODE=2", SBATCH, "configs/smoke/full.yaml")
    step_cpus, threads, *args = seen.read_text().split()
    assert int(step_cpus) == cpus, log.read_text()
    assert int(threads) == cpus // 2  # two processes share the task's CPUs
    port = int(args[args.index("--rdzv_endpoint") + 1].rsplit(":", 1)[1])
    assert port == 15000 + int(job) % 15000  # not torchrun's 29500, which two jobs on a node would share


def test_a_job_ending_leaves_another_on_the_same_node_running(slurm, tmp_path):
    """Job `first` starts, then `second` on the same node; `first` ends while `second` trains. With one
    fixed rendezvous port `second`'s torchrun found it taken and joined `first`'s store: when `first`
    ended, `second` died in mid-run (DistNetworkError "Failed to recv", then SIGTERM to its worker)."""
    first, second = tmp_path / "first", tmp_path / "second"
    long_steps = tmp_path / "long.yaml"
    long_steps.write_text("steps: 100000\n")
    jobs = [sbatch(slurm, *ONE_CPU_JOB, f"--output={first}.log", SBATCH, "configs/smoke/full.yaml", long_steps,
                   f"run_dir={first}", *TINY)]
    try:
        wait_for("the first job's training", lambda: records(first, "train"), 150, Path(f"{first}.log"))
        jobs.append(sbatch(slurm, *ONE_CPU_JOB, f"--output={second}.log", SBATCH, "configs/smoke/full.yaml",
                           f"run_dir={second}", "steps=20", *TINY))
        wait_for("the second job's training", lambda: records(second, "train"), 150, Path(f"{second}.log"))
        run("scancel", "--signal=TERM", jobs[0])  # the first run stops (with a checkpoint) and its job ends
        wait_for("both jobs to end", lambda: all(ended(j) for j in jobs), 150, Path(f"{second}.log"))
    finally:
        run("scancel", *jobs)
    text = Path(f"{second}.log").read_text()
    assert job_info(jobs[1])["JobState"] == "COMPLETED", text[-3000:]
    assert "final validation perplexity" in text and "Traceback" not in text, text[-3000:]


def reproduce(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "reproduce.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_reproduce_chain_runs_on_one_node_by_default_and_logs_end_cleanly(slurm, shared_data, tmp_path):
    """No --nodes anywhere; the CPU runs need no GPU option either. lora and mora run at the same time
    on the node: with one fixed rendezvous port the second run joined the first's store and its log
    ended in a DistNetworkError traceback when the first finished."""
    recipe, out = write_recipe(tmp_path, shared_data), tmp_path / "out"
    proc = reproduce(slurm, "--recipe", recipe, "--seeds", "0", "--methods", "lora", "mora", "--out", out,
                     "--launcher", "slurm", "--nproc-per-node", "1", "--sbatch-args", "--cpus-per-task=1 --time=10",
                     "parallel.device=cpu")
    assert proc.returncode == 0, proc.stderr
    ids = dict(re.findall(r"^submitted (\S+): job (\d+)", proc.stdout, re.M))
    assert list(ids) == ["warmstart-seed0", "lora-seed0", "mora-seed0", "report"], proc.stdout
    try:
        wait_for("the chain to finish", lambda: all(ended(j) for j in ids.values()), 420, out / "report.log")
    finally:
        run("scancel", *ids.values())
    for name, job in ids.items():
        info = job_info(job)
        assert (info["JobState"], info["NumNodes"]) == ("COMPLETED", "1"), (name, info)
    for name in ("warmstart-seed0", "lora-seed0", "mora-seed0"):
        text = (out / "runs" / name / "train.log").read_text()
        assert "final validation perplexity" in text, text[-3000:]
        for noise in ("Traceback", "DistNetworkError", "frame #", "error:"):
            assert noise not in text, f"{name}: {noise!r} in its log:\n{text[-3000:]}"
    assert (out / "report.md").is_file()


def test_reproduce_cancels_a_chain_that_would_wait_for_ever(slurm, shared_data, tmp_path):
    nodes = len(run("sinfo", "-h", "-N", "-o", "%N").stdout.split())
    recipe = write_recipe(tmp_path, shared_data)
    proc = reproduce(slurm, "--recipe", recipe, "--seeds", "0", "--methods", "lora", "--out", tmp_path / "out",
                     "--launcher", "slurm", "--nproc-per-node", "1",
                     "--sbatch-args", f"--nodes {nodes + 1} --cpus-per-task=1 --time=10", "parallel.device=cpu")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    ids = re.findall(r"^submitted \S+: job (\d+)", proc.stdout, re.M)
    # the scheduler names a too-large job PartitionConfig first and PartitionNodeLimit once it has looked
    # closer: either never clears
    assert re.match(rf"error: job {ids[0]} \(warmstart-seed0\) would wait for ever: SLURM holds it for "
                    r"(PartitionNodeLimit|PartitionConfig) ", proc.stderr), proc.stderr
    assert proc.stderr.strip().endswith(f"cancelled jobs {' '.join(ids)}"), proc.stderr
    queued = run("squeue", "-h", "-t", "PENDING,RUNNING", "-j", ",".join(ids), "-o", "%i").stdout.split()
    assert queued == [], shlex.join(queued)

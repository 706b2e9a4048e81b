"""tools/reproduce.py end to end on a tiny recipe (two methods, two seeds, a 3-step warm start, 4-step
runs), its resume and skip of finished runs, bad input, the SLURM dependency chain with a fake
sbatch, and the report's aggregation (mean / sd, paired differences, verdicts) on synthetic numbers.

The reproduction runs once per module (module-scoped fixture); every later test reads it."""

import fcntl
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megamora.config import load_config
from megamora.methods import FULL_RANK, Method, method_of
from megamora.metrics import read_metrics
from megamora.recipes import load_recipe
from megamora.report import (
    Paired,
    RunResult,
    colours,
    label_note,
    paired,
    row_label,
    smooth,
    spread,
    summarize,
    summarize_rows,
    verdict,
    write_report,
)
from megamora.reproduce import Progress, RunSpec

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "reproduce.py"


def write_recipe(root: Path, shared_data: Path, *, warm_start_steps: int = 2, name: str = "tiny") -> Path:
    """A recipe small enough for 2 cores: the tiny model of test_train.py, 4 steps per run."""
    cfg = root / "configs"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "base.yaml").write_text(f"""\
steps: 4
global_batch_size: 4
micro_batch_size: 2
eval_every: 2
eval_tokens: 512
save_every: 2
keep_last: 2
stop_check_every: 1
model: {{dim: 32, ffn_dim: 64, n_layers: 2, n_heads: 2}}
data:
  local_dir: {shared_data}/c4-sample/en
  tokenizer: {shared_data}/tokenizers/t5-base/spiece.model
  seq_len: 32
  shuffle_buffer: 16
optim: {{lr: 1e-2, warmup_steps: 1}}
logging: {{log_every: 1, progress_bar: false}}
""")
    (cfg / "full.yaml").write_text("adapter: {kind: none}\n")
    (cfg / "lora.yaml").write_text("adapter: {kind: lora, r: 4, alpha: 8}\n")
    (cfg / "mora.yaml").write_text("adapter: {kind: mora, r: 4}\n")
    (cfg / "remora.yaml").write_text("adapter: {kind: mora, r: 4}\nrestarts: {every: 2, warmup: 1}\n")
    recipe = root / f"{name}.yaml"
    recipe.write_text(f"""\
description: tiny test recipe
base: [configs/base.yaml]
warm_start_steps: {warm_start_steps}
methods:
  lora: configs/lora.yaml
  mora: configs/mora.yaml
extra_methods:
  full: configs/full.yaml
  remora: configs/remora.yaml
paper: null
""")
    return recipe


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "disabled", **extra}


def reproduce(*args, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TOOL), *map(str, args)], env=env(), capture_output=True, text=True,
                          timeout=1200, **kw)  # a guard against a hang: minutes on a busy machine
    if check and proc.returncode != 0:
        raise AssertionError(f"reproduce {args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool_json(name: str, argv: list, capsys) -> dict:
    """A tool's main() in this process (the same code path as its command line, without a torch import)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert load_tool(name).main(list(map(str, argv))) == 0
    finally:
        torch.set_num_threads(before)
    return json.loads(capsys.readouterr().out)


def snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def locked(path: Path) -> bool:
    """Whether a run holds its run directory's flock (a dead one, zombie or not, holds none)."""
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


SLOW_SITE = REPO / "tests" / "slow_site"  # sitecustomize: every run of the tool sleeps after each step


def train_records(run_dir: Path) -> list[dict]:
    """The train records of a run that may be writing metrics.jsonl (its last line may be half-written)."""
    path, out = run_dir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in out if r["kind"] == "train"]


@pytest.fixture(scope="module")
def reproduced(shared_data, tmp_path_factory):
    """The tiny recipe (3-step warm starts), seeds 0 and 1, killed (SIGKILL) after the first step of
    its first run (slowed down: the kill lands during step 2), then run again to the end."""
    root = tmp_path_factory.mktemp("reproduce")
    recipe = write_recipe(root, shared_data, warm_start_steps=3)  # killed during step 2: not the last
    out = root / "out"
    cmd = [sys.executable, str(TOOL), "--recipe", recipe, "--seeds", "0", "1", "--out", out]
    slow = env(PYTHONPATH=os.pathsep.join([str(SLOW_SITE), *filter(None, [os.environ.get("PYTHONPATH")])]),
               MEGAMORA_TEST_STEP_SLEEP="1")
    first = subprocess.Popen(list(map(str, cmd)), env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir, deadline = out / "runs" / "warmstart-seed0", time.monotonic() + 600
    while not train_records(run_dir) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None and train_records(run_dir), first.communicate(timeout=60)
    first.send_signal(signal.SIGKILL)  # the command dies; its run gets SIGTERM (PDEATHSIG) and stops
    first.communicate(timeout=60)
    lock, deadline = run_dir / ".lock", time.monotonic() + 60
    while lock.exists() and locked(lock) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (lock.exists() and locked(lock)), "the run outlived the killed command"
    second = reproduce(*cmd[2:])
    return {"root": root, "recipe": recipe, "out": out, "first": first, "second": second}


def test_report_files_and_numbers_equal_the_tools(reproduced, capsys):
    out = reproduced["out"]
    for name in ("report.md", "results.json", "figure4.png", "figure5.png", "recipe.json"):
        assert (out / name).is_file(), name
    assert (out / "figure4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("lora", 0), ("lora", 1), ("mora", 0), ("mora", 1)]
    assert results["missing"] == []
    for run in results["runs"]:
        run_dir = out / "runs" / f"{run['method']}-seed{run['seed']}"
        assert read_metrics(run_dir, "setup")[0]["adapter_kind"] == run["method"]
        ppl = tool_json("eval_ppl", [run_dir, "--device", "cpu"], capsys)
        assert ppl["step"] == run["step"] == 4
        assert ppl["tokens"] == run["tokens"]
        assert ppl["perplexity"] == pytest.approx(run["perplexity"], rel=1e-5)  # the run's own final eval
        counts = tool_json("count_singular_values", [run_dir, "--json"], capsys)
        assert counts == run["sv_counts"]
        assert set(run["ranks"]) == set(counts)
    summary = results["summary"]
    lora = [r["perplexity"] for r in results["runs"] if r["method"] == "lora"]
    assert summary["lora"]["perplexity"]["mean"] == pytest.approx(sum(lora) / 2)
    assert summary["lora"]["per_seed"] == {"0": lora[0], "1": lora[1]}
    assert summary["mora"]["sv_counts"]["q_proj"]["n"] == 2
    # warm-started: W_init of dW is the warm start's weights; the method runs start where it ended
    cfg = (out / "runs" / "mora-seed1" / "config.yaml").read_text()
    assert f"warm_start: {out / 'runs' / 'warmstart-seed1'}" in cfg
    assert [w["step"] for w in results["warm_starts"]] == [3, 3]
    report = (out / "report.md").read_text()
    for needle in ("## Table 3", "## Figure 4", "## Figure 5", "## Verdict", "MoRA", "LoRA", "Paired by seed"):
        assert needle in report, needle
    assert "run 1/6 warmstart-seed0: started" in reproduced["second"].stderr


def test_interrupted_reproduction_resumes_and_skips_finished_runs(reproduced, shared_data):
    out, recipe = reproduced["out"], reproduced["recipe"]
    # The SIGKILL of the command stopped its run: that run resumed or restarted, the rest ran once.
    assert reproduced["first"].returncode == -signal.SIGKILL
    warm = out / "runs" / "warmstart-seed0"
    assert [(r["step"], r["signal"]) for r in read_metrics(warm, "stop")] == [(2, "SIGTERM")]  # saved, stopped
    assert [s["resumed_from"] for s in read_metrics(warm, "setup")] == [None, str(warm / "checkpoints" / "step_00000002")]
    assert [r["step"] for r in read_metrics(warm, "train")] == [1, 2, 3]  # step 3 only on the second pass
    assert [s["resumed_from"] for s in read_metrics(out / "runs" / "lora-seed0", "setup")] == [None]  # ran once

    # Now lose the last run's final checkpoint and its records after step 2, as a kill after step 2 would.
    last = out / "runs" / "mora-seed1"
    final_ppl = read_metrics(last, "eval")[-1]["perplexity"]
    shutil.rmtree(last / "checkpoints" / "step_00000004")
    lines = [l for l in (last / "metrics.jsonl").read_text().splitlines() if json.loads(l)["step"] <= 2]
    (last / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    others = {name: snapshot(out / "runs" / name) for name in
              ("warmstart-seed0", "warmstart-seed1", "lora-seed0", "lora-seed1", "mora-seed0")}
    proc = reproduce("--recipe", recipe, "--seeds", "0", "1", "--out", out)
    for name, files in others.items():
        assert f"skip {name}: finished" in proc.stderr
        assert snapshot(out / "runs" / name) == files, name  # finished runs untouched
    assert "run 1/1 mora-seed1: started, resuming at step 2" in proc.stderr
    assert read_metrics(last, "setup")[-1]["resumed_from"].endswith("step_00000002")
    assert read_metrics(last, "eval")[-1]["perplexity"] == final_ppl  # bitwise resume

    # More seeds or methods of the same recipe go into the same folder (checked, not run: --dry-run).
    more = reproduce("--recipe", recipe, "--seeds", "0", "1", "2", "--methods", "lora", "mora", "remora",
                     "--out", out, "--dry-run")
    assert "remora-seed2 (to run)" in more.stdout and "lora-seed0 (finished)" in more.stdout


def test_noise_runs_start_from_the_same_warm_starts_and_set_the_floor(reproduced, tmp_path):
    """--warm-starts links the finished warm starts of another folder (nothing trained twice);
    --noise-from measures the verdict's floor from the same runs launched another way."""
    recipe, out = reproduced["recipe"], reproduced["out"]
    noise = tmp_path / "noise"
    proc = subprocess.run([sys.executable, str(TOOL), "--recipe", recipe, "--seeds", "0", "1", "--methods", "lora",
                           "--out", noise, "--warm-starts", out], env=env(OMP_NUM_THREADS="2"), capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for seed in (0, 1):
        link = noise / "runs" / f"warmstart-seed{seed}"
        assert link.is_symlink() and link.resolve() == (out / "runs" / f"warmstart-seed{seed}").resolve()
        assert f"warmstart-seed{seed}: linked from" in proc.stderr
    assert "run 1/2 lora-seed0: started" in proc.stderr and "warmstart-seed0: started" not in proc.stderr
    assert json.loads((noise / "recipe.json").read_text())["launch"] == {
        "launcher": "local", "nproc_per_node": 1, "threads_per_process": 2}

    report = reproduce("--out", out, "--report-only", "--noise-from", noise)
    data = json.loads((out / "results.json").read_text())
    floor = data["noise_floor"]
    pairs = [(p["method"], p["seed"]) for p in floor["pairs"]]
    assert pairs == [("lora", 0), ("lora", 1)]
    ppl = {(r["method"], r["seed"]): r["perplexity"] for r in data["runs"]}
    there = {s: read_metrics(noise / "runs" / f"lora-seed{s}", "eval")[-1]["perplexity"] for s in (0, 1)}
    assert floor["perplexity"] == pytest.approx(max(abs(there[s] - ppl[("lora", s)]) / ppl[("lora", s)]
                                                    for s in (0, 1)))
    assert all(p["floor"] == floor["perplexity"] and p["beyond_noise"] in (True, False) for p in data["paired"])
    text = (out / "report.md").read_text()
    assert "## Noise floor" in text and "local, 1 process x 2 threads (noise)" in text
    assert all("noise" in line for line in text.splitlines() if line.startswith("- Paired by seed"))
    assert json.loads((out / "recipe.json").read_text())["noise_from"] == [str(noise.resolve())]
    reproduce("--out", out, "--report-only")  # a later report keeps the floor
    assert json.loads((out / "results.json").read_text())["noise_floor"] == floor

    # Refused, one line each: warm starts of other settings, noise runs of other settings.
    other = one_line_error(reproduce("--recipe", recipe, "--seeds", "0", "--out", tmp_path / "o", "--warm-starts",
                                     out, "optim.lr=0.5", check=False), "--warm-starts", "optim.lr")
    assert "other settings" in other and not (tmp_path / "o" / "runs").exists()
    record = json.loads((noise / "recipe.json").read_text())
    record["configs"]["lora"]["optim.lr"] = 0.5
    (noise / "recipe.json").write_text(json.dumps(record))
    one_line_error(reproduce("--out", out, "--report-only", "--noise-from", noise, check=False),
                   "--noise-from", "lora", "optim.lr")
    assert report.returncode == 0


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_bad_input_is_one_line_and_runs_nothing(reproduced, shared_data, tmp_path):
    recipe, out = reproduced["recipe"], reproduced["out"]
    fresh = tmp_path / "fresh"
    other = write_recipe(tmp_path / "other", shared_data, name="other")
    cases = {
        "method": (["--recipe", recipe, "--seeds", "0", "--methods", "lora", "dora", "--out", fresh],
                   ["unknown method 'dora'", "valid: lora, mora, full, remora"]),
        "recipe": (["--recipe", "no-such-recipe", "--out", fresh],
                   ["'no-such-recipe' not found", "cpu", "table3-250m"]),
        "seed": (["--recipe", recipe, "--seeds", "0", "x", "--out", fresh], ["seed 'x' is not an integer"]),
        "negative seed": (["--recipe", recipe, "--seeds", "-1", "--out", fresh], ["-1"]),
        "other recipe": (["--recipe", other, "--seeds", "0", "--out", out], ["recipe 'tiny'", "not 'other'"]),
        "other settings": (["--recipe", recipe, "--seeds", "0", "--out", out, "optim.lr=0.5"],
                           ["other settings", "optim.lr: 0.01 (DIR) vs 0.5"]),
        "plan key": (["--recipe", recipe, "--seeds", "0", "--out", fresh, "seed=3"], ["seed= is set per run"]),
        "bad config": (["--recipe", recipe, "--seeds", "0", "--out", fresh, "model.dimm=3"], ["model.dimm"]),
        "adapter too big": (["--recipe", recipe, "--seeds", "0", "--out", fresh, "adapter.r=64"], ["adapter.r=64"]),
    }
    procs = {k: subprocess.Popen([sys.executable, str(TOOL), *map(str, argv)], env=env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, (argv, _) in cases.items()}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), *cases[key][1])
    assert not fresh.exists()  # nothing written


def test_slurm_launcher_chains_warm_starts_methods_and_report(shared_data, tmp_path):
    recipe = write_recipe(tmp_path, shared_data)
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch.calls"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"""#!/bin/sh
n=$(( $(cat {calls} 2>/dev/null | wc -l) + 101 ))
printf '%s\\n' "$*" >> {calls}
echo "Submitted batch job $n"
""")
    sbatch.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(TOOL), "--recipe", str(recipe), "--seeds", "0", "1", "--out", str(out),
                           "--launcher", "slurm", "--nproc-per-node", "4", "--sbatch-args", "--partition gpu --nodes 2"],
                          env=env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    jobs = calls.read_text().splitlines()
    assert len(jobs) == 7  # 2 warm starts, 4 method runs, 1 report
    ids = {}
    for line in proc.stdout.splitlines():  # "submitted lora-seed0: job 103 (after 101)"
        name, job = line.removeprefix("submitted ").split(": job ")
        ids[name] = job.split()[0]
    assert ids == {"warmstart-seed0": "101", "warmstart-seed1": "102", "lora-seed0": "103", "mora-seed0": "104",
                   "lora-seed1": "105", "mora-seed1": "106", "report": "107"}
    assert "--dependency" not in jobs[0] and "launch/slurm.sbatch" in jobs[0] and "steps=2" in jobs[0]
    assert "--partition gpu --nodes 2" in jobs[0]
    assert all("--export=ALL,NPROC_PER_NODE=4" in line for line in jobs[:6])  # read by launch/slurm.sbatch
    assert all("--gpus-per-node=4 " in line for line in jobs[:6])  # a GPU per process, not the script's 8
    for line, dep in zip(jobs[2:6], ("101", "101", "102", "102")):
        assert f"--dependency=afterok:{dep} " in line
        assert f"warm_start={out / 'runs' / 'warmstart-seed'}{0 if dep == '101' else 1}" in line
        assert f"--output={out / 'runs'}" in line
    assert "--dependency=afterok:101:102:103:104:105:106" in jobs[6] and "--report-only" in jobs[6]
    assert "--partition" not in jobs[6]
    assert json.loads((out / "recipe.json").read_text())["seeds"] == [0, 1]


# --------------------------------------------------------------------------- aggregation, synthetic


# The recipes' configs of the paper's rows, as method_of reads them (through the adapter registry).
PAPER_ROWS = {"full": [], "lora": ["adapter.kind=lora"], "mora": ["adapter.kind=mora"],
              "relora": ["adapter.kind=lora", "restarts.every=75"], "remora": ["adapter.kind=mora", "restarts.every=75"]}


def method_of_row(method: str) -> Method:
    return method_of(load_config(None, ["run_dir=x", *PAPER_ROWS[method.split("-")[0]]]))


def result(method: str, seed: int, ppl: float, sv: float, kind: Method | None = None) -> RunResult:
    counts = {k: sv for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    steps = list(range(10, 310, 10))
    kind = kind or method_of_row(method)
    return RunResult(method=method, seed=seed, run_dir=f"runs/{method}-seed{seed}", step=300, perplexity=ppl,
                     tokens=1000, sv_counts=counts, ranks={k: 2 * v for k, v in counts.items()}, config_method=kind,
                     train=[(s, 8 - s / 100 + 0.1 * seed) for s in steps], evals=[(100, ppl * 2), (300, ppl)],
                     restarts=[75, 150, 225] if kind.restarts else [])


def synthetic() -> list[RunResult]:
    ppl = {"lora": (800, 700, 900), "relora": (780, 690, 870), "mora": (600, 620, 580), "remora": (590, 600, 570)}
    sv = {"lora": 3, "relora": 8, "mora": 45, "remora": 90}
    return [result(m, s, ppl[m][s], sv[m] + s) for m in ppl for s in range(3)]


def test_spread_and_pairs():
    sp = spread([1.0, 2.0, 3.0])
    assert (sp.mean, sp.sd, sp.min, sp.max, sp.n) == (2.0, 1.0, 1.0, 3.0, 3)
    assert spread([5.0]).sd is None
    with pytest.raises(ValueError):
        spread([])
    res = synthetic()
    p = paired(res, "mora", "lora")
    assert p.seeds == [0, 1, 2] and p.n_lower == 3
    assert p.rel[0] == pytest.approx(0.25)
    assert p.sentence("MoRA", "LoRA") == "MoRA lower than LoRA on 3/3 seeds, by 11.4-35.6%"
    assert Paired("mora", "lora", [0, 1], 1, {0: 0.1, 1: -0.05}).sentence("MoRA", "LoRA") == \
        "MoRA lower than LoRA on 1/2 seeds (relative difference -5.0 to +10.0%, positive where MoRA is lower)"
    assert Paired("remora", "mora", [0], 0, {0: -0.02}).sentence("ReMoRA", "MoRA") == \
        "ReMoRA higher than MoRA on 1/1 seeds, by 2.0%"
    s = summarize(res, "lora", "250m")
    assert s.perplexity.mean == 800 and s.perplexity.sd == pytest.approx(100) and s.paper == 33.40
    assert s.per_seed == {0: 800, 1: 700, 2: 900} and s.sv_mean_per_seed == {0: 3, 1: 4, 2: 5}
    assert smooth([1.0, 2.0, 3.0, 4.0, 5.0], fraction=0.6) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert smooth([0.0, 3.0, 0.0, 3.0, 0.0], fraction=0.6) == [0.0, 1.0, 2.0, 1.0, 0.0]


def test_verdicts_from_the_numbers():
    res = synthetic()
    summaries = {m: summarize(res, m) for m in ("lora", "mora", "relora", "remora")}
    v = verdict(summaries, res)
    assert v.ppl_agrees is True and v.sv_agrees is True
    assert "Here, by mean perplexity: ReMoRA (586.7) < MoRA (600.0) < ReLoRA (780.0) < LoRA (800.0): **agrees**" \
        in v.ppl_lines[0]
    assert "The whole ordering holds on 3/3 seeds" in v.ppl_lines[1]
    assert "Paired by seed: MoRA lower than ReLoRA on 3/3 seeds, by 10.1-33.3%." in v.ppl_lines
    assert any(l.startswith("MoRA 46.0 vs LoRA 4.0 singular values") and "9.4-15.0 times" in l for l in v.sv_lines)
    # LoRA better than MoRA on seed 1, ReLoRA counts close to MoRA's: both verdicts turn
    res[1].perplexity = 500.0
    for r in res:
        if r.method == "relora":
            r.sv_counts = {k: 40.0 for k in r.sv_counts}
    summaries = {m: summarize(res, m) for m in ("lora", "mora", "relora", "remora")}
    v = verdict(summaries, res)
    assert v.ppl_agrees is False and "**differs**" in v.ppl_lines[0]
    assert "Paired by seed: MoRA lower than LoRA on 2/3 seeds (relative difference -24.0 to +35.6%" \
        in " ".join(v.ppl_lines)
    assert v.sv_agrees is False and "below 2x on some seed" in " ".join(v.sv_lines)
    one = {"lora": summaries["lora"]}
    assert verdict(one, res).ppl_agrees is None and verdict(one, res).sv_agrees is None


def test_report_on_synthetic_runs(tmp_path):
    res = synthetic()
    warm = [RunResult("warmstart", s, f"w{s}", 200, 900.0, 1000, {}, {}, FULL_RANK,
                      train=[(x, 9 - x / 50) for x in range(10, 210, 10)], evals=[(100, 2000.0), (200, 900.0)])
            for s in range(3)]
    paths = write_report(res, tmp_path, recipe="synthetic", methods=["lora", "mora", "relora", "remora"],
                         seeds=[0, 1, 2], paper="1b", warm=warm, missing=["full-seed0"])
    report = paths["report"].read_text()
    assert "| LoRA | 3 | 1000 | 800.00 ± 100.00 | 700.00-900.00 | 800.00 | 700.00 | 900.00 | 28.56 |" in report
    assert "Not finished (left out): full-seed0." in report
    data = json.loads(paths["results"].read_text())
    assert data["verdict"]["perplexity_agrees"] is True and data["summary"]["mora"]["paper"] == 25.25
    assert paths["figure4"].stat().st_size > 10_000 and paths["figure5"].stat().st_size > 10_000
    assert "dotted lines: ReLoRA / ReMoRA merges" in report
    assert data["runs"][0]["config_method"] == "LoRA" and data["warm_starts"][0]["config_method"] == "Full-rank"
    with pytest.raises(ValueError):
        write_report([], tmp_path / "none", recipe="x", methods=["lora"], seeds=[0])
    assert not (tmp_path / "none").exists()


def test_rows_are_labelled_and_coloured_through_the_method_registry():
    """The recipes' rows keep the labels and colours they had when a table named the recipe keys."""
    expected = {"full": "Full-rank", "lora": "LoRA", "mora": "MoRA", "relora": "ReLoRA", "remora": "ReMoRA",
                "mora-type6": "MoRA (type6)", "mora-decouple": "MoRA (decouple)",
                "mora-truncation": "MoRA (truncation)", "lora_plus": "LoRA+", "asylora": "AsyLoRA", "dora": "DoRA",
                "galore": "GaLore", "apollo": "APOLLO", "relora-paper": "ReLoRA (paper)"}
    for name in ("cpu", "table3-250m", "table3-1b"):
        recipe = load_recipe(name)
        for key in recipe.all_methods:
            method = method_of(load_config(recipe.method_files(key), ["run_dir=x"]))
            assert row_label(key, method) == expected[key], (name, key)
    res = [result(m, 0, 500.0, 10.0) for m in ("full", "lora", "mora", "relora", "remora", "mora-type6")]
    assert colours(summarize_rows(res, [r.method for r in res])) == {
        "full": "#555555", "lora": "#6baed6", "mora": "#fb6a4a", "relora": "#08519c", "remora": "#a50f15",
        "mora-type6": "#2ca02c"}  # MoRA's colour is taken: the first extra one
    lora, mora = method_of_row("lora"), method_of_row("mora")
    # A name that does not name its config's method: the method first, the name kept beside it.
    assert (row_label("mora", lora), row_label("lora-r4", mora), row_label("a", lora)) == \
        ("LoRA (mora)", "MoRA (lora-r4)", "LoRA (a)")
    assert label_note("mora", "LoRA") == \
        "'mora' is labelled MoRA but its config.yaml says LoRA: the method column follows config.yaml"
    assert label_note("full-rank-seed0", "Full-rank") is None and label_note("a", "LoRA") is None
    twice = summarize_rows([result("lora", 0, 1.0, 1.0), result("lora_b", 0, 2.0, 1.0, lora)], ["lora", "lora_b"])
    assert [s.label for s in twice.values()] == ["LoRA", "LoRA (lora_b)"]


class FakeDoRA:
    """What a further adapter kind's class declares for reports (as megamora.adapters.base.AdapterLinear)."""
    kind, label, restart_label = "dora", "DoRA", "ReDoRA"
    colour, restart_colour = "#123456", "#654321"
    high_rank = False


def test_a_registered_method_appears_in_the_report_with_no_edit(monkeypatch, tmp_path):
    """A kind registered in the adapter registry (DoRA), and an optimizer-level method as its registry
    would describe it (GaLore, high rank), get their label, colour and Figure 5 family, no paper number,
    and stay out of the paper's perplexity chain, with no edit to the report."""
    from types import SimpleNamespace

    from megamora import adapters

    monkeypatch.setitem(adapters.ADAPTERS, "dora", f"{__name__}:FakeDoRA")
    # config.py does not know the kind yet: the run's config as method_of reads it
    dora = method_of(SimpleNamespace(adapter=SimpleNamespace(kind="dora"), restarts=SimpleNamespace(every=0),
                                     optim=SimpleNamespace(name="adamw")))
    assert dora == Method("DoRA", "#123456", high_rank=False)
    galore = Method("GaLore", "#abcdef", high_rank=True)
    res = [r for r in synthetic() if r.method in ("lora", "mora")]
    res += [result("dora", s, 650.0 + s, 4.0 + s, dora) for s in range(3)]
    res += [result("galore", s, 610.0 + s, 60.0 + s, galore) for s in range(3)]
    methods = ["lora", "mora", "dora", "galore"]
    rows = summarize_rows(res, methods, "250m")
    assert [s.label for s in rows.values()] == ["LoRA", "MoRA", "DoRA", "GaLore"]
    assert colours(rows) == {"lora": "#6baed6", "mora": "#fb6a4a", "dora": "#123456", "galore": "#abcdef"}
    assert (rows["lora"].paper, rows["dora"].paper, rows["galore"].paper) == (33.40, None, None)
    v = verdict(rows, res)
    assert "DoRA" not in " ".join(v.ppl_lines) and "GaLore" not in " ".join(v.ppl_lines)
    assert v.ppl_lines[0].startswith("Paper (Table 3): MoRA < LoRA.")
    # the verdict is the paper's claim over its rows; the new methods' pairs are measured beside it
    assert v.sv_lines[0].startswith("MoRA have far more singular values > threshold than LoRA (at least 2x")
    assert v.sv_lines[0].endswith("The other pairs below are measured; the paper did not run those methods.")
    assert any(line.startswith("GaLore 61.0 vs DoRA 5.0 singular values") for line in v.sv_lines)
    # a new method below 2x of a low-rank one is listed as such, and leaves the paper's verdict alone
    weak = [*res, *(result("galore_weak", s, 600.0, 6.0, galore) for s in range(3))]
    v2 = verdict(summarize_rows(weak, [*methods, "galore_weak"], "250m"), weak)
    assert v2.sv_agrees and any("(below 2x on some seed)" in line for line in v2.sv_lines)
    paths = write_report(res, tmp_path, methods=methods, paper="250m")
    report = paths["report"].read_text()
    assert "| DoRA | 3 | 1000 | 651.00 ± 1.00 | 650.00-652.00 | 650.00 | 651.00 | 652.00 |  |" in report
    assert "| module | LoRA | MoRA | DoRA | GaLore |" in report and paths["figure5"].is_file()
    data = json.loads(paths["results"].read_text())
    assert data["summary"]["dora"]["label"] == "DoRA" and data["summary"]["dora"]["paper"] is None
    # a run's name that names the new method is checked against its config like any other
    assert label_note("dora-r8", "LoRA").startswith("'dora-r8' is labelled DoRA but its config.yaml says LoRA")
    assert label_note("dora-r8", "DoRA") is None


def test_recipes_in_the_repo_load():
    cpu = load_recipe("cpu")
    assert list(cpu.methods) == ["full", "lora", "mora", "relora", "remora"]
    assert cpu.warm_start_steps > 0 and cpu.paper is None and "mora-type6" in cpu.extra_methods
    for size in ("250m", "1b"):
        r = load_recipe(f"table3-{size}")
        assert r.warm_start_steps == 0 and r.paper == size and list(r.methods) == list(cpu.methods)


def test_progress_says_run_step_and_time_left(tmp_path):
    def spec(name: str, method: str, steps: int) -> RunSpec:
        cfg = type("Cfg", (), {"steps": steps})()
        return RunSpec(name, method, 0, tmp_path / name, [], [], cfg)

    done, current, later = (spec("lora-seed0", "lora", 10), spec("mora-seed0", "mora", 10),
                             spec("lora-seed1", "lora", 10))
    for run, steps in ((done, 10), (current, 4)):
        run.run_dir.mkdir()
        records = [{"kind": "train", "step": s, "loss": 1.0, "step_time_s": 2.0} for s in range(1, steps + 1)]
        (run.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = io.StringIO()
    progress = Progress([current, later], [done, current, later], out, every=0)
    progress.start(1, current)
    progress.poll()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("run 1/2 mora-seed0: started, resuming at step 4")
    # 6 steps left here at 2 s, and 10 of lora-seed1 at lora's 2 s
    assert lines[1] == "run 1/2 mora-seed0: step 4/10, about 12s left in this run, 32s in all"


def test_a_setting_the_record_lacks_compares_as_its_default():
    """A folder written before a setting existed resumes with newer code, unless the setting is changed."""
    from megamora.config import load_config
    from megamora.reproduce import _differences, comparable

    new = comparable(load_config(None, ["run_dir=unused"]))
    old = {k: v for k, v in new.items() if k != "data.max_doc_chars"}
    assert _differences(old, new) == []
    changed = dict(new, **{"data.max_doc_chars": 5})
    assert _differences(old, changed) == [f"data.max_doc_chars: {new['data.max_doc_chars']} (DIR) vs 5 (this command)"]

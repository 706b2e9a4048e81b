"""One command for the paper's comparison: a recipe x seeds -> runs -> report (tools/reproduce.py).

    plan = make_plan(load_recipe("cpu"), seeds=[0, 1, 2], methods=None, out="runs/x", overrides=[])
    check_out_dir(plan)                      # DIR/recipe.json: a DIR of another recipe is refused
    run_local(plan, launcher="local")        # sequential subprocesses, skip finished, resume the rest
    submit_slurm(plan, sbatch_args=[])       # or one sbatch job per run, chained with afterok

Every run is `launch/pretrain.py --config <base> <delta> run_dir=DIR/runs/<method>-seed<S> seed=S
[warm_start=DIR/runs/warmstart-seed<S>] [overrides]` in its own process: a killed run loses only its
steps since its last checkpoint, and running the same command again resumes it (pretrain resumes
from run_dir's newest checkpoint by itself).
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, TextIO

from megamora.config import ConfigError, TrainConfig, load_config, to_dict
from megamora.recipes import REPO, WARM_START, WARM_START_WARMUP, Recipe

ENTRY = REPO / "launch" / "pretrain.py"
SBATCH = REPO / "launch" / "slurm.sbatch"
# Set per run by the plan; an override of them would break the layout.
PLAN_KEYS = ("run_dir", "seed", "warm_start")
# Settings that do not change a run's numbers: a DIR may be continued with other values of them.
FREE_KEYS = ("logging.", "parallel.device", "parallel.engine", "parallel.zero_stage", "parallel.deepspeed_config",
             "parallel.activation_checkpointing", "parallel.compile", "parallel.loss_chunk_size",
             "save_every", "keep_last")  # checkpoints change no number of a run (bitwise resume)
EXIT_STOPPED = 75  # as launch/pretrain.py: stopped with a checkpoint, run the same command again


class ReproduceError(ValueError):
    """Bad input or a refused output folder: one line, exit code 2, nothing run."""


class RunFailed(RuntimeError):
    def __init__(self, run: "RunSpec", code: int, detail: str):
        self.run, self.code = run, code
        super().__init__(f"run {run.name} failed (exit code {code}): {detail}; log: {run.log}")


# --------------------------------------------------------------------------- the plan


@dataclass
class RunSpec:
    name: str  # lora-seed0, warmstart-seed0
    method: str  # the recipe's method key, or "warmstart"
    seed: int
    run_dir: Path
    files: list[Path]
    overrides: list[str]  # everything after the files: the user's, then the plan's
    config: TrainConfig
    warm_start: Optional[str] = None  # name of the warm-start run this one starts from

    @property
    def steps(self) -> int:
        return self.config.steps

    @property
    def log(self) -> Path:
        return self.run_dir / "train.log"


@dataclass
class Plan:
    recipe: Recipe
    out: Path
    seeds: list[int]
    methods: list[str]
    overrides: list[str]
    runs: list[RunSpec] = field(default_factory=list)  # in launch order: per seed, warm start first


def run_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


def _load(files: Sequence[Path], overrides: Sequence[str], what: str) -> TrainConfig:
    try:
        return load_config(list(files), list(overrides))
    except ConfigError as e:
        raise ReproduceError(f"{what}: {e}") from None


def make_plan(recipe: Recipe, seeds: Sequence[int], methods: Optional[Sequence[str]], out: str | Path,
              overrides: Sequence[str] = ()) -> Plan:
    """Every run's config, loaded now: a bad config, method or override fails before anything runs."""
    methods = list(methods) if methods else list(recipe.methods)
    valid = list(recipe.all_methods)
    for m in methods:
        if m not in valid:
            raise ReproduceError(f"unknown method {m!r} for recipe {recipe.name}; valid: {', '.join(valid)}")
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        raise ReproduceError("--methods and --seeds must not repeat a value")
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if "=" not in o:
            raise ReproduceError(f"override {o!r} is not of the form section.key=value")
        if key in PLAN_KEYS:
            raise ReproduceError(f"{key}= is set per run by the command (runs go in --out/runs/<method>-seed<S>)")
    out = Path(out).expanduser().resolve()
    plan = Plan(recipe, out, list(seeds), methods, list(overrides))
    for seed in seeds:
        ws_name = None
        if recipe.warm_start_steps:
            ws_name = run_name(WARM_START, seed)
            n = recipe.warm_start_steps
            run_dir = out / "runs" / ws_name
            # Its own steps and warm-up (10% of them), after the user's overrides: those are the methods'.
            ws_over = [*overrides, f"steps={n}", f"optim.warmup_steps={max(1, math.ceil(WARM_START_WARMUP * n))}",
                       *recipe.warm_start_overrides, f"run_dir={run_dir}", f"seed={seed}"]
            cfg = _load(recipe.warm_start_files(), ws_over, f"{recipe.name} warm start (seed {seed})")
            if cfg.adapter.kind != "none":
                raise ReproduceError(f"{recipe.name}: the warm start (base + full) has "
                                     f"adapter.kind={cfg.adapter.kind}, not none")
            plan.runs.append(RunSpec(ws_name, WARM_START, seed, run_dir, recipe.warm_start_files(), ws_over, cfg))
        for m in methods:
            run_dir = out / "runs" / run_name(m, seed)
            over = [*overrides, f"run_dir={run_dir}", f"seed={seed}"]
            if ws_name:
                over.append(f"warm_start={out / 'runs' / ws_name}")
            cfg = _load(recipe.method_files(m), over, f"{recipe.name} {m} (seed {seed})")
            plan.runs.append(RunSpec(run_name(m, seed), m, seed, run_dir, recipe.method_files(m), over, cfg, ws_name))
    return plan


def check_plan(plan: Plan) -> None:
    """What launch/pretrain.py --dry-run checks, and the data files, once per distinct config."""
    from megamora.data import check_data_source
    from megamora.run import check_adapters

    seen = set()
    for run in plan.runs:
        key = json.dumps(comparable(run.config), sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_adapters(run.config)
            check_data_source(run.config.data)
        except ValueError as e:
            raise ReproduceError(f"{run.name}: {str(e).splitlines()[0]}") from None
        tok = run.config.data.tokenizer
        if tok.endswith((".model", ".json")) and not Path(tok).expanduser().exists():
            raise ReproduceError(f"{run.name}: data.tokenizer={tok} not found")


# --------------------------------------------------------------------------- DIR/recipe.json


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def comparable(cfg: TrainConfig) -> dict:
    """A run's settings without what the plan sets per run (run_dir, seed, warm_start)."""
    return {k: v for k, v in flat(to_dict(cfg)).items() if k not in PLAN_KEYS}


def _differences(old: dict, new: dict) -> list[str]:
    # A setting the record lacks did not exist when it was written: the runs had today's default.
    defaults = comparable(load_config(None, ["run_dir=unused"]))
    keys = sorted(k for k in old.keys() | new.keys()
                  if not k.startswith(FREE_KEYS) and old.get(k, defaults.get(k)) != new.get(k))
    return [f"{k}: {old.get(k, defaults.get(k))} (DIR) vs {new.get(k)} (this command)" for k in keys]


def recipe_record(plan: Plan) -> dict:
    configs = {}
    for run in plan.runs:
        configs.setdefault(run.method, comparable(run.config))
    return {"recipe": plan.recipe.name, "recipe_file": str(plan.recipe.path), "description": plan.recipe.description,
            "content_hash": plan.recipe.content_hash(), "warm_start_steps": plan.recipe.warm_start_steps,
            "paper": plan.recipe.paper, "noise_floor": plan.recipe.noise_floor, "seeds": plan.seeds,
            "methods": plan.methods,
            "overrides": plan.overrides, "configs": configs}


def read_record(out: str | Path) -> Optional[dict]:
    path = Path(out) / "recipe.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("recipe"), str):
            raise ValueError("not a recipe record")
    except ValueError as e:
        raise ReproduceError(f"{path}: cannot read ({e})") from None
    return record


def check_out_dir(plan: Plan) -> dict:
    """DIR/recipe.json merged with this plan: the same recipe with the same settings may add seeds and
    methods; another recipe, or the same one with other settings, is a ReproduceError."""
    new = recipe_record(plan)
    old = read_record(plan.out)
    runs = plan.out / "runs"
    if old is None:
        if runs.is_dir() and any(runs.iterdir()):
            raise ReproduceError(f"{plan.out} holds runs but no recipe.json: not a reproduce folder; use another --out")
        return new
    where = plan.out / "recipe.json"
    if old["recipe"] != new["recipe"]:
        raise ReproduceError(f"{plan.out} holds runs of recipe {old['recipe']!r} ({where}), not {new['recipe']!r}; "
                             "use another --out")
    if old.get("warm_start_steps") != new["warm_start_steps"]:
        raise ReproduceError(f"{plan.out} holds runs of recipe {old['recipe']!r} with warm_start_steps="
                             f"{old.get('warm_start_steps')}, not {new['warm_start_steps']}; use another --out")
    for method, cfg in new["configs"].items():
        if method in old.get("configs", {}):
            diff = _differences(old["configs"][method], cfg)
            if diff:
                raise ReproduceError(f"{plan.out} holds runs of recipe {old['recipe']!r} with other settings: "
                                     f"{method} {diff[0]}" + (f" (and {len(diff) - 1} more)" if len(diff) > 1 else "")
                                     + "; use another --out")
    order = list(plan.recipe.all_methods)
    methods = sorted(set(old.get("methods", [])) | set(new["methods"]),
                     key=lambda m: order.index(m) if m in order else len(order))
    return {**new, "seeds": sorted(set(old.get("seeds", [])) | set(new["seeds"])), "methods": methods,
            "configs": {**old.get("configs", {}), **new["configs"]}, "noise_from": old.get("noise_from", [])}


def link_warm_starts(plan: Plan, source: str | Path, dry_run: bool = False) -> list[str]:
    """Use the finished warm starts of another reproduction (`--warm-starts DIR`): DIR/runs/warmstart-
    seed<S> is linked as this plan's own, so a sweep (a recipe of its own over the same base) or a noise
    measurement starts from the very same weights and does not train them again. DIR's warm-start
    settings must equal this plan's. Returns the names linked (or, dry_run, that would be)."""
    source = Path(source).expanduser().resolve()
    old = read_record(source)
    if old is None:
        raise ReproduceError(f"--warm-starts {source}: no recipe.json there (not a reproduce folder)")
    if not plan.recipe.warm_start_steps or old.get("warm_start_steps") != plan.recipe.warm_start_steps:
        raise ReproduceError(f"--warm-starts {source}: its warm starts are {old.get('warm_start_steps') or 0} "
                             f"steps; recipe {plan.recipe.name} has {plan.recipe.warm_start_steps}")
    if source == plan.out:
        raise ReproduceError(f"--warm-starts {source} is --out itself")
    linked = []
    for run in plan.runs:
        if run.method != WARM_START or run.run_dir.exists() or run.run_dir.is_symlink():
            continue  # this folder's own warm start (or link) stays
        other = source / "runs" / run.name
        if WARM_START not in old.get("configs", {}) or not finished(other, run.steps):
            raise ReproduceError(f"--warm-starts {source}: {run.name} is not finished there")
        diff = _differences(old["configs"][WARM_START], comparable(run.config))
        if diff:
            raise ReproduceError(f"--warm-starts {source}: its {run.name} has other settings: {diff[0]}")
        if not dry_run:
            run.run_dir.parent.mkdir(parents=True, exist_ok=True)
            run.run_dir.symlink_to(other, target_is_directory=True)
        linked.append(run.name)
    return linked


def launch_settings(launcher: str, nproc_per_node: Optional[int]) -> dict:
    """How this command runs its runs: what changes the float order of a run but not its batches, by
    which a noise measurement's reproductions differ (megamora.noise)."""
    import torch

    nproc = nproc_per_node or 1
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is None:  # torchrun sets 1 per process when it starts several; else torch's default
        threads = 1 if launcher == "torchrun" and nproc > 1 else torch.get_num_threads()
    return {"launcher": launcher, "nproc_per_node": nproc, "threads_per_process": int(threads)}


def write_record(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".recipe.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out / "recipe.json")


# --------------------------------------------------------------------------- state of a run


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl, tolerating a last line cut short by a kill."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def final_checkpoint_step(run_dir: Path) -> Optional[int]:
    from megamora.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    try:
        return int(json.loads((ckpt / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def finished(run_dir: Path, steps: int) -> bool:
    """A final eval at `steps` in metrics.jsonl and the checkpoint of that step."""
    evals = [r for r in _records(run_dir) if r.get("kind") == "eval" and r.get("step") == steps]
    return bool(evals) and final_checkpoint_step(run_dir) == steps


def is_finished(run: RunSpec) -> bool:
    return finished(run.run_dir, run.steps)


def current_step(run_dir: Path) -> int:
    records = _records(run_dir)
    return max((r["step"] for r in records if r.get("kind") in ("train", "setup") and isinstance(r.get("step"), int)),
               default=0)


def step_seconds(run_dir: Path) -> list[float]:
    return [r["step_time_s"] for r in _records(run_dir) if r.get("kind") == "train" and "step_time_s" in r]


# --------------------------------------------------------------------------- commands


def pretrain_args(run: RunSpec) -> list[str]:
    return [str(ENTRY), "--config", *map(str, run.files), *run.overrides]


def command(run: RunSpec, launcher: str, nproc_per_node: int = 1) -> list[str]:
    if launcher == "local":
        return [sys.executable, *pretrain_args(run)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
                *pretrain_args(run)]
    raise ValueError(f"launcher {launcher!r} has no per-run command here")


def _die_with_parent(parent: int) -> None:
    """In the child: SIGTERM when the reproduce command dies (even by SIGKILL), so the run saves a
    checkpoint and stops instead of training on unwatched with the run directory locked (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


# --------------------------------------------------------------------------- progress


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Which run (k of n), its step, and the time left in it and in the whole plan, from the runs'
    step times in metrics.jsonl, scaled by the wall time the runs finished so far really took (the
    first run's estimate leaves out start-up and evals). A tqdm bar over the plan's steps at a
    terminal; otherwise a line every `every` seconds."""

    def __init__(self, pending: Sequence[RunSpec], all_runs: Sequence[RunSpec], stream: TextIO = sys.stderr,
                 every: float = 30.0):
        self.pending, self.stream, self.every = list(pending), stream, every
        self.rates: dict[str, list[float]] = {}
        for run in all_runs:  # finished or earlier runs tell the step time of their method
            self.rates.setdefault(run.method, []).extend(step_seconds(run.run_dir))
        self.done = {run.name: current_step(run.run_dir) for run in self.pending}
        self.k, self.run, self.last_line = 0, None, 0.0
        # Wall time of the runs finished here over what their step times predicted: start-up and evals.
        self.wall, self.predicted = 0.0, 0.0
        self.started_at = 0.0
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            # tqdm's own rate would ignore start-up and evals: the postfix says the time left instead.
            self.bar = tqdm(total=sum(r.steps for r in self.pending), initial=sum(self.done.values()),
                            file=stream, dynamic_ncols=True,
                            bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]")

    def rate(self, method: str) -> Optional[float]:
        """Seconds per step: the median step time of the method's runs, scaled by how much longer the
        runs finished here took in wall time (start-up, evals, checkpoints)."""
        own = self.rates.get(method) or [s for v in self.rates.values() for s in v]
        scale = self.wall / self.predicted if self.predicted > 0 else 1.0
        return statistics.median(own) * scale if own else None

    def left(self) -> tuple[Optional[float], Optional[float]]:
        """Seconds left in the current run and in the plan (None: no step time known yet)."""
        run_left = total = 0.0
        for i, run in enumerate(self.pending):
            if i + 1 < self.k:
                continue
            rate = self.rate(run.method)
            if rate is None:
                return None, None
            secs = max(0, run.steps - self.done[run.name]) * rate
            total += secs
            if i + 1 == self.k:
                run_left = secs
        return run_left, total

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def start(self, k: int, run: RunSpec) -> None:
        self.k, self.run = k, run
        resumed = f", resuming at step {self.done[run.name]}" if self.done[run.name] else ""
        self.say(f"run {k}/{len(self.pending)} {run.name}: started{resumed} (log: {run.log})")
        self.last_line = self.started_at = time.monotonic()
        self.start_step = self.done[run.name]
        if self.bar is not None:
            self.bar.set_description(f"run {k}/{len(self.pending)} {run.name}")

    def poll(self) -> None:
        run = self.run
        step = current_step(run.run_dir)
        own = step_seconds(run.run_dir)
        if own:
            self.rates[run.method] = own  # this run's own steps: the best estimate for its method
        advance = max(0, step - self.done[run.name])
        self.done[run.name] = max(step, self.done[run.name])
        run_left, total = self.left()
        if self.bar is not None:
            self.bar.set_postfix_str(f"step {step}/{run.steps}, {_duration(run_left)} left in this run, "
                                     f"{_duration(total)} in all", refresh=False)
            self.bar.update(advance)
        elif time.monotonic() - self.last_line >= self.every:
            self.last_line = time.monotonic()
            self.say(f"run {self.k}/{len(self.pending)} {run.name}: step {step}/{run.steps}, "
                     f"about {_duration(run_left)} left in this run, {_duration(total)} in all")

    def finish(self, run: RunSpec, seconds: float) -> None:
        self.poll()
        own = step_seconds(run.run_dir)
        if own and run.steps > self.start_step:
            self.wall += seconds
            self.predicted += statistics.median(own) * (run.steps - self.start_step)
        self.done[run.name] = run.steps
        final = [r for r in _records(run.run_dir) if r.get("kind") == "eval" and r.get("step") == run.steps]
        ppl = f", perplexity {final[-1]['perplexity']:.2f}" if final and "perplexity" in final[-1] else ""
        self.say(f"run {self.k}/{len(self.pending)} {run.name}: done in {_duration(seconds)}{ppl}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- launchers


def pending_runs(plan: Plan) -> tuple[list[RunSpec], list[RunSpec]]:
    """(finished, to run) in plan order."""
    finished, todo = [], []
    for run in plan.runs:
        (finished if is_finished(run) else todo).append(run)
    return finished, todo


def _last_line(log: Path) -> str:
    try:
        lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):  # the run's own one-line reason, else its last line
        if line.startswith(("error:", "stopped by")):
            return line
    return lines[-1] if lines else "empty log"


def run_local(plan: Plan, todo: Sequence[RunSpec], launcher: str = "local", nproc_per_node: int = 1,
              stream: TextIO = sys.stderr, progress_every: float = 30.0, poll_s: float = 1.0) -> None:
    """Run `todo` one after another. A run that fails raises RunFailed. SIGTERM and SIGINT (Ctrl-C)
    of this process are passed on to the run, which saves a checkpoint and stops; the plan then ends
    with RunFailed(code=EXIT_STOPPED). (At a terminal, Ctrl-C reaches the run itself as well: a
    repeated signal changes nothing for it.)"""
    progress = Progress(todo, plan.runs, stream, progress_every)
    stop: list[int] = []
    child: list[subprocess.Popen] = []

    def forward(signum, frame):
        stop.append(signum)
        if child and child[0].poll() is None:
            child[0].send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for k, run in enumerate(todo, 1):
            if stop:  # the signal came between two runs
                raise RunFailed(run, EXIT_STOPPED, f"stopped by {signal.Signals(stop[0]).name} before it started")
            run.run_dir.mkdir(parents=True, exist_ok=True)
            cmd = command(run, launcher, nproc_per_node)
            progress.start(k, run)
            t0 = time.monotonic()
            with open(run.log, "a") as log:
                log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
                log.flush()
                parent = os.getpid()
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        preexec_fn=lambda: _die_with_parent(parent))
            child[:] = [proc]
            while True:
                try:
                    code = proc.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    progress.poll()
            child.clear()
            if code != 0:
                raise RunFailed(run, EXIT_STOPPED if stop or code == EXIT_STOPPED else code, _last_line(run.log))
            progress.finish(run, time.monotonic() - t0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        progress.close()


def check_launcher(launcher: str) -> None:
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise ReproduceError("sbatch not found on PATH (--launcher slurm needs SLURM's commands)")


_JOB_ID = re.compile(r"Submitted batch job (\d+)|^(\d+)(?:;\S+)?$", re.M)


def _sbatch(args: list[str]) -> str:
    try:
        proc = subprocess.run(["sbatch", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise ReproduceError("sbatch not found on PATH (--launcher slurm needs SLURM)") from None
    match = _JOB_ID.search(proc.stdout)
    if proc.returncode != 0 or not match:
        why = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[0]
        raise ReproduceError(f"sbatch failed: {why}")
    return match.group(1) or match.group(2)


def job_shape(plan: Plan, nproc_per_node: int | None) -> list[str]:
    """sbatch options the runs' own settings imply; the user's --sbatch-args come after them and win.
    One node is launch/slurm.sbatch's default. GPUs: none for parallel.device=cpu, one per process
    where --nproc-per-node says how many, else the script's default (8 per node)."""
    shape = [f"--export=ALL,NPROC_PER_NODE={nproc_per_node}"] if nproc_per_node is not None else []
    if all(run.config.parallel.device == "cpu" for run in plan.runs):
        shape.append("--gpus-per-node=0")
    elif nproc_per_node is not None:
        shape.append(f"--gpus-per-node={nproc_per_node}")
    return shape


def submit_slurm(plan: Plan, todo: Sequence[RunSpec], report_argv: list[str], sbatch_args: Sequence[str] = (),
                 stream: TextIO = sys.stdout, nproc_per_node: int | None = None) -> dict[str, str]:
    """One job per run through launch/slurm.sbatch (warm starts first, method runs with
    --dependency=afterok on theirs), then a report job after all of them. Returns name -> job id.
    nproc_per_node None: the script's default (one process per GPU of the node). A chain that SLURM
    holds for a reason that never clears (one node asked too many of) is cancelled: ReproduceError."""
    ids: dict[str, str] = {}
    sbatch_args = [*job_shape(plan, nproc_per_node), *sbatch_args]
    tag = f"mm-{plan.out.name}"
    for run in sorted(todo, key=lambda r: r.method != WARM_START):  # warm starts get their ids first
        run.run_dir.mkdir(parents=True, exist_ok=True)
        # A failed warm start cancels the runs after it, rather than leaving them pending for ever.
        dep = [f"--dependency=afterok:{ids[run.warm_start]}", "--kill-on-invalid-dep=yes"] \
            if run.warm_start in ids else []
        args = [f"--job-name={tag}-{run.name}", f"--output={run.log}", f"--chdir={REPO}", *dep, *sbatch_args,
                str(SBATCH), *map(str, run.files), *run.overrides]
        try:
            ids[run.name] = _sbatch(args)
        except ReproduceError as e:
            done = ", ".join(f"{n} {i}" for n, i in ids.items()) or "none"
            raise ReproduceError(f"{run.name}: {e} (submitted before it: {done})") from None
        print(f"submitted {run.name}: job {ids[run.name]}" + (f" (after {dep[0].split(':')[-1]})" if dep else ""),
              file=stream)
    dep = [f"--dependency=afterok:{':'.join(ids.values())}", "--kill-on-invalid-dep=yes"] if ids else []
    ids["report"] = _sbatch([f"--job-name={tag}-report", f"--output={plan.out / 'report.log'}", f"--chdir={REPO}",
                             "--nodes=1", "--ntasks=1", *dep, "--wrap", shlex.join(report_argv)])
    print(f"submitted report: job {ids['report']}" + (" (after all runs)" if dep else ""), file=stream)
    held = held_job(list(ids.values()))
    if held:
        job, reason = held
        name = next(n for n, i in ids.items() if i == job)
        subprocess.run(["scancel", *ids.values()], capture_output=True)
        raise ReproduceError(f"job {job} ({name}) would wait for ever: SLURM holds it for {reason} "
                             f"({NEVER_CLEARS[reason.split(',')[0]]}); cancelled jobs {' '.join(ids.values())}")
    return ids


# Reasons (squeue %r) SLURM holds a pending job for that waiting does not clear.
NEVER_CLEARS = {
    "PartitionNodeLimit": "more nodes than its partition has: --nodes in --sbatch-args",
    "PartitionTimeLimit": "more time than its partition allows: --time in --sbatch-args",
    "PartitionConfig": "more than a node of its partition has: nodes, GPUs, CPUs or memory",
    "ReqNodeNotAvail": "a node it asks for is not available",
    "BadConstraints": "constraints no node meets",
    "InvalidAccount": "an account it may not use",
    "InvalidQOS": "a QOS it may not use",
    "DependencyNeverSatisfied": "a job it waits for failed",
}


def held_job(job_ids: Sequence[str], polls: int = 6, every_s: float = 0.5) -> Optional[tuple[str, str]]:
    """(job id, reason) of a job SLURM holds for a NEVER_CLEARS reason, or None. The scheduler
    refines a new job's reason in its first second ("None", then e.g. PartitionConfig, then
    PartitionNodeLimit): a reason counts once two polls in a row agree. None too where squeue does
    not answer (it cannot tell)."""
    previous: set[tuple[str, str]] = set()
    for _ in range(polls):
        time.sleep(every_s)
        try:
            proc = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if proc.returncode != 0:
            return None
        rows = [line.split("|", 2) for line in proc.stdout.splitlines() if line.count("|") >= 2]
        held = {(job, reason) for job, state, reason in rows
                if state == "PENDING" and reason.split(",")[0] in NEVER_CLEARS}
        if held & previous:
            return min(held & previous, key=lambda jr: (len(jr[0]), jr[0]))  # the first submitted
        if not held and not any(state == "PENDING" and reason == "None" for _, state, reason in rows):
            return None  # every job running, finished, or pending for a reason that clears
        previous = held
    return None


# --------------------------------------------------------------------------- the report


def launch_label(launch: Optional[dict]) -> str:
    if not launch:
        return "launch not recorded"
    n, t = launch["nproc_per_node"], launch["threads_per_process"]
    return f"{launch['launcher']}, {n} process{'es' if n > 1 else ''} x {t} thread{'s' if t > 1 else ''}"


def _finished_results(out: Path, names: Sequence[tuple[str, int]], threshold: float, device: str,
                      stream: TextIO, missing: Optional[list] = None) -> list:
    """collect_run of each finished run of `names` in out/runs; the others go to `missing`."""
    from megamora import report
    from megamora.export import run_config

    results = []
    for method, seed in names:
        run_dir = out / "runs" / run_name(method, seed)
        try:
            done = finished(run_dir, run_config(run_dir).steps)
        except (OSError, ValueError):
            done = False
        if not done:
            if missing is not None:
                missing.append(run_name(method, seed))
            continue
        print(f"report: {out.name}/runs/{run_name(method, seed)}", file=stream, flush=True)
        results.append(report.collect_run(method, run_dir, threshold=threshold, device=device,
                                          cache=out / "cache" / f"{run_name(method, seed)}.json",
                                          with_spectrum=method != WARM_START))
    return results


def check_noise_dirs(out: Path, record: dict, dirs: Sequence[str | Path]) -> list[Path]:
    """Noise reproductions (`--noise-from`): folders of the same recipe whose common methods have the
    same settings as `out`'s; only their launch (threads, processes) may differ."""
    checked = []
    for d in dirs:
        d = Path(d).expanduser().resolve()
        other = read_record(d)
        if other is None:
            raise ReproduceError(f"--noise-from {d}: no recipe.json there (not a reproduce folder)")
        if d == out.resolve():
            raise ReproduceError(f"--noise-from {d} is --out itself")
        for method, cfg in other.get("configs", {}).items():
            if method in record.get("configs", {}):
                diff = _differences(record["configs"][method], cfg)
                if diff:
                    raise ReproduceError(f"--noise-from {d}: its {method} runs have other settings: {diff[0]}")
        checked.append(d)
    return checked


def noise_floor(out: Path, record: dict, results: Sequence, threshold: float, device: str, stream: TextIO):
    """The floor the verdict judges against: measured from record["noise_from"] (the same runs under
    other launch settings), else the recipe's recorded one, else None."""
    from megamora import noise
    from megamora.report import MODULES

    def values(rs) -> dict:
        out_ = {}
        for r in rs:
            kinds = [k for k in MODULES if k in r.sv_counts]
            out_[(r.method, r.seed)] = (r.perplexity, statistics.fmean(r.sv_counts[k] for k in kinds) if kinds else None)
        return out_

    if record.get("noise_from"):
        reference = values(results)
        others = {}
        for d in check_noise_dirs(out, record, record["noise_from"]):
            other = read_record(d)
            names = [key for key in reference if key[0] in other.get("methods", []) and key[1] in other.get("seeds", [])]
            setting = f"{launch_label(other.get('launch'))} ({d.name})"
            others[setting] = values(_finished_results(d, names, threshold, device, stream))
        floor = noise.measure(reference, others)
        if floor is not None:
            floor.source = f"measured here against {launch_label(record.get('launch'))}"
            return floor
    if record.get("noise_floor"):
        return noise.NoiseFloor.recorded(record["noise_floor"])
    return None


def write_report(out: str | Path, threshold: float = 0.1, device: str = "cpu", stream: TextIO = sys.stderr) -> dict:
    """The report (megamora.report) over every finished run DIR/recipe.json lists; runs not finished
    yet are named in the report and left out. The verdict is judged against the noise floor (measured
    from DIR's `noise_from` reproductions, else the recipe's). Returns report.write_report's paths."""
    from megamora import report

    out = Path(out)
    record = read_record(out)
    if record is None:
        raise ReproduceError(f"{out} has no recipe.json: not a reproduce folder")
    seeds, methods = record["seeds"], record["methods"]
    missing: list[str] = []
    warm = _finished_results(out, [(WARM_START, s) for s in seeds] if record.get("warm_start_steps") else [],
                             threshold, device, stream, missing)
    results = _finished_results(out, [(m, s) for m in methods for s in seeds], threshold, device, stream,
                                missing)
    if not results:
        raise ReproduceError(f"{out}: no finished run to report on yet")
    floor = noise_floor(out, record, results, threshold, device, stream)
    return report.write_report(results, out, recipe=record["recipe"], methods=methods, seeds=seeds,
                               paper=record.get("paper"), warm=warm, missing=missing, threshold=threshold,
                               description=record.get("description", ""), noise=floor)

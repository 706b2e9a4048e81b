"""Every command in a ```bash block of README.md and docs/*.md runs, in a smoke form.

Each page's commands run top to bottom in a scratch folder of their own (a page's later commands read
what its earlier ones wrote: `runs/mora`, `hf/`), with links to the repository's configs/, launch/,
tools/ and benchmarks/ so that relative paths mean what they mean in a clone. The pages run two at a
time. A command is transformed by the first rule that matches it:

| rule | command | what is run |
|---|---|---|
| make | `make demo`, `make reproduce` | `make -n TARGET` prints the recipe; its `launch/pretrain.py` / `tools/reproduce.py` line goes through the rules below |
| make-test | `make test` | `make -n test` must name `pytest ... tests` (the suite is not run from inside itself) |
| make-bench | `make bench-peers BENCH_ARGS=...` | `make -n` prints the `benchmarks/bench_step.py` line; it runs by the benchmark rule, in this venv (peers missing here are skipped by the benchmark) |
| dry-run | `[WORLD_SIZE=N] python launch/pretrain.py ... --dry-run` | as written |
| train | `python launch/pretrain.py ...` | SMOKE_OVERRIDES appended (later overrides win): 2 steps of a 2-layer 9m model on the shared C4 sample |
| torchrun / deepspeed | `torchrun ... launch/pretrain.py ...`, `deepspeed ... launch/pretrain.py ...` | the launcher's own parser reads its arguments; the training command runs with `--dry-run` at WORLD_SIZE = nodes x processes per node, and as one process by the train rule (the engine, stage and DeepSpeed JSON start up for real) |
| sbatch | `sbatch [--nodes N ...] launch/slurm.sbatch ARGS` | nothing is submitted: SBATCH_OPTIONS are the only options taken, `bash -n` reads the script, ARGS run with `--dry-run` at WORLD_SIZE = nodes x the script's `--gpus-per-node`, and as one process by the train rule |
| reproduce-noise | `[OMP_NUM_THREADS=N] python tools/reproduce.py ... --warm-starts SRC` or `... --report-only --noise-from DIR ...` | run for real in smoke form: SRC is first filled by a smoke run of the same recipe (replacing an earlier line's folder of another recipe) (`--seeds 0 --methods lora` + SMOKE_OVERRIDES) unless an earlier line did, then the line runs with SMOKE_OVERRIDES appended; a `--noise-from` report runs as written on what the lines before it made |
| reproduce | `python tools/reproduce.py ...` | `--dry-run` appended; with `--report-only`, DIR is first filled by a real smoke run (`--recipe table3-250m --seeds 0 --methods lora` + SMOKE_OVERRIDES: a recipe without a warm start), then the command runs as written |
| tool | `python tools/<one of TOOLS>.py ...` | as written, `--tokens N` capped at 256 |
| benchmark | `python benchmarks/<one of BENCH_SMOKE>.py ...` | BENCH_SMOKE's tiny arguments appended (argparse: later ones win) |
| benchmark-args | `python benchmarks/<one of BENCH_PARSE_ONLY>.py ...` | the script is imported and run up to its argument parsing, which must accept the documented arguments; why it is not run is stated there |
| not-run | a command in NOT_RUN | not run; the reason is stated there |

Everywhere: `python` is this interpreter; `/data/...` and `/shared/...` (cluster paths) move into the
scratch folder, except `data.local_dir=`, which points at the shared C4 sample ($MEGAMORA_DATA).
A command that no rule matches fails `test_every_command_has_a_rule`: a new kind of command in the docs
needs a rule here before it can pass.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DATA = Path(os.environ.get("MEGAMORA_DATA", REPO.parent / "shared" / "data")).resolve()
LINKED = ("configs", "launch", "tools", "benchmarks")
TIMEOUT_S = 600

SMOKE_OVERRIDES = [
    "steps=2", "model.preset=9m", "model.n_layers=2", "model.vocab_size=8000", "adapter.r=8",
    f"data.local_dir={DATA}/c4-sample/en", f"data.tokenizer={DATA}/tokenizers/c4-sample-8k/spiece.model",
    "data.seq_len=32", "data.shuffle_buffer=0", "global_batch_size=4", "micro_batch_size=2", "eval_every=0",
    "eval_tokens=256", "final_eval_tokens=256", "save_every=0", "logging.progress_bar=false",
]
TOOLS = ("merge_checkpoint", "eval_ppl", "count_singular_values", "convert_to_hf", "report")
BENCH_SMOKE = {
    "bench_adapters": "--shapes 64x64 --cases 8:1 4:6 --dtypes float32 --tokens 64 --rounds 1 --warmup 0",
    "bench_trainer": "--preset 9m --seq-len 32 --micro-batch 2 --steps 1 --rounds 1",
    "bench_data": "--seq-len 32 --tokens 4000",
    "bench_step": "--preset 9m --seq-len 32 --batch 2 --vocab 1000 --dtypes float32 --rounds 1 --steps 1 --warmup 0 "
                  "--contenders ours-full hf-full ours-lora ours-mora6",
    "bench_utilisation": "--preset 9m --seq-len 32 --batch 2 --vocab 1000 --dtypes float32 --rounds 1 --steps 1 "
                         "--warmup 0 --gemm-size 128 --gemm-reps 1 --profile-steps 0",
    "bench_loss": "--dim 64 --vocab 1000 --tokens 128 --chunk 64 --rounds 1",
    "bench_validation": "--tokens 4096 --seq-len 32 --world-sizes 1 2 --repeat 1",
    "bench_optimizers": "--presets 9m --dtypes float32 --vocab 1000 --steps 1 --rounds 1 --svd-preset 9m",
}
# Benchmarks whose smallest run is still minutes on 2 cores: the script is imported and its parser must
# accept the documented arguments (an unknown or badly typed one fails), then it stops.
BENCH_PARSE_ONLY = {
    "bench_throughput": "--engines launches the entry point once per engine (4 runs); tests/test_deepspeed.py "
                        "trains every engine",
    "bench_startup": "builds, shards and initialises the 350m preset on 2 ranks (minutes); tests/test_startup.py "
                     "checks the sharded init and warm start",
    "bench_zero_startup": "the same under DeepSpeed ZeRO-3 (minutes); tests/test_deepspeed.py checks the partitioned "
                          "init",
    "bench_zero_memory": "a dim-1024 model per engine and adapter on 2 ranks (minutes)",
    "bench_offload_optimizer": "JIT-builds DeepSpeedCPUAdam (minutes, a C++ compiler); "
                               "tests/test_deepspeed_configs.py trains the offload configs",
}
NOT_RUN = {
    "sudo apt-get install libjemalloc2": "installs a system package (root, network)",
    "export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1":
        "sets the allocator of the user's shell; the project does not depend on it",
}
# sbatch options the docs use (value-taking); any other option fails, so new ones are looked at.
SBATCH_OPTIONS = ("--nodes", "--partition", "--time", "--job-name", "--account", "--qos")


# ---------------------------------------------------------------------------------------------
# Extraction


@dataclass
class Command:
    page: str
    line: int
    text: str  # as printed, continuation lines joined
    env: dict[str, str] = field(default_factory=dict)  # VAR=value words before the program
    argv: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def extract_commands(text: str, page: str) -> list[Command]:
    """The commands of every ```bash block: `\\` continuations joined, comments and blank lines dropped."""
    commands, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not in_block:
            in_block = line.strip() == "```bash"
            continue
        if line.strip() == "```":
            assert not pending, f"{page}:{start}: a bash block ends inside a continued line"
            in_block = False
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined, pending = (pending + line).strip(), ""
        words = shlex.split(joined, comments=True)
        if not words:
            continue
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        commands.append(Command(page, start, " ".join(shlex.split(joined, comments=True)), env, words))
    return commands


def page_commands(path: Path) -> list[Command]:
    return extract_commands(path.read_text(), str(path.relative_to(REPO)))


# ---------------------------------------------------------------------------------------------
# Running


class Scratch:
    """A page's scratch folder: looks like the repository root to relative paths."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for name in LINKED:
            (root / name).symlink_to(REPO / name)

    def rewrite(self, word: str) -> str:
        if word.startswith("data.local_dir=/"):
            return f"data.local_dir={DATA}/c4-sample/en"
        return re.sub(r"(?<![\w.])/(data|shared)/", lambda m: f"{self.root}/abs/{m.group(1)}/", word)


_SMOKE_RUNS: dict[tuple[str, ...], str] = {}  # one-process smoke runs of launcher lines, run once per config
_SMOKE_LOCK = threading.Lock()


def run(cmd: Command, argv: list[str], scratch: Scratch, env: dict[str, str] | None = None) -> str:
    """Run argv in the scratch folder; its output, or a failure naming the doc line and the command."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **cmd.env, **(env or {})}
    argv = [sys.executable if a == "python" else scratch.rewrite(a) for a in argv]
    proc = subprocess.run(argv, cwd=scratch.root, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-25:])
        raise AssertionError(f"{cmd}\n  ran as: {shlex.join(argv)}\n  exit code {proc.returncode}:\n{tail}")
    return proc.stdout


def is_entry(word: str, script: str) -> bool:
    return word == script or word.endswith("/" + script)


def train(cmd: Command, args: list[str], scratch: Scratch) -> None:
    out = run(cmd, ["python", "launch/pretrain.py", *args, *SMOKE_OVERRIDES], scratch)
    assert "final validation perplexity" in out, f"{cmd}: no final perplexity printed"


def dry_run(cmd: Command, args: list[str], scratch: Scratch, world: int | None) -> None:
    env = {} if world is None else {"WORLD_SIZE": str(world)}
    out = run(cmd, ["python", "launch/pretrain.py", *args], scratch, env)
    assert "dry run: nothing trained" in out, f"{cmd}: not a dry run"


def launched(cmd: Command, args: list[str], scratch: Scratch, world: int) -> None:
    """A launcher's training command: its plan at the launcher's world size, then one smoke process."""
    dry_run(cmd, [*args, "--dry-run"], scratch, world)
    key = tuple(a for a in args if not a.startswith("run_dir="))
    with _SMOKE_LOCK:
        if key in _SMOKE_RUNS:
            return
        _SMOKE_RUNS[key] = str(cmd)
    run_dir = scratch.root / "smoke-runs" / f"line{cmd.line}"
    train(cmd, [*key, f"run_dir={run_dir}"], scratch)


def make_lines(cmd: Command, target_args: list[str]) -> list[list[str]]:
    """The recipe `make -n` prints for the target, as argv lists (nothing is executed)."""
    proc = subprocess.run(["make", "-n", "-C", str(REPO), f"VENV={REPO / '.venv'}", *target_args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, f"{cmd}: make -n failed:\n{proc.stdout}"
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip() and not line.startswith("make")]


def python_line(cmd: Command, lines: list[list[str]], script: str) -> list[str]:
    found = [w for w in lines if any(is_entry(a, script) for a in w)]
    assert found, f"{cmd}: make -n prints no {script} line: {lines}"
    words = found[-1]
    i = next(i for i, a in enumerate(words) if is_entry(a, script))
    return [script, *words[i + 1:]]


# ---------------------------------------------------------------------------------------------
# Rules


@dataclass
class Rule:
    name: str
    matches: Callable[[Command], bool]
    check: Callable[[Command, Scratch], None]


def _program(cmd: Command, *names: str) -> bool:
    return bool(cmd.argv) and cmd.argv[0] in names


def _python_script(cmd: Command, script: str) -> bool:
    return _program(cmd, "python", "python3") and len(cmd.argv) > 1 and is_entry(cmd.argv[1], script)


def check_make(cmd: Command, scratch: Scratch) -> None:
    target = cmd.argv[1]
    script = {"demo": "launch/pretrain.py", "reproduce": "tools/reproduce.py"}[target]
    line = python_line(cmd, make_lines(cmd, cmd.argv[1:]), script)
    dispatch(Command(cmd.page, cmd.line, f"{cmd.text} -> python {shlex.join(line)}", cmd.env, ["python", *line]),
             scratch)


def check_make_test(cmd: Command, scratch: Scratch) -> None:
    lines = [" ".join(w) for w in make_lines(cmd, cmd.argv[1:])]
    assert any("-m pytest" in line and line.split()[-1] == "tests" for line in lines), f"{cmd}: {lines}"


def check_make_bench(cmd: Command, scratch: Scratch) -> None:
    line = python_line(cmd, make_lines(cmd, cmd.argv[1:]), "benchmarks/bench_step.py")
    check_benchmark(Command(cmd.page, cmd.line, cmd.text, cmd.env, ["python", *line]), scratch)


def check_dry_run(cmd: Command, scratch: Scratch) -> None:
    dry_run(cmd, cmd.argv[2:], scratch, None)


def check_train(cmd: Command, scratch: Scratch) -> None:
    train(cmd, cmd.argv[2:], scratch)


def check_torchrun(cmd: Command, scratch: Scratch) -> None:
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(cmd.argv[1:])
    assert is_entry(args.training_script, "launch/pretrain.py"), f"{cmd}: runs {args.training_script}"
    nodes = int(str(args.nnodes).split(":")[-1])
    launched(cmd, args.training_script_args, scratch, nodes * int(args.nproc_per_node))


_DEEPSPEED_PARSE = ("import json, sys; from deepspeed.launcher.runner import parse_args; a = parse_args(sys.argv[1:]); "
                    "print(json.dumps(dict(script=a.user_script, args=a.user_args, nodes=a.num_nodes, gpus=a.num_gpus)))")


def check_deepspeed(cmd: Command, scratch: Scratch) -> None:
    out = run(cmd, ["python", "-c", _DEEPSPEED_PARSE, *cmd.argv[1:]], scratch)
    parsed = json.loads(out.strip().splitlines()[-1])
    assert is_entry(parsed["script"], "launch/pretrain.py"), f"{cmd}: runs {parsed['script']}"
    world = max(parsed["nodes"], 1) * max(parsed["gpus"], 1)
    launched(cmd, parsed["args"], scratch, world)


def check_sbatch(cmd: Command, scratch: Scratch) -> None:
    parser = argparse.ArgumentParser(prog="sbatch", add_help=False)
    for option in SBATCH_OPTIONS:
        parser.add_argument(option)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(cmd.argv[1:])
    script = REPO / args.script
    assert script.is_file(), f"{cmd}: no script {args.script}"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert 'launch/pretrain.py --config "$@"' in text, f"{cmd}: {args.script} no longer passes its arguments on"
    nodes = int(args.nodes or re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
    launched(cmd, ["--config", *args.args], scratch, nodes * gpus)


def fill_reproduce_dir(cmd: Command, out: str, scratch: Scratch) -> None:
    run(cmd, ["python", "tools/reproduce.py", "--recipe", "table3-250m", "--seeds", "0", "--methods", "lora", "--out",
              out, *SMOKE_OVERRIDES], scratch)


def check_reproduce(cmd: Command, scratch: Scratch) -> None:
    argv = cmd.argv
    if "--report-only" in argv:
        fill_reproduce_dir(cmd, argv[argv.index("--out") + 1], scratch)
        run(cmd, argv, scratch)
    else:
        out = run(cmd, [*argv, "--dry-run"], scratch)
        assert "launch/pretrain.py" in out, f"{cmd}: the dry run printed no run command"


def check_reproduce_noise(cmd: Command, scratch: Scratch) -> None:
    argv = cmd.argv
    if "--warm-starts" not in argv:
        run(cmd, argv, scratch)  # the --noise-from report, over the runs the lines before it made
        return
    source, recipe = argv[argv.index("--warm-starts") + 1], argv[argv.index("--recipe") + 1]
    record = scratch.root / source / "recipe.json"
    if record.is_file() and json.loads(record.read_text())["recipe"] != recipe:
        shutil.rmtree(scratch.root / source)  # an earlier line's folder of another recipe
    if not record.is_file():
        run(cmd, ["python", "tools/reproduce.py", "--recipe", recipe, "--seeds", "0",
                  "--methods", "lora", "--out", source, *SMOKE_OVERRIDES], scratch, env={"OMP_NUM_THREADS": "2"})
    out = run(cmd, [*argv, *SMOKE_OVERRIDES], scratch)
    assert "linked from" in out, f"{cmd}: no warm start was linked"


def check_tool(cmd: Command, scratch: Scratch) -> None:
    argv = list(cmd.argv)
    if "--tokens" in argv:
        i = argv.index("--tokens") + 1
        argv[i] = str(min(int(argv[i]), 256))
    run(cmd, argv, scratch)


def check_benchmark(cmd: Command, scratch: Scratch) -> None:
    name = Path(cmd.argv[1]).stem
    run(cmd, [*cmd.argv, *shlex.split(BENCH_SMOKE[name])], scratch)


_PARSE_ONLY = """import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_then_stop(self, *args, **kwargs):
    print("parsed:", parse(self, *args, **kwargs))
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_then_stop
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
raise SystemExit("the script parsed no arguments")
"""


def check_benchmark_args(cmd: Command, scratch: Scratch) -> None:
    out = run(cmd, ["python", "-c", _PARSE_ONLY, *cmd.argv[1:]], scratch)
    assert "parsed: Namespace(" in out, f"{cmd}: its arguments were not parsed"


def check_not_run(cmd: Command, scratch: Scratch) -> None:
    assert NOT_RUN[" ".join(cmd.argv)], f"{cmd}: NOT_RUN gives no reason"


RULES = [
    Rule("make", lambda c: c.argv[:1] == ["make"] and c.argv[1:] in (["demo"], ["reproduce"]), check_make),
    Rule("make-test", lambda c: c.argv == ["make", "test"], check_make_test),
    Rule("make-bench", lambda c: c.argv[:2] == ["make", "bench-peers"]
         and all(a.startswith("BENCH_ARGS=") for a in c.argv[2:]), check_make_bench),
    Rule("dry-run", lambda c: _python_script(c, "launch/pretrain.py") and "--dry-run" in c.argv, check_dry_run),
    Rule("train", lambda c: _python_script(c, "launch/pretrain.py") and not c.env, check_train),
    Rule("torchrun", lambda c: _program(c, "torchrun") and not c.env, check_torchrun),
    Rule("deepspeed", lambda c: _program(c, "deepspeed") and not c.env, check_deepspeed),
    Rule("sbatch", lambda c: _program(c, "sbatch") and not c.env, check_sbatch),
    Rule("reproduce-noise", lambda c: _python_script(c, "tools/reproduce.py") and set(c.env) <= {"OMP_NUM_THREADS"}
         and ("--warm-starts" in c.argv or "--noise-from" in c.argv), check_reproduce_noise),
    Rule("reproduce", lambda c: _python_script(c, "tools/reproduce.py") and not c.env, check_reproduce),
    Rule("tool", lambda c: any(_python_script(c, f"tools/{t}.py") for t in TOOLS) and not c.env, check_tool),
    Rule("benchmark", lambda c: any(_python_script(c, f"benchmarks/{b}.py") for b in BENCH_SMOKE) and not c.env,
         check_benchmark),
    Rule("benchmark-args", lambda c: any(_python_script(c, f"benchmarks/{b}.py") for b in BENCH_PARSE_ONLY)
         and not c.env, check_benchmark_args),
    Rule("not-run", lambda c: " ".join(c.argv) in NOT_RUN and not c.env, check_not_run),
]


class NoRule(LookupError):
    pass


def rule_for(cmd: Command) -> Rule:
    for rule in RULES:
        if rule.matches(cmd):
            return rule
    raise NoRule(f"{cmd}\n  matches no rule of tests/test_doc_commands.py: add one (and a line to its table)")


def dispatch(cmd: Command, scratch: Scratch) -> None:
    rule_for(cmd).check(cmd, scratch)


# ---------------------------------------------------------------------------------------------
# Tests


def run_page(path: Path, root: Path) -> list[str]:
    """Run a page's commands in order; the failures (a page stops at its first: later commands may need it)."""
    scratch = Scratch(root)
    with open(root / "commands.log", "a") as log:  # what ran and how long it took, for a slow or failing page
        for cmd in page_commands(path):
            start = time.monotonic()
            try:
                dispatch(cmd, scratch)
            except (AssertionError, NoRule, subprocess.SubprocessError) as e:
                print(f"FAILED {rule_name(cmd)} {time.monotonic() - start:.0f}s {cmd}", file=log, flush=True)
                return [f"[{rule_name(cmd)}] {e}"]
            print(f"ok {rule_name(cmd)} {time.monotonic() - start:.0f}s {cmd}", file=log, flush=True)
    return []


def rule_name(cmd: Command) -> str:
    try:
        return rule_for(cmd).name
    except NoRule:
        return "no rule"


@pytest.fixture(scope="module")
def page_failures(request, tmp_path_factory, shared_data) -> dict[str, list[str]]:
    """The selected pages (`-k`), each run once, two at a time (a page's own commands in order)."""
    selected = {item.callspec.params["page"] for item in request.session.items
                if "page" in getattr(getattr(item, "callspec", None), "params", {})}
    root = tmp_path_factory.mktemp("doc-commands")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {p.name: pool.submit(run_page, p, root / p.stem) for p in PAGES
                   if p.name in selected and page_commands(p)}
        return {name: f.result() for name, f in futures.items()}


def test_every_command_has_a_rule():
    unknown = []
    for path in PAGES:
        for cmd in page_commands(path):
            try:
                rule_for(cmd)
            except NoRule as e:
                unknown.append(str(e))
    assert not unknown, "\n".join(unknown)


def test_the_docs_have_commands_of_every_rule():
    """Each rule is used by some page (a rule nothing needs any more goes), and the README has commands."""
    used = {rule_for(cmd).name for p in PAGES for cmd in page_commands(p)}
    assert used == {r.name for r in RULES}, f"rules no page uses: {sorted({r.name for r in RULES} - used)}"
    assert page_commands(REPO / "README.md")


@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_page_commands_run(page, page_failures):
    if not page_commands(REPO / ("README.md" if page == "README.md" else f"docs/{page}")):
        pytest.skip(f"{page} has no bash commands")
    assert not page_failures[page], "\n".join(page_failures[page])


def test_extraction_and_rules():
    """Continuations, comments and env prefixes are read as a shell would; unknown commands have no rule."""
    text = "x\n```bash\nWORLD_SIZE=8 python launch/pretrain.py --config a.yaml \\\n  run_dir=x --dry-run  # plan\n" \
           "# a comment\n\npython tools/new_tool.py RUN\n```\n```python\nnot a command\n```\n"
    first, second = extract_commands(text, "page.md")
    assert (first.line, first.env, first.argv) == (3, {"WORLD_SIZE": "8"}, [
        "python", "launch/pretrain.py", "--config", "a.yaml", "run_dir=x", "--dry-run"])
    assert rule_for(first).name == "dry-run"
    with pytest.raises(NoRule):
        rule_for(second)
    for unknown in ("python benchmarks/bench_new.py", "make bench", "srun python launch/pretrain.py",
                    "FOO=1 torchrun launch/pretrain.py", "pip install -e ."):
        with pytest.raises(NoRule):
            rule_for(extract_commands(f"```bash\n{unknown}\n```\n", "p.md")[0])
    scratch = Scratch.__new__(Scratch)
    scratch.root = Path("/tmp/s")
    assert scratch.rewrite("run_dir=/shared/runs/x") == "run_dir=/tmp/s/abs/shared/runs/x"
    assert scratch.rewrite("data.local_dir=/data/c4/en") == f"data.local_dir={DATA}/c4-sample/en"
    assert scratch.rewrite("configs/deepspeed/zero3_offload.json") == "configs/deepspeed/zero3_offload.json"


def test_no_paths_of_the_machine_the_docs_were_written_on():
    """Configs and docs name paths relative to the repository (or $MEGAMORA_DATA), never this machine's."""
    files = [*PAGES, *sorted((REPO / "configs").rglob("*.yaml")), *sorted((REPO / "configs").rglob("*.json"))]
    found = [f"{f.relative_to(REPO)}:{n}: {line.strip()}" for f in files
             for n, line in enumerate(f.read_text().splitlines(), 1)
             if re.search(r"(?<![\w.])/(work|home|root|tmp|Users)/", line)]
    assert not found, "absolute paths of a machine:\n" + "\n".join(found)

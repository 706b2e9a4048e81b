"""Training throughput of a config through the real entry point (launch/pretrain.py), in two modes.

1 process vs N torchrun ranks (gloo on CPU, NCCL on GPUs): tokens/s and the ratio N-rank / 1-process.

    .venv/bin/python benchmarks/bench_throughput.py --config configs/smoke/full.yaml --nproc 2 --steps 40

Engines on N ranks (--engines): FSDP2 and DeepSpeed ZeRO-1/2/3, run in ABBA order over --rounds rounds
(fsdp2 zero1 zero2 zero3, zero3 zero2 zero1 fsdp2, ...) so that drift on the machine hits every engine
alike; prints the median over rounds of tokens/s and of peak memory, each with its ratio to FSDP2.

    .venv/bin/python benchmarks/bench_throughput.py --engines --nproc 2 --steps 30 --rounds 3

tokens/s is the median of the logged windows after the first (warm-up) one. Peak memory is the largest
`peak_memory_gib` of the train records, which only rank 0 logs: on CPU its peak RSS, on GPU its peak
allocated CUDA memory. Each rank gets OMP_NUM_THREADS = cores / nproc. Extra dotted overrides go last,
e.g. `... --engines model.preset=9m adapter.kind=mora adapter.r=4`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from megamora.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
ENTRY = str(REPO / "launch" / "pretrain.py")
DS = ["parallel.engine=deepspeed"]
ENGINES = {"fsdp2": ["parallel.engine=fsdp2"], "zero1": [*DS, "parallel.zero_stage=1"],
           "zero2": [*DS, "parallel.zero_stage=2"], "zero3": [*DS, "parallel.zero_stage=3"]}


def child_env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    # DeepSpeed JIT-builds a comm op once; keep it with the venv rather than in ~/.cache.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    # The smoke configs default to ../shared/data relative to the cwd; pin it to the repo's.
    env.setdefault("MEGAMORA_DATA", str(REPO.parent / "shared" / "data"))
    return env


def run(config: str, nproc: int, steps: int, threads: int, extra: list[str]) -> tuple[float, float]:
    """(median tokens/s after the warm-up window, rank 0's peak memory in GiB) of one training run."""
    with tempfile.TemporaryDirectory() as run_dir:
        args = ["--config", config, f"run_dir={run_dir}", f"steps={steps}", "eval_every=0", "save_every=0",
                "logging.log_every=5", "logging.progress_bar=false", *extra]
        launcher = [sys.executable, ENTRY] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", ENTRY]
        proc = subprocess.run([*launcher, *args], env=child_env(threads), capture_output=True, text=True)
        if proc.returncode != 0:  # DeepSpeed is chatty on stderr: show only the end, where the error is
            print(f"failed ({proc.returncode}): {' '.join(launcher + args)}\n{proc.stderr[-4000:]}", file=sys.stderr)
            sys.exit(proc.returncode or 1)
        records = read_metrics(run_dir, "train")
    windows = [r["tokens_per_s"] for r in records]
    peak = max((r.get("peak_memory_gib") or 0.0) for r in records)
    return statistics.median(windows[1:] or windows), peak


def compare_processes(args: argparse.Namespace) -> None:
    one, _ = run(args.config, 1, args.steps, args.cores, args.overrides)
    many, _ = run(args.config, args.nproc, args.steps, max(1, args.cores // args.nproc), args.overrides)
    print(f"{args.config}: {args.steps} steps, {args.cores} CPU threads in all")
    print(f"1 process          {one:10.0f} tokens/s")
    print(f"{args.nproc} ranks (torchrun) {many:10.0f} tokens/s")
    print(f"ratio {args.nproc}-rank / 1-process = {many / one:.3f}")


def compare_engines(args: argparse.Namespace) -> None:
    threads = max(1, args.cores // args.nproc)
    names = list(ENGINES)
    results = {name: [] for name in names}  # name -> [(tokens/s, peak GiB)] one per round
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:  # ABBA: no engine always goes first
            tps, peak = run(args.config, args.nproc, args.steps, threads, [*ENGINES[name], *args.overrides])
            results[name].append((tps, peak))
            print(f"round {r + 1}/{args.rounds} {name:6s} {tps:10.0f} tokens/s {peak:8.3f} GiB", flush=True)
    tps = {n: statistics.median(t for t, _ in results[n]) for n in names}
    mem = {n: statistics.median(m for _, m in results[n]) for n in names}
    print(f"\n{args.config}: {args.nproc} ranks x {threads} threads, {args.steps} steps, "
          f"median of {args.rounds} round(s); peak memory = rank 0's peak RSS on CPU (allocated on GPU)")
    print(f"{'engine':8s} {'tokens/s':>10s} {'vs fsdp2':>9s} {'peak GiB':>9s} {'vs fsdp2':>9s}")
    for n in names:
        print(f"{n:8s} {tps[n]:10.0f} {tps[n] / tps['fsdp2']:9.3f} {mem[n]:9.3f} {mem[n] / mem['fsdp2']:9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "smoke" / "full.yaml"))
    parser.add_argument("--engines", action="store_true", help="compare FSDP2 and ZeRO-1/2/3 on --nproc ranks")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="ABBA rounds of the engines (--engines only)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU threads shared by all ranks")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.engines:
        compare_engines(args)
    else:
        compare_processes(args)


if __name__ == "__main__":
    main()

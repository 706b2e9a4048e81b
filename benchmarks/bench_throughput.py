"""Training throughput of a config through the real entry point, on 1 process and on N torchrun
ranks (gloo on CPU, NCCL on GPUs), printed as tokens/s and the ratio N-rank / 1-process.

    .venv/bin/python benchmarks/bench_throughput.py --config configs/smoke/full.yaml --nproc 2 --steps 40
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

ENTRY = str(Path(__file__).resolve().parents[1] / "launch" / "pretrain.py")


def run(config: str, nproc: int, steps: int, threads: int, extra: list[str]) -> float:
    """Median tokens/s over the logged windows after the first (warm-up) one."""
    with tempfile.TemporaryDirectory() as run_dir:
        args = ["--config", config, f"run_dir={run_dir}", f"steps={steps}", "eval_every=0", "save_every=0",
                "logging.log_every=5", "logging.progress_bar=false", *extra]
        launcher = [sys.executable, ENTRY] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", ENTRY]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([*launcher, *args], env=env, check=True, capture_output=True)
        windows = [r["tokens_per_s"] for r in read_metrics(run_dir, "train")]
    return statistics.median(windows[1:] or windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smoke/full.yaml")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU threads shared by all ranks")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    one = run(args.config, 1, args.steps, args.cores, args.overrides)
    many = run(args.config, args.nproc, args.steps, max(1, args.cores // args.nproc), args.overrides)
    print(f"{args.config}: {args.steps} steps, {args.cores} CPU threads in all")
    print(f"1 process          {one:10.0f} tokens/s")
    print(f"{args.nproc} ranks (torchrun) {many:10.0f} tokens/s")
    print(f"ratio {args.nproc}-rank / 1-process = {many / one:.3f}")


if __name__ == "__main__":
    main()

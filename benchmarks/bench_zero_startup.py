"""Start-up cost of a DeepSpeed run: seconds and peak host memory (max RSS) per rank to build the
model on the meta device, shard it (ZeRO-3: partitioned parameters), give it its seeded initial
values and wrap it with its optimizer (deepspeed.initialize), on gloo ranks.

    python benchmarks/bench_zero_startup.py --preset 350m --nproc 2            # ZeRO-3
    python benchmarks/bench_zero_startup.py --preset 350m --nproc 2 --stage 2

"peak to init" is the peak resident set once the model has its initial values (before the optimizer):
a model of P fp32 parameters has 4 P / N bytes of ZeRO-3 partitions per rank, or 4 P bytes where
every rank builds the whole model first. The final peak adds what deepspeed.initialize allocates
(fp32 master copies, moments, gradient partitions: about 16 P / N bytes), which dominates on 2 ranks
but not on 8 GPUs per node (20 P / 8 < 4 P).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="350m")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--adapter", default="none", help="adapter.kind")
    return p.parse_args()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def start_up(rank: int, args: argparse.Namespace, port: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))
    from megamora import adapters
    from megamora.config import load_config
    from megamora.distributed import init_distributed
    from megamora.engines import build_engine
    from megamora.engines.deepspeed import require_deepspeed
    from megamora.model import build_model, materialize
    from megamora.optim import build_optimizer

    require_deepspeed()
    cfg = load_config(None, [f"model.preset={args.preset}", f"adapter.kind={args.adapter}", "run_dir=unused",
                             f"global_batch_size={args.nproc}", "micro_batch_size=1", "parallel.engine=deepspeed",
                             f"parallel.zero_stage={args.stage}"])
    info = init_distributed(cfg.parallel)
    before = rss_mb()
    t0 = time.perf_counter()
    engine = build_engine(cfg, info)
    model = build_model(cfg.model, device="meta")
    adapters.apply_adapters(model, cfg.adapter)
    engine.shard(model)
    t_shard = time.perf_counter()
    materialize(model, info.device, cfg.seed, cfg.model.init_std)
    t_init = time.perf_counter()
    peak_init = rss_mb()  # the peak up to here: the model with its initial values, before the optimizer
    engine.setup(model, build_optimizer(model, cfg.optim))
    t_setup = time.perf_counter()
    torch.distributed.barrier()
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    result = {"rank": rank, "shard_s": t_shard - t0, "init_s": t_init - t_shard, "setup_s": t_setup - t_init,
              "rss_before_mb": before, "peak_init_mb": peak_init,
              "peak_rss_mb": rss_mb(), "params": params}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    os._exit(0)  # no gloo teardown (see megamora.distributed.exit_process)


def main() -> None:
    args = parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-zero-startup-"))
    t0 = time.perf_counter()
    mp.spawn(start_up, args=(args, 29631, out), nprocs=args.nproc, join=True)
    wall = time.perf_counter() - t0
    rows = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.nproc)]
    full_mb = rows[0]["params"] * 4 / 2**20
    print(f"{args.preset} ({rows[0]['params'] / 1e6:.0f} M parameters, {full_mb:.0f} MB fp32), ZeRO-{args.stage}, "
          f"adapter {args.adapter}, {args.nproc} gloo ranks; spawn to done {wall:.1f} s")
    print(f"{'rank':>4} {'shard s':>8} {'init s':>7} {'setup s':>8} {'RSS before MB':>13} {'peak to init MB':>15} "
          f"{'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['rank']:>4} {r['shard_s']:>8.2f} {r['init_s']:>7.2f} {r['setup_s']:>8.2f} {r['rss_before_mb']:>13.0f} "
              f"{r['peak_init_mb']:>15.0f} {r['peak_rss_mb']:>11.0f}")


if __name__ == "__main__":
    main()

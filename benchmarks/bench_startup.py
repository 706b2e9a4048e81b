"""Start-up cost of a sharded run: seconds and peak host memory (max RSS) per rank to build the
model, shard it (FSDP2), give it its seeded initial values and, optionally, load a warm start.

    python benchmarks/bench_startup.py --preset 350m --nproc 2                 # fresh init
    python benchmarks/bench_startup.py --preset 350m --nproc 2 --warm-start    # + a full-rank warm start
    python benchmarks/bench_startup.py --preset 350m --nproc 2 --resume        # init skipped: a resume loads

The warm-start checkpoint (model weights only, DCP) is written once into --scratch by the same
number of ranks. A model of P fp32 parameters sharded over N ranks needs 4 P / N bytes per rank;
the rest of the peak is what start-up costs on top (a full copy of the model is 4 P bytes).
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
import torch.distributed as dist
import torch.multiprocessing as mp


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="350m")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--adapter", default="mora", help="adapter.kind of the warm-started model")
    p.add_argument("--warm-start", action="store_true", help="load a full-rank checkpoint of the preset")
    p.add_argument("--resume", action="store_true", help="materialize without drawing the initial weights")
    p.add_argument("--scratch", default=None, help="where the warm-start checkpoint is written (a temp dir)")
    return p.parse_args()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_checkpoint(rank: int, world: int, preset: str, path: Path, port: int) -> None:
    """A full-rank model-only DCP checkpoint of the preset (zeros: the values do not matter)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from megamora.config import load_config
    from megamora.engines.fsdp2 import FSDP2Engine, _dcp
    from megamora.model import build_model
    import torch.distributed.checkpoint as dcp

    _join(rank, world, port)
    cfg = load_config(None, [f"model.preset={preset}", f"run_dir={path}"])
    model = build_model(cfg.model, device="meta")
    FSDP2Engine(cfg, _dist_info(rank, world)).shard(model)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.detach().zero_()
    _dcp(dcp.save, {"model": get_model_state_dict(model)}, path)
    if rank == 0:
        (path / "trainer_state.json").write_text(json.dumps({"step": 1, "engine": "fsdp2"}))
    dist.barrier()
    dist.destroy_process_group()


def start_up(rank: int, world: int, args: argparse.Namespace, ckpt: Path | None, port: int, out: Path) -> None:
    from megamora import adapters
    from megamora.checkpoint import load_base_weights
    from megamora.config import load_config
    from megamora.engines.fsdp2 import FSDP2Engine
    from megamora.model import build_model, materialize

    _join(rank, world, port)
    before = rss_mb()
    t0 = time.perf_counter()
    kind = args.adapter if ckpt else "none"
    cfg = load_config(None, [f"model.preset={args.preset}", f"adapter.kind={kind}", f"run_dir={out}"])
    model = build_model(cfg.model, device="meta")
    adapters.apply_adapters(model, cfg.adapter)
    FSDP2Engine(cfg, _dist_info(rank, world)).shard(model)
    t_build = time.perf_counter()
    if args.resume:
        materialize(model, torch.device("cpu"), cfg.seed, cfg.model.init_std, draw=False)
    else:
        materialize(model, torch.device("cpu"), cfg.seed, cfg.model.init_std)
    t_init = time.perf_counter()
    if ckpt is not None:
        load_base_weights(ckpt, model)
    t_load = time.perf_counter()
    dist.barrier()
    result = {"rank": rank, "build_s": t_build - t0, "init_s": t_init - t_build, "warm_start_s": t_load - t_init,
              "rss_before_mb": before, "peak_rss_mb": rss_mb()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _dist_info(rank: int, world: int):
    from megamora.distributed import DistInfo

    return DistInfo(rank, world, rank, torch.device("cpu"))


def main() -> None:
    args = parse_args()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench-startup-"))
    ckpt = None
    if args.warm_start:
        ckpt = scratch / f"full-{args.preset}"
        if not (ckpt / "trainer_state.json").is_file():
            mp.spawn(write_checkpoint, args=(args.nproc, args.preset, ckpt, 29611), nprocs=args.nproc, join=True)
    out = Path(tempfile.mkdtemp(prefix="bench-startup-out-"))
    t0 = time.perf_counter()
    mp.spawn(start_up, args=(args.nproc, args, ckpt, 29612, out), nprocs=args.nproc, join=True)
    wall = time.perf_counter() - t0
    rows = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.nproc)]
    what = "resume (no draws)" if args.resume else ("warm start" if ckpt else "fresh init")
    print(f"{args.preset}, {args.nproc} gloo ranks, {what}; spawn to done {wall:.1f} s")
    print(f"{'rank':>4} {'build s':>8} {'init s':>7} {'warm start s':>12} {'RSS before MB':>13} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['rank']:>4} {r['build_s']:>8.2f} {r['init_s']:>7.2f} {r['warm_start_s']:>12.2f} "
              f"{r['rss_before_mb']:>13.0f} {r['peak_rss_mb']:>11.0f}")


if __name__ == "__main__":
    main()

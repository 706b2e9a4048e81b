"""Host memory a bf16 forward adds on each rank, FSDP2 against DeepSpeed ZeRO-3, on gloo ranks: the
resident set at the end of forward (still inside autocast, before backward) minus before it.

    python benchmarks/bench_zero_memory.py                        # fsdp2, zero3; full-rank and MoRA

Activations are the same for every engine (same model, batch and dtype); what differs is what each
keeps of the gathered weights. FSDP2 frees each block's unsharded bf16 weights after its forward
(reshard_after_forward). ZeRO-3 keeps fp32 parameters and computes in bf16 through torch.autocast;
a bf16 copy of a weight that a layer saves for backward stays until backward.
The model is built wide and shallow (--dim, --layers, a small vocabulary) so that its linear weights
dominate; the table gives their bf16 size in full and per rank beside the measured growth.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128, help="sequence length of the one-sequence batch")
    p.add_argument("--kinds", default="none,mora", help="adapter.kind values")
    p.add_argument("--engines", default="fsdp2,zero3")
    return p.parse_args()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def forward_growth(rank: int, args: argparse.Namespace, engine_name: str, kind: str, port: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from megamora import adapters
    from megamora.config import load_config
    from megamora.distributed import init_distributed
    from megamora.engines import build_engine
    from megamora.model import build_model, materialize
    from megamora.optim import build_optimizer

    # ZeRO-3 releases a gathered weight after use only beyond its reuse distance and live-parameter
    # budget (1e9 elements each by default: a model this small would stay gathered); 0 here, as a
    # model larger than the budgets behaves.
    release = out / "release.json"
    release.write_text(json.dumps({"zero_optimization": {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0,
                                                         "stage3_param_persistence_threshold": 0}}))
    engine_args = ["parallel.engine=fsdp2"] if engine_name == "fsdp2" else [
        "parallel.engine=deepspeed", "parallel.zero_stage=3", f"parallel.deepspeed_config={release}"]
    cfg = load_config(None, ["run_dir=unused", f"model.dim={args.dim}", f"model.ffn_dim={args.dim * 8 // 3}",
                             f"model.n_layers={args.layers}", "model.n_heads=8", "model.vocab_size=512",
                             f"adapter.kind={kind}", "adapter.r=8", f"global_batch_size={args.nproc}",
                             "micro_batch_size=1", "parallel.param_dtype=bfloat16", *engine_args])
    info = init_distributed(cfg.parallel)
    engine = build_engine(cfg, info)
    model = build_model(cfg.model, device="meta")
    adapters.apply_adapters(model, cfg.adapter)
    engine.shard(model)
    materialize(model, info.device, cfg.seed, cfg.model.init_std)
    engine.setup(model, build_optimizer(model, cfg.optim))
    tokens = torch.randint(0, 512, (1, args.tokens + 1), generator=torch.Generator().manual_seed(0))
    growth = []
    for _ in range(3):  # the first forward also allocates once-only buffers: the last is reported
        before = rss_mb()
        with engine.autocast():
            loss = engine(tokens[:, :-1], targets=tokens[:, 1:])
            growth.append(rss_mb() - before)
        engine.backward(loss, last_micro_batch=True)
        engine.step()
    linear = sum(getattr(m.weight, "ds_numel", m.weight.numel()) for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name.startswith("layers"))
    (out / f"rank{rank}.json").write_text(json.dumps({"growth_mb": growth[-1], "linear_params": linear}))
    torch.distributed.barrier()
    os._exit(0)  # no gloo teardown (see megamora.distributed.exit_process)


def main() -> None:
    args = parse_args()
    # Every tensor of 64 KiB or more in its own mmap, returned to the OS when freed: the resident set
    # then follows the live tensors (glibc's default threshold grows up to 32 MiB after frees).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    port = 29641
    print(f"dim {args.dim}, {args.layers} layers, {args.tokens} tokens, bf16, {args.nproc} gloo ranks")
    print(f"{'engine':>6} {'adapter':>7} {'forward growth MB (per rank)':>30} {'linear weights bf16 MB: full':>29} "
          f"{'per rank':>9}")
    for kind in args.kinds.split(","):
        for engine_name in args.engines.split(","):
            out = Path(tempfile.mkdtemp(prefix="bench-zero-memory-"))
            port += 1
            mp.spawn(forward_growth, args=(args, engine_name, kind, port, out), nprocs=args.nproc, join=True)
            rows = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.nproc)]
            linear_mb = rows[0]["linear_params"] * 2 / 2**20
            growth = " ".join(f"{r['growth_mb']:.0f}" for r in rows)
            print(f"{engine_name:>6} {kind:>7} {growth:>30} {linear_mb:>29.0f} {linear_mb / args.nproc:>9.0f}")
            time.sleep(1)


if __name__ == "__main__":
    main()

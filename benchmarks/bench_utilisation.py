"""Achieved FLOP/s of our full-rank training step as a fraction of this machine's GEMM peak, and what
bounds it: the step's time split between matmuls and everything else.

    .venv/bin/python benchmarks/bench_utilisation.py                   # 20m, seq 256, batch 8, fp32 + bf16
    .venv/bin/python benchmarks/bench_utilisation.py --preset 60m      # the larger CPU-feasible size

Achieved FLOP/s = megamora.plan.flops_per_token(cfg) x batch x seq_len / the median step
time (forward, loss, backward, AdamW, zero_grad: bench_step.py's step, built the same way, median of
--rounds rounds of --steps steps). The peak it is divided by is measured in the same run, dtype and
thread count: the best of --gemm-reps square matmuls n x n x n (2 n^3 FLOPs; n = 2048 on CPU, 8192 on
CUDA). bf16 steps run under torch.autocast over fp32 weights and are compared with the bf16 GEMM. On
CUDA the bf16 line also gives the MFU against the datasheet dense bf16 peak of the device, when its
name is in megamora.metrics.PEAK_BF16_FLOPS.

Profile: torch.profiler over --profile-steps steps. On CPU, ops by self CPU time (the time on the
calling thread, intra-op threads included in the op's wall time); on CUDA, kernels by device time.
Grouped as matmul (aten::mm / addmm / bmm / matmul / linear and scaled-dot-product attention; on CUDA
GEMM and attention kernels) and the rest, each with its share of the profiled wall time; what is left
is Python, dispatch gaps and the profiler's own overhead (on CUDA: idle device time). On CPU the
"everything else" group also says how much of it runs inside the optimizer (AdamW step, zero_grad).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from bench_step import (  # noqa: E402
    DTYPES, Contender, add_common_args, batch_for, bench_config, build_ours, setup, sync, time_contenders, train_step,
)

from megamora.metrics import peak_flops  # noqa: E402
from megamora.plan import flops_per_token  # noqa: E402

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_addmm_activation"}
MATMUL_WORDS = ("scaled_dot_product", "flash_attention", "efficient_attention",  # attention ops
                "gemm", "cutlass", "xmma", "nvjet", "cublas", "fmha", "flash")  # CUDA kernel names


def is_matmul(name: str) -> bool:
    low = name.lower()
    return name in MATMUL_OPS or any(word in low for word in MATMUL_WORDS)


def gemm_peak(n: int, dtype: torch.dtype, device: torch.device, reps: int) -> float:
    """Best FLOP/s of `reps` n x n x n matmuls (after one untimed)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def device_peak(device: torch.device) -> tuple[str, float] | None:
    """(name, datasheet dense bf16 peak) of a known GPU (megamora.metrics, as the trainer's MFU)."""
    peak = peak_flops(device)
    return (torch.cuda.get_device_name(device), peak) if peak else None


def optimizer_time(events) -> float:
    """Seconds of self CPU time of the non-matmul ops run inside Optimizer.* (step, zero_grad)."""
    total = 0.0
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or is_matmul(e.name):
            continue
        node = e
        while node is not None and not node.name.startswith("Optimizer."):
            node = node.cpu_parent
        if node is not None:
            total += e.self_cpu_time_total * 1e-6
    return total


def profile_steps(c: Contender, batch: torch.Tensor, dtype: torch.dtype, steps: int, top: int) -> None:
    cuda = batch.device.type == "cuda"
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        sync(batch.device)
        start = time.perf_counter()
        for _ in range(steps):
            train_step(c, x, y, dtype)
        sync(batch.device)
        wall = time.perf_counter() - start
    rows = []  # (name, calls, self seconds)
    for evt in prof.key_averages():
        if cuda:  # kernels only: an op's device time is its kernels' time, counted once
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(evt, "self_device_time_total", None)
            us = evt.self_cuda_time_total if us is None else us
        else:
            us = evt.self_cpu_time_total
        if us > 0:
            rows.append((evt.key, evt.count, us * 1e-6))
    rows.sort(key=lambda r: -r[2])
    matmul = sum(s for n, _, s in rows if is_matmul(n))
    other = sum(s for n, _, s in rows if not is_matmul(n))
    kind = "device time of kernels" if cuda else "self CPU time of ops"
    print(f"  profile: {steps} steps, {wall / steps * 1e3:.1f} ms/step under the profiler; {kind}, share of wall time")
    print(f"    {'matmul (GEMM + attention)':40} {matmul / steps * 1e3:>9.2f} ms/step {matmul / wall:>7.1%}")
    print(f"    {'everything else':40} {other / steps * 1e3:>9.2f} ms/step {other / wall:>7.1%}")
    if not cuda:
        opt = optimizer_time(prof.events())
        print(f"    {'  of which AdamW step + zero_grad':40} {opt / steps * 1e3:>9.2f} ms/step {opt / wall:>7.1%}")
    rest = "outside kernels (idle device)" if cuda else "outside ops (Python, dispatch, profiler)"
    print(f"    {rest:40} {max(0.0, wall - matmul - other) / steps * 1e3:>9.2f} ms/step "
          f"{max(0.0, 1 - (matmul + other) / wall):>7.1%}")
    print(f"  top {top} by self time:")
    for name, calls, s in rows[:top]:
        label = name if len(name) <= 60 else name[:57] + "..."
        print(f"    {label:60} {'matmul' if is_matmul(name) else '':6} {calls / steps:>6.0f}/step "
              f"{s / steps * 1e3:>9.2f} ms/step {s / wall:>7.1%}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, rounds=5, steps=3)
    p.add_argument("--gemm-size", type=int, default=0, help="n of the n^3 peak GEMM (0: 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--gemm-reps", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=2, help="0: no profile")
    p.add_argument("--top", type=int, default=12, help="ops listed from the profile")
    args = p.parse_args(argv)
    device = setup(args)
    n = args.gemm_size or (8192 if device.type == "cuda" else 2048)
    cfg = bench_config(args)
    m = cfg.model
    fpt = flops_per_token(cfg)
    tokens = args.batch * args.seq_len
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; model {args.preset} full rank (dim {m.dim}, "
          f"ffn {m.ffn_dim}, {m.n_layers} layers, {m.n_heads} heads, vocab {m.vocab_size}); batch {args.batch} x "
          f"{args.seq_len} = {tokens} tokens/step; {fpt / 1e6:.1f} MFLOP/token (flops_per_token)")
    c = build_ours(cfg, device, args.seed, "ours-full")
    batch = batch_for(cfg, args.batch, device, args.seed)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        peak = gemm_peak(n, dtype, device, args.gemm_reps)
        times = time_contenders([c], batch, dtype, args.rounds, args.steps, args.warmup)[c.name]
        step = statistics.median(times)
        achieved = fpt * tokens / step
        print(f"\n{dtype_name}: {step * 1e3:.1f} ms/step (median of {args.rounds} rounds x {args.steps} steps), "
              f"{tokens / step:.0f} tokens/s")
        print(f"  achieved {achieved / 1e9:.1f} GFLOP/s; GEMM peak {n}^3 {dtype_name} (best of {args.gemm_reps}) "
              f"{peak / 1e9:.1f} GFLOP/s; utilisation {achieved / peak:.1%}")
        known = device_peak(device)
        if known and dtype == torch.bfloat16:
            print(f"  MFU {achieved / known[1]:.1%} of the {known[0]} datasheet bf16 peak {known[1] / 1e12:.0f} TFLOP/s")
        if args.profile_steps:
            profile_steps(c, batch, dtype, args.profile_steps, args.top)


if __name__ == "__main__":
    main()

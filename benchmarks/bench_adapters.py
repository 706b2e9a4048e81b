"""Speed and memory of one adapted layer: MoRA against LoRA at the same trainable-parameter budget.

    python benchmarks/bench_adapters.py                    # 250M shapes, 4096 tokens, fp32 + bf16
    python benchmarks/bench_adapters.py --dtypes bfloat16 --cases 128:1 --rounds 20

Time: forward + backward of the whole layer (frozen base GEMM included, input gradient computed, as
inside a network), LoRA and MoRA measured alternately in the same process; the table shows the best
of `--rounds` runs (robust to other load on the machine) and the ratio MoRA / LoRA of those bests,
plus the median of the per-round ratios.

Memory: what the layer keeps alive for the backward pass, i.e. the bytes of the distinct tensor
storages that autograd saves (via torch.autograd.graph.saved_tensors_hooks), not counting
parameters and buffers (they exist anyway) but counting the layer input when it is saved (the
frozen base alone would not keep it). On CUDA the peak allocated bytes above the inputs are shown too.

FLOP M/L is the ratio of GEMM FLOPs (base forward + input gradient, adapter forward + both
gradients): the floor the time ratio cannot beat without faster GEMMs. The "block" rows weight the
shapes as one 250M block does (q, k, v, o: 768x768; gate, up: 768x2560; down: 2560x768).

By default glibc is told to keep freed memory (mallopt): otherwise every large temporary is a fresh
mmap and page-faults on first touch, a CPU-allocator artefact that CUDA's caching allocator does
not have and that lands on whichever op touches a buffer first (--no-malloc-cache to keep it).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch
from torch import nn

from megamora.adapters import LoRALinear, MoRALinear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(kind: str, in_f: int, out_f: int, r: int, mora_type: str, dtype, device) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=False, device=device)
    if kind == "lora":
        layer = LoRALinear(base, r=r, alpha=2 * r, dropout=0.0)
    else:
        layer = MoRALinear(base, r=r, mora_type=mora_type, dropout=0.0)
    layer = layer.to(device=device, dtype=dtype)
    with torch.no_grad():  # non-zero adapters, as during training
        for name, p in layer.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return layer


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_time(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> float:
    sync(x.device)
    start = time.perf_counter()
    layer(x).backward(g)
    sync(x.device)
    elapsed = time.perf_counter() - start
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    return elapsed


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd saves for backward, parameters and buffers excluded."""
    owned = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.backward(torch.zeros_like(y))
    x.grad = None
    return sum(seen.values())


def cuda_peak_bytes(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    layer(x).backward(g)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    return peak


def bench_case(in_f, out_f, r, mora_type, dtype, device, tokens, rounds, warmup) -> dict:
    layers = {k: build(k, in_f, out_f, r, mora_type, dtype, device) for k in ("lora", "mora")}
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, generator=gen).requires_grad_()
    g = torch.randn(tokens, out_f, device=device, dtype=dtype, generator=gen)
    for _ in range(warmup):
        for layer in layers.values():
            step_time(layer, x, g)
    times: dict[str, list[float]] = {"lora": [], "mora": []}
    for i in range(rounds):
        order = ("lora", "mora") if i % 2 == 0 else ("mora", "lora")
        for k in order:
            times[k].append(step_time(layers[k], x, g))
    res = {
        "r_hat": layers["mora"].r_hat,
        "flops": gemm_flops(in_f, out_f, r, layers["mora"]),
        "params": {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in layers.items()},
        "time": {k: min(v) for k, v in times.items()},
        "pair_ratio": statistics.median(m / lo for m, lo in zip(times["mora"], times["lora"])),
        "saved": {k: saved_bytes(m, x) for k, m in layers.items()},
    }
    if device.type == "cuda":
        res["peak"] = {k: cuda_peak_bytes(m, x, g) for k, m in layers.items()}
    return res


def gemm_flops(in_f: int, out_f: int, r: int, layer: nn.Module) -> dict[str, float]:
    """Per token, forward + backward (no gradient for the frozen base weight)."""
    base = 2 * 2 * in_f * out_f
    lora = 3 * 2 * r * (in_f + out_f)
    geo = layer.geometry
    mora = 3 * 2 * geo.chunks * layer.r_hat**2
    return {"lora": base + lora, "mora": base + mora}


def keep_freed_memory() -> bool:
    """glibc: serve large blocks from the heap and never trim it (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, 1 << 30))
    except (OSError, AttributeError):
        return False


BLOCK = {"768x768": 4, "768x2560": 2, "2560x768": 1}  # adapted linears of one 250M block


def parse_case(text: str) -> tuple[int, str]:
    r, _, t = text.partition(":")
    return int(r), t or "1"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(BLOCK), help="IN x OUT")
    p.add_argument("--cases", nargs="+", default=["128:1", "256:1", "8:6"], help="r:mora_type")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    p.add_argument("--no-malloc-cache", action="store_true", help="leave glibc's malloc settings alone")
    args = p.parse_args(argv)
    cached = False if args.no_malloc_cache else keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, tokens {args.tokens}, torch {torch.__version__}, "
          f"best of {args.rounds} rounds, malloc cache {'on' if cached else 'off'}")
    head = (f"{'dtype':9} {'shape':10} {'r':>4} {'type':>4} {'r_hat':>5} {'params M/L':>10} {'FLOP M/L':>8} "
            f"{'LoRA ms':>8} {'MoRA ms':>8} {'time M/L':>8} {'median':>7} {'LoRA MiB':>8} {'MoRA MiB':>8} {'mem M/L':>7}")
    print(head)
    print("-" * len(head))
    for dtype_name in args.dtypes:
        for case in args.cases:
            r, t = parse_case(case)
            block = {"lora": 0.0, "mora": 0.0}
            for shape in args.shapes:
                in_f, out_f = (int(v) for v in shape.lower().split("x"))
                res = bench_case(in_f, out_f, r, t, DTYPES[dtype_name], device, args.tokens, args.rounds, args.warmup)
                tl, tm = res["time"]["lora"], res["time"]["mora"]
                ml, mm = res["saved"]["lora"], res["saved"]["mora"]
                for k in block:
                    block[k] += BLOCK.get(shape, 0) * res["time"][k]
                line = (f"{dtype_name:9} {shape:10} {r:>4} {t:>4} {res['r_hat']:>5} "
                        f"{res['params']['mora'] / res['params']['lora']:>10.4f} "
                        f"{res['flops']['mora'] / res['flops']['lora']:>8.3f} {tl * 1e3:>8.1f} {tm * 1e3:>8.1f} "
                        f"{tm / tl:>8.3f} {res['pair_ratio']:>7.3f} {ml / 2**20:>8.1f} {mm / 2**20:>8.1f} {mm / ml:>7.3f}")
                if "peak" in res:
                    line += f"  peak M/L {res['peak']['mora'] / res['peak']['lora']:.3f}"
                print(line, flush=True)
            if block["lora"] and set(BLOCK) <= set(args.shapes):
                print(f"{dtype_name:9} {'block':10} {r:>4} {t:>4} {'':>5} {'':>10} {'':>8} {block['lora'] * 1e3:>8.1f} "
                      f"{block['mora'] * 1e3:>8.1f} {block['mora'] / block['lora']:>8.3f}", flush=True)


if __name__ == "__main__":
    main()

"""Step time and optimizer-state memory of GaLore / APOLLO (megamora.optimizers) against torch's fused
AdamW (full rank) and against the reference packages' optimizers (galore-torch GaLoreAdamW,
apollo-torch APOLLOAdamW), on every parameter of a model preset; then the time of GaLore's
projection refresh (an SVD per block matrix) at a larger preset and what it costs per step.

    python benchmarks/bench_optimizers.py                                  # 20m and 60m, fp32 (+ bf16 if the CPU has it)
    python benchmarks/bench_optimizers.py --presets 20m --dtypes float32 --steps 2 --svd-preset 130m

Time: optimizer.step() alone, on synthetic gradients (fixed random values) of the preset's parameters,
the contenders taking turns within each round; the table shows the best round (robust to other load on
the machine) and each contender's ratio to torch AdamW and to its reference, measured in the same run.
Steps between refreshes (update_proj_gap larger than the steps timed; the first step, which draws the
first projection, is not timed): the refresh is measured on its own below.

Memory: the bytes of the distinct storages the optimizer state holds (step counters left out), so a
tensor that is a slice of a larger one counts the whole storage it keeps alive (the reference GaLore's
projector is such a slice of U or Vh).
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

from megamora.config import MODEL_PRESETS, ModelConfig
from megamora.model import build_model
from megamora.optimizers.apollo import ApolloAdamW
from megamora.optimizers.galore import GaLoreAdamW
from megamora.optimizers.lowrank import is_projected, projection_side

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RANKS = {"9m": 32, "20m": 64, "35m": 96, "60m": 128, "130m": 256, "250m": 256, "350m": 256, "1b": 512}
GAP = 10_000  # no refresh inside the timed steps


def parameters(preset: str, dtype: torch.dtype, vocab: int) -> list[tuple[str, torch.nn.Parameter]]:
    dim, ffn, layers, heads = MODEL_PRESETS[preset]
    meta = build_model(ModelConfig(dim=dim, ffn_dim=ffn, n_layers=layers, n_heads=heads, vocab_size=vocab), "meta")
    g = torch.Generator().manual_seed(0)
    out = []
    for name, p in meta.named_parameters():
        q = torch.nn.Parameter((torch.randn(p.shape, generator=g) * 0.02).to(dtype))
        q.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(dtype)
        out.append((name, q))
    return out


def groups(named, rank: int, extra: dict) -> list[dict]:
    projected = [p for n, p in named if is_projected(n, p)]
    rest = [p for n, p in named if not is_projected(n, p)]
    return [{"params": rest}, {"params": projected, "rank": rank, "update_proj_gap": GAP, "scale": 0.25,
                               "proj_type": "std", **extra}]


def contenders(make, rank: int, have_refs: bool) -> dict[str, torch.optim.Optimizer]:
    """Each contender over its own copy of the parameters (`make()`: fresh, identical ones)."""
    apollo = dict(proj="random", scale_type="channel", scale_front=False, norm_growth_limiter=True)
    out = {
        "adamw (torch fused)": torch.optim.AdamW([p for _, p in make()], lr=1e-3, fused=True),
        "galore (ours)": GaLoreAdamW(groups(make(), rank, {}), lr=1e-3),
        "apollo (ours)": ApolloAdamW(groups(make(), rank, apollo), lr=1e-3),
    }
    if have_refs:
        import apollo_torch
        import galore_torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["galore (galore-torch)"] = galore_torch.GaLoreAdamW(groups(make(), rank, {}), lr=1e-3,
                                                                    no_deprecation_warning=True)
            out["apollo (apollo-torch)"] = apollo_torch.APOLLOAdamW(groups(make(), rank, apollo), lr=1e-3)
    return out


def state_bytes(opt: torch.optim.Optimizer) -> int:
    storages = {}
    for state in opt.state.values():
        for key, value in state.items():
            tensors = [value] if torch.is_tensor(value) else [v for v in vars(value).values() if torch.is_tensor(v)] \
                if hasattr(value, "__dict__") else []
            for t in tensors:
                if key != "step":
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def bench_preset(preset: str, dtype_name: str, steps: int, rounds: int, vocab: int, have_refs: bool) -> None:
    rank = RANKS[preset]
    opts = contenders(lambda: parameters(preset, DTYPES[dtype_name], vocab), rank, have_refs)
    for opt in opts.values():  # the first step draws the projections and allocates the state
        opt.step()
    best = {name: math.inf for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    adamw = "adamw (torch fused)"
    print(f"\n{preset} ({dtype_name}, rank {rank}, vocab {vocab}): optimizer.step() best of {rounds} x {steps}")
    print(f"{'optimizer':<24}{'ms/step':>9}{'x adamw':>9}{'x ref':>8}{'state MiB':>11}{'x adamw':>9}{'x ref':>8}")
    mem = {name: state_bytes(opt) for name, opt in opts.items()}
    for name in opts:
        ref = name.split(" ")[0] + (" (galore-torch)" if name.startswith("galore") else " (apollo-torch)")
        t_ref = f"{best[name] / best[ref]:8.2f}" if ref in best and ref != name else f"{'':>8}"
        m_ref = f"{mem[name] / mem[ref]:8.2f}" if ref in mem and ref != name else f"{'':>8}"
        print(f"{name:<24}{best[name] * 1e3:9.1f}{best[name] / best[adamw]:9.2f}{t_ref}"
              f"{mem[name] / 2**20:11.1f}{mem[name] / mem[adamw]:9.2f}{m_ref}")


def bench_svd(preset: str, gap: int, rounds: int) -> None:
    """The SVD of one gradient per distinct block-matrix shape, summed over the model's block matrices."""
    dim, ffn, layers, heads = MODEL_PRESETS[preset]
    meta = build_model(ModelConfig(dim=dim, ffn_dim=ffn, n_layers=layers, n_heads=heads, vocab_size=1000), "meta")
    shapes: dict[tuple[int, int], int] = {}
    for name, p in meta.named_parameters():
        if is_projected(name, p):
            shapes[tuple(p.shape)] = shapes.get(tuple(p.shape), 0) + 1
    total = 0.0
    print(f"\nprojection refresh at {preset} (fp32 SVD of the gradient, full_matrices=False, best of {rounds}):")
    for shape, count in shapes.items():
        g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        best = math.inf
        for _ in range(rounds):
            start = time.perf_counter()
            torch.linalg.svd(g, full_matrices=False)
            best = min(best, time.perf_counter() - start)
        side = projection_side("std", shape)
        print(f"  {shape[0]}x{shape[1]} ({side} side) x {count}: {best * 1e3:9.1f} ms each")
        total += best * count
    print(f"  one refresh of all {sum(shapes.values())} matrices: {total:.2f} s on one process "
          f"(FSDP2 spreads the SVDs over the ranks); per step at update_proj_gap {gap}: {total / gap * 1e3:.1f} ms")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["20m", "60m"], choices=sorted(RANKS))
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPES),
                        help="default: float32, and bfloat16 where the CPU has avx512_bf16")
    parser.add_argument("--vocab", type=int, default=32100)
    parser.add_argument("--steps", type=int, default=3, help="steps timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--svd-preset", default="1b", choices=sorted(RANKS))
    parser.add_argument("--svd-rounds", type=int, default=1)
    parser.add_argument("--gap", type=int, default=200, help="update_proj_gap the refresh cost is spread over")
    parser.add_argument("--no-reference", action="store_true", help="skip galore-torch / apollo-torch")
    args = parser.parse_args(argv)
    dtypes = args.dtypes
    if dtypes is None:
        with open("/proc/cpuinfo") as f:
            dtypes = ["float32", "bfloat16"] if "avx512_bf16" in f.read() else ["float32"]
    have_refs = not args.no_reference
    if have_refs:
        try:
            import apollo_torch  # noqa: F401
            import galore_torch  # noqa: F401
        except ImportError as e:
            print(f"reference packages missing ({e}): pip install galore-torch apollo-torch; comparing with AdamW only")
            have_refs = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for preset in args.presets:
        for dtype in dtypes:
            bench_preset(preset, dtype, args.steps, args.rounds, args.vocab, have_refs)
    bench_svd(args.svd_preset, args.gap, args.svd_rounds)


if __name__ == "__main__":
    main()

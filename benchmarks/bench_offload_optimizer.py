"""ZeRO-Offload's CPU optimizer: torch's fused AdamW (what the engine passes to DeepSpeed) against
DeepSpeedCPUAdam (what DeepSpeed asks for), on speed, agreement and exact resume.

    .venv/bin/python benchmarks/bench_offload_optimizer.py                  # 2^24 fp32 elements, preset 9m
    .venv/bin/python benchmarks/bench_offload_optimizer.py --numel 67108864 --preset 20m

1. The optimizer step alone on one flat fp32 partition (what ZeRO-1/2/3 hand the CPU optimizer),
   contenders interleaved ABBA over --rounds rounds; median ms per step.
2. Agreement after --agree-steps steps from the same weights and gradients: the largest difference of the
   weights relative to the largest update (max |p_ds - p_torch| / max |p_torch - p_0|).
3. Exact resume: --agree-steps steps in one go against half of them, a fresh optimizer loaded from the
   state_dict, and the other half; bitwise or not. (DeepSpeedCPUAdam keeps beta^t as a running
   float product in its C++ object, outside the state_dict; a reloaded one recomputes it with pow.)
4. One whole training step (forward, backward, offloaded ZeRO-2 step) of the preset in a process
   group of one, each optimizer over the project's parameter groups; median ms per step.

DeepSpeedCPUAdam is JIT-built on first use (a C++ compiler; cached in TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import time

import torch

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)  # optim's defaults, lr and decay set


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=1 << 24, help="elements of the flat partition (parts 1-3)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per round (part 1)")
    p.add_argument("--agree-steps", type=int, default=60, help="steps of the agreement and resume runs (parts 2, 3)")
    p.add_argument("--agree-numel", type=int, default=1 << 16, help="elements of the agreement and resume runs")
    p.add_argument("--preset", default="9m", help="model.preset of the whole-step timing (part 4)")
    p.add_argument("--train-steps", type=int, default=6, help="timed training steps per optimizer (part 4)")
    return p.parse_args()


def ds_cpu_adam(params):
    with contextlib.redirect_stdout(io.StringIO()):  # its build log and "Adam Optimizer #0 is created"
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **HYPER)


OPTIMIZERS = {
    "torch-fused": lambda params: torch.optim.AdamW(params, fused=True, **HYPER),
    "ds-cpu-adam": ds_cpu_adam,
}


def run_steps(opt, param, grads, first: int, count: int) -> None:
    for i in range(first, first + count):
        param.grad = grads[i % len(grads)]
        opt.step()


def optimizer_only(args, start: torch.Tensor, grads: list[torch.Tensor]) -> None:
    times: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    built = {}
    for name, make in OPTIMIZERS.items():
        p = torch.nn.Parameter(start.clone())
        built[name] = (make([p]), p)
        run_steps(*built[name], grads, 0, 1)  # warm-up: state allocated
    order = list(OPTIMIZERS)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            opt, p = built[name]
            t0 = time.perf_counter()
            run_steps(opt, p, grads, 0, args.steps)
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    ref = statistics.median(times["torch-fused"])
    print(f"1. optimizer step, flat fp32 partition of {args.numel} elements, {torch.get_num_threads()} threads")
    for name, ts in times.items():
        print(f"   {name:12s} {statistics.median(ts):8.1f} ms/step   x{statistics.median(ts) / ref:.2f} of torch-fused")


def agreement_and_resume(args, start: torch.Tensor, grads: list[torch.Tensor]) -> None:
    finals = {}
    print(f"2./3. {start.numel()} elements, {args.agree_steps} steps from the same weights and gradients")
    for name, make in OPTIMIZERS.items():
        p = torch.nn.Parameter(start.clone())
        opt = make([p])
        run_steps(opt, p, grads, 0, args.agree_steps)
        finals[name] = p.detach().clone()

        half = args.agree_steps // 2
        q = torch.nn.Parameter(start.clone())
        first = make([q])
        run_steps(first, q, grads, 0, half)
        state = first.state_dict()
        del first
        resumed = make([q])
        resumed.load_state_dict(state)
        run_steps(resumed, q, grads, half, args.agree_steps - half)
        exact = torch.equal(q.detach(), finals[name])
        print(f"   {name:12s} resumed after step {half}: {'bitwise equal' if exact else 'DIFFERS'} "
              f"(max |diff| {float((q.detach() - finals[name]).abs().max()):.3g})")
    ref = finals["torch-fused"]
    update = float((ref - start).abs().max())
    for name, final in finals.items():
        if name != "torch-fused":
            diff = float((final - ref).abs().max())
            print(f"   {name:12s} vs torch-fused: max |diff| {diff:.3g} = {diff / update:.2e} of the largest update "
                  f"({update:.3g}); {int((final != ref).sum())} of {ref.numel()} elements differ")


def whole_step(args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    from megamora.config import load_config
    from megamora.engines.deepspeed import deepspeed_config, require_deepspeed
    from megamora.model import build_model, materialize
    from megamora.optim import build_optimizer

    deepspeed = require_deepspeed()
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    cfg = load_config(None, ["run_dir=unused", f"model.preset={args.preset}", "global_batch_size=4",
                             "micro_batch_size=4", "parallel.engine=deepspeed", "parallel.zero_stage=2"])
    ds_config = deepspeed_config(cfg, 1)
    ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 257), generator=torch.Generator().manual_seed(0))
    print(f"4. whole training step, preset {args.preset}, batch 4 x 256, ZeRO-2 + offload_optimizer, one process")
    results = {}
    for name in OPTIMIZERS:
        model = build_model(cfg.model, device="meta")
        materialize(model, torch.device("cpu"), 0, cfg.model.init_std)
        groups = build_optimizer(model, cfg.optim).param_groups
        optimizer = torch.optim.AdamW(groups, fused=True, **HYPER) if name == "torch-fused" else ds_cpu_adam(groups)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
        times = []
        for i in range(args.train_steps + 1):
            t0 = time.perf_counter()
            engine.backward(engine(tokens[:, :-1], targets=tokens[:, 1:]))
            engine.step()
            times.append(time.perf_counter() - t0)
        results[name] = statistics.median(times[1:]) * 1e3
        engine.destroy()
    for name, ms in results.items():
        print(f"   {name:12s} {ms:8.1f} ms/step   x{ms / results['torch-fused']:.2f} of torch-fused")


def main() -> None:
    args = parse_args()
    g = torch.Generator().manual_seed(0)
    start = torch.randn(args.numel, generator=g) * 0.02
    grads = [torch.randn(args.numel, generator=g) * 1e-3 for _ in range(3)]
    optimizer_only(args, start, grads)
    agreement_and_resume(args, start[:args.agree_numel], [g[:args.agree_numel] for g in grads])
    del start, grads
    whole_step(args)


if __name__ == "__main__":
    main()

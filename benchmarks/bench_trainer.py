"""Trainer overhead: Trainer.train_step against a bare forward/backward/AdamW loop on the same model
and batch (one process, no data pipeline: both read the same fixed batch).

    .venv/bin/python benchmarks/bench_trainer.py --preset 9m --seq-len 128 --micro-batch 4 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megamora.config import load_config
from megamora.data import ValidationShare
from megamora.distributed import DistInfo
from megamora.engines import build_engine
from megamora.model import build_model, init_weights, materialize
from megamora.optim import build_optimizer
from megamora.train import Trainer


class FixedBatch:
    def __init__(self, batch: torch.Tensor):
        self.batch = batch

    def next_batch(self, stream_id: int) -> torch.Tensor:
        return self.batch

    def stats(self) -> dict:
        return {}


class NoMetrics:
    def log(self, *args, **kwargs) -> None:
        pass


def bare_step(model, optimizer, batch) -> None:
    model(batch[:, :-1], targets=batch[:, 1:]).backward()  # the loss the Trainer computes
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="9m")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cfg = load_config(None, ["run_dir=unused", f"model.preset={args.preset}", f"data.seq_len={args.seq_len}",
                             f"micro_batch_size={args.micro_batch}", f"global_batch_size={args.micro_batch}",
                             "optim.warmup_steps=1", "steps=1000000"])
    torch.manual_seed(0)
    batch = torch.randint(0, cfg.model.vocab_size, (args.micro_batch, args.seq_len + 1))

    def fresh():
        model = build_model(cfg.model, device="cpu")
        init_weights(model, 0, cfg.model.init_std)
        return model, build_optimizer(model, cfg.optim)

    bare_model, bare_opt = fresh()
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    engine = build_engine(cfg, dist)  # FSDP2's engine on one process: the plain model, as a run has it
    model = build_model(cfg.model, device="meta")
    engine.shard(model)
    materialize(model, dist.device, 0, cfg.model.init_std)
    engine.setup(model, build_optimizer(model, cfg.optim))
    trainer = Trainer(cfg, engine, FixedBatch(batch), ValidationShare(batch[:1], [0]), dist, NoMetrics(), 0.0, run_dir=None)

    def trainer_step():
        trainer.set_lr()
        trainer.train_step()

    timings = {"bare": [], "trainer": []}
    for _ in range(2):  # warm-up
        bare_step(bare_model, bare_opt, batch)
        trainer_step()
    for _ in range(args.rounds):  # interleaved rounds so drift hits both equally
        for name, fn in (("bare", lambda: bare_step(bare_model, bare_opt, batch)), ("trainer", trainer_step)):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            timings[name].append((time.perf_counter() - t0) / args.steps)
    bare, ours = statistics.median(timings["bare"]), statistics.median(timings["trainer"])
    print(f"model {args.preset}, batch {args.micro_batch}x{args.seq_len}, {torch.get_num_threads()} threads")
    print(f"bare loop     {bare * 1e3:8.1f} ms/step")
    print(f"Trainer       {ours * 1e3:8.1f} ms/step")
    print(f"ratio Trainer/bare = {ours / bare:.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()

"""FSDP2 with gradient accumulation (issue 16 item 8): between micro-batches every rank holds the
unsharded gradients, reduce_dtype bytes per trainable parameter, and the plan counts exactly that;
`parallel.reduce_scatter_every_micro_batch` shards them every micro-batch and trains the same."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from megamora.adapters import apply_adapters
from megamora.config import load_config
from megamora.distributed import DistInfo
from megamora.engines.fsdp2 import FSDP2Engine
from megamora.model import build_model, materialize
from megamora.optim import build_optimizer
from megamora.plan import make_plan
from spawn_ranks import spawn_ranks
from test_train import launch, losses, tiny_overrides

WORLD = 2
# micro 2 x world 2 x accumulation 2
TINY = ["run_dir=unused", "model.dim=32", "model.ffn_dim=64", "model.n_layers=2", "model.n_heads=2",
        "model.vocab_size=97", "data.seq_len=16", "micro_batch_size=2", "global_batch_size=8"]
CASES = [  # the adapter run has frozen base weights: only trainable parameters get gradients
    ["adapter.kind=mora", "adapter.r=4"],
    ["parallel.param_dtype=bfloat16"],  # bf16 gradients, accumulated in the fp32 reduce_dtype
    ["parallel.param_dtype=bfloat16", "parallel.reduce_dtype=bfloat16"],
    ["adapter.kind=mora", "adapter.r=4", "parallel.reduce_scatter_every_micro_batch=true"],
]


def unsharded_grad_bytes(model) -> int:
    """Bytes of the gradients FSDP2 keeps on its unsharded parameters between micro-batches
    (FSDP2 internals: there is no public accessor)."""
    total = 0
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        for fsdp_param in group.fsdp_params if group else ():
            grad = fsdp_param.unsharded_accumulated_grad
            if grad is None and hasattr(fsdp_param, "_unsharded_param"):
                grad = fsdp_param._unsharded_param.grad
            total += 0 if grad is None else grad.numel() * grad.element_size()
    return total


def sharded_grad_bytes(model) -> int:
    return sum(p.grad.to_local().numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def micro_batch(engine, tokens, last: bool) -> None:
    engine.backward(engine(tokens, targets=tokens), last_micro_batch=last)


def worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)
    try:
        tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(rank))
        for extra in CASES:
            cfg = load_config(None, TINY + extra)
            plan = make_plan(cfg, world_size=WORLD, distributed=True)
            engine = FSDP2Engine(cfg, DistInfo(rank, WORLD, rank, torch.device("cpu")))
            model = build_model(cfg.model, device="meta")
            apply_adapters(model, cfg.adapter)
            engine.shard(model)
            materialize(model, torch.device("cpu"), seed=0, std=0.02)
            engine.setup(model, build_optimizer(model, cfg.optim))

            micro_batch(engine, tokens, last=False)
            assert unsharded_grad_bytes(model) == plan.memory.grads_unsharded, extra
            every = cfg.parallel.reduce_scatter_every_micro_batch
            assert (plan.memory.grads_unsharded == 0) == every, extra
            micro_batch(engine, tokens, last=True)
            assert unsharded_grad_bytes(model) == 0, extra
            # the sharded fp32 gradients: the plan's 4 T / W per rank, W ranks together hold 4 T
            mine = torch.tensor([sharded_grad_bytes(model)])
            dist.all_reduce(mine)
            assert mine.item() == 4 * plan.params.trainable == WORLD * plan.memory.grads, extra
    finally:
        dist.destroy_process_group()


def test_plan_counts_the_unsharded_gradients_fsdp2_holds(tmp_path):
    spawn_ranks(worker, str(tmp_path), nprocs=WORLD)


def test_reduce_scatter_every_micro_batch_trains_the_same(shared_data, tmp_path):
    extra = ["micro_batch_size=1", "eval_every=0", "save_every=0"]  # 2 ranks x accumulation 2
    launch(tiny_overrides(shared_data, tmp_path / "last", *extra), nproc=2)
    launch(tiny_overrides(shared_data, tmp_path / "every", *extra, "parallel.reduce_scatter_every_micro_batch=true"),
           nproc=2)
    last, every = losses(tmp_path / "last"), losses(tmp_path / "every")
    assert sorted(last) == sorted(every) == list(range(1, 7))
    for step in last:  # the rank-parity tolerance: only the order of the gradient sums differs
        assert every[step] == pytest.approx(last[step], rel=1e-5, abs=1e-6), step

"""GaLore and APOLLO on 2 FSDP2 gloo ranks equal one process at every step (issue 18): the
gradient's projection on row shards, the SVD of the gathered gradient computed on one rank and
broadcast, APOLLO's random projections drawn alike on every rank, the state on shards where the
algebra allows (right side: moments row-sharded; left side: projector row-sharded). End to end:
a run resumes bitwise across a projection refresh, and a 2-rank checkpoint resumes on 1 process.

Tolerance between world sizes: weights rel 1e-5, abs 1e-5 (a thousandth of one step's change at
lr 1e-2: only the order of the gradient sums differs, which Adam's g / (|g| + eps) amplifies where a
gradient is near 0), losses rel 1e-5 as in tests/test_train.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megamora.config import load_config
from megamora.distributed import DistInfo
from megamora.engines.fsdp2 import FSDP2Engine
from megamora.model import build_model, materialize
from megamora.optim import build_optimizer
from spawn_ranks import spawn_ranks
from test_train import killed_copy, last_pass, launch, launch_together, losses, run_in_process, tiny_overrides

WORLD, STEPS = 2, 5
# ffn 49: gate / up are 49 x 32 (right side, 25 + 24 rows: uneven shards), down 32 x 49 (left side)
TINY = ["run_dir=unused", "model.dim=32", "model.ffn_dim=49", "model.n_layers=2", "model.n_heads=2",
        "model.vocab_size=97", "micro_batch_size=2", "global_batch_size=4", "optim.lr=1e-2", "optim.galore.rank=4", "optim.galore.update_proj_gap=2",
        "optim.apollo.rank=4", "optim.apollo.update_proj_gap=2"]
CASES = [["optim.name=galore_adamw"], ["optim.name=apollo_adamw"],
         ["optim.name=apollo_adamw", "optim.apollo.scale_type=tensor", "optim.weight_decay=0.1"]]


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(100 * step + rank))


def worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)
    try:
        for extra in CASES:
            cfg = load_config(None, TINY + extra)
            engine = FSDP2Engine(cfg, DistInfo(rank, WORLD, rank, torch.device("cpu")))
            sharded = build_model(cfg.model, device="meta")
            engine.shard(sharded)
            materialize(sharded, torch.device("cpu"), seed=0, std=0.02)
            engine.setup(sharded, build_optimizer(sharded, cfg.optim, seed=3))
            plain = build_model(cfg.model, device="meta")
            materialize(plain, torch.device("cpu"), seed=0, std=0.02)
            opt = build_optimizer(plain, cfg.optim, seed=3)
            for step in range(STEPS):
                engine.backward(engine(batch(step, rank), targets=batch(step, rank)), last_micro_batch=True)
                engine.optimizer.step()
                engine.optimizer.zero_grad(set_to_none=True)
                # one process: the mean loss over both ranks' batches gives the ranks' mean gradient
                both = torch.cat([batch(step, r) for r in range(WORLD)])
                plain(both, targets=both).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                for (name, p), q in zip(sharded.named_parameters(), plain.parameters()):
                    torch.testing.assert_close(p.full_tensor(), q, rtol=1e-5, atol=1e-5, msg=lambda m: f"{extra} {step} {name}: {m}")
            state = {n: engine.optimizer.state[p] for n, p in sharded.named_parameters()}
            up, down = state["layers.0.mlp.up_proj.weight"], state["layers.0.mlp.down_proj.weight"]
            assert isinstance(up["exp_avg"], DTensor) and up["exp_avg"].shape == (49, 4)  # row shards
            assert not isinstance(up["proj"], DTensor)  # Q: 4 x 32, the same on every rank
            assert isinstance(down["proj"], DTensor) and down["proj"].shape == (32, 4)
            assert not isinstance(down["exp_avg"], DTensor) and down["exp_avg"].shape == (4, 49)
            for t in (up["proj"], down["exp_avg"]):  # replicated state agrees bitwise across ranks
                gathered = [torch.empty_like(t) for _ in range(WORLD)]
                dist.all_gather(gathered, t.contiguous())
                assert torch.equal(gathered[0], gathered[1]), extra
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_every_step(tmp_path):
    spawn_ranks(worker, str(tmp_path), nprocs=WORLD)


# End to end through launch/pretrain.py: steps 1-6, checkpoints at 3 and 6, refreshes before 1, 3, 5
# (0-based 0, 2, 4): the resume from step 3 crosses the refresh before step 5.
E2E = {
    "galore": ["optim.name=galore_adamw", "optim.galore.rank=4", "optim.galore.update_proj_gap=2"],
    "apollo": ["optim.name=apollo_adamw", "optim.apollo.rank=4", "optim.apollo.update_proj_gap=2"],
}


@pytest.mark.parametrize("extra", E2E.values(), ids=E2E.keys())
def test_resume_is_bitwise_identical_across_a_refresh(shared_data, tmp_path, extra):
    full = run_in_process(tiny_overrides(shared_data, tmp_path / "a", *extra))
    killed_copy(tmp_path / "a", tmp_path / "b")
    resumed = run_in_process(tiny_overrides(shared_data, tmp_path / "b", *extra))
    assert resumed.resumed_from.name == "step_00000003"
    assert resumed.losses == full.losses[3:]
    assert resumed.final_eval == full.final_eval


def test_galore_two_ranks_resume_on_one(shared_data, tmp_path):
    extra = E2E["galore"]
    single, double = tmp_path / "single", tmp_path / "double"
    launch_together((tiny_overrides(shared_data, single, *extra), 1), (tiny_overrides(shared_data, double, *extra), 2))
    one, two = losses(single), losses(double)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    two_to_one = killed_copy(double, tmp_path / "2to1")
    launch(tiny_overrides(shared_data, two_to_one, *extra), nproc=1)
    setup, trained = last_pass(two_to_one)
    assert setup["world_size"] == 1 and trained == [4, 5, 6]
    resumed = losses(two_to_one)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step

"""HSDP (issue 16 item 15): `parallel.shard_size` shards the model within groups of ranks and
replicates it across them through a 2-D (replicate, shard) device mesh. On 2 gloo ranks the 1 x 2
and 2 x 1 layouts train as the flat mesh does, and checkpoints resume across layouts (DCP reshards)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard

from megamora.config import ConfigError, load_config
from megamora.distributed import DistInfo
from megamora.engines.fsdp2 import FSDP2Engine
from megamora.metrics import read_metrics
from megamora.model import build_model, materialize
from megamora.optim import build_optimizer
from megamora.plan import make_plan
from spawn_ranks import spawn_ranks
from test_train import crash_after_first_checkpoint, launch, losses, tiny_overrides

# (replicate, shard) ranks of each layout on 2 ranks
LAYOUTS = {
    "flat": ([], [1, 2]),
    "1x2": (["parallel.shard_size=2"], [1, 2]),
    "2x1": (["parallel.shard_size=1"], [2, 1]),
    # reduce-scatter every micro-batch, all-reduce across the replicas once, on the last
    "2x1-every": (["parallel.shard_size=1", "parallel.reduce_scatter_every_micro_batch=true"], [2, 1]),
}
EXTRA = ["micro_batch_size=1", "eval_every=0"]  # accumulation 2; checkpoints at steps 3 and 6


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps) -> None:
    for step in steps:  # the rank-parity tolerance of tests/test_train.py
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_hsdp_layouts_train_like_the_flat_mesh_and_resume_across_layouts(shared_data, tmp_path):
    runs = {}
    for name, (layout, mesh) in LAYOUTS.items():
        launch(tiny_overrides(shared_data, tmp_path / name, *EXTRA, *layout), nproc=2)
        runs[name] = losses(tmp_path / name)
        assert read_metrics(tmp_path / name, "setup")[0]["mesh"] == mesh, name
    assert sorted(runs["flat"]) == list(range(1, 7))
    for name in LAYOUTS:
        assert_same_losses(runs[name], runs["flat"], range(1, 7))

    # A 2 x 1 checkpoint (each rank a full replica) resumes on the flat mesh, and a flat one on 2 x 1.
    for saved, resumed_as in (("2x1", "flat"), ("flat", "2x1")):
        crash_after_first_checkpoint(tmp_path / saved)
        launch(tiny_overrides(shared_data, tmp_path / saved, *EXTRA, *LAYOUTS[resumed_as][0]), nproc=2)
        assert read_metrics(tmp_path / saved, "setup")[-1]["mesh"] == LAYOUTS[resumed_as][1]
        assert_same_losses(losses(tmp_path / saved), runs["flat"], (4, 5, 6))


def test_shard_size_must_divide_the_world(shared_data, tmp_path):
    tiny = ["run_dir=unused", "model.dim=32", "model.ffn_dim=64", "model.n_layers=2", "model.n_heads=2",
            "global_batch_size=12", "micro_batch_size=1"]
    flat = make_plan(load_config(None, tiny), world_size=2, distributed=True)
    cfg = load_config(None, [*tiny, "parallel.shard_size=2"])
    hsdp = make_plan(cfg, world_size=4, distributed=True)  # 2 replicas of 2 shards: the memory of 2 ranks
    assert hsdp.shard_size == 2 and hsdp.memory.params_stored == flat.memory.params_stored
    assert (hsdp.memory.grads, hsdp.memory.moments) == (flat.memory.grads, flat.memory.moments)
    with pytest.raises(ConfigError, match="parallel.shard_size=2 does not divide the world size 3"):
        make_plan(cfg, world_size=3, distributed=True)

    run_dir = tmp_path / "run"  # one process: world size 1, refused before anything is written
    proc = launch(tiny_overrides(shared_data, run_dir, "parallel.shard_size=2"), check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == ["error: parallel.shard_size=2 does not divide the world size 1"], proc.stderr
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------------
# 2 x 2 on 4 ranks: both mesh dimensions above 1, as on 2 nodes (engine level, no data pipeline)

WORLD4 = 4
TINY = ["run_dir=unused", "model.dim=32", "model.ffn_dim=64", "model.n_layers=2", "model.n_heads=2",
        "model.vocab_size=97", "micro_batch_size=2", "global_batch_size=16", "optim.lr=1e-2"]  # accumulation 2


def build(rank: int, shard_size: int):
    cfg = load_config(None, [*TINY, f"parallel.shard_size={shard_size}"])
    engine = FSDP2Engine(cfg, DistInfo(rank, WORLD4, rank, torch.device("cpu")))
    model = build_model(cfg.model, device="meta")
    engine.shard(model)
    materialize(model, torch.device("cpu"), seed=0, std=0.02)
    engine.setup(model, build_optimizer(model, cfg.optim))
    return engine


def train(engine, batches) -> list[torch.Tensor]:
    losses = []
    for step_batches in batches:
        for a, tokens in enumerate(step_batches):
            loss = engine(tokens, targets=tokens)
            engine.backward(loss, last_micro_batch=a == len(step_batches) - 1)
        engine.step()
        losses.append(loss.detach())
    return losses


def full_state(engine) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() for k, v in engine.module.state_dict().items()}


def moment(engine, param) -> torch.Tensor:
    return engine.optimizer.state[param]["exp_avg_sq"].full_tensor()


def worker_2x2(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD4)
    try:
        g = torch.Generator().manual_seed(rank)  # each rank its own data, as the loader splits it
        batches = [[torch.randint(0, 97, (2, 12), generator=g) for _ in range(2)] for _ in range(3)]
        flat, hsdp = build(rank, 0), build(rank, 2)
        weight = hsdp.module.layers[0].self_attn.q_proj.weight
        assert weight.device_mesh.shape == (2, 2) and weight.placements == (Replicate(), Shard(0))
        torch.testing.assert_close(train(hsdp, batches), train(flat, batches), rtol=1e-5, atol=1e-6)

        # checkpoints reshard both ways: 2 x 2 -> flat and flat -> 2 x 2 restore the same values
        hsdp.save(Path(tmp) / "hsdp")
        flat.save(Path(tmp) / "flat")
        for saved, into in (("hsdp", build(rank, 0)), ("flat", build(rank, 2))):
            into.load(Path(tmp) / saved)
            source = hsdp if saved == "hsdp" else flat
            want, got = full_state(source), full_state(into)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), saved
            for p, q in zip(source.params, into.params):  # AdamW moments too
                assert torch.equal(moment(source, p), moment(into, q)), saved
    finally:
        dist.destroy_process_group()


def test_hsdp_2x2_on_4_ranks_trains_like_flat_and_checkpoints_reshard(tmp_path):
    spawn_ranks(worker_2x2, str(tmp_path), nprocs=WORLD4)

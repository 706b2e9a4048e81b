"""Adapters under FSDP2 on 2 gloo ranks (CPU): the sharded model computes what the unsharded one
does, delta_weight / merge_and_reinit work on sharded DTensor parameters, and merge_adapters on the
sharded model equals the unsharded merge (compared through the gathered full state dict)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from megamora.adapters import apply_adapters, iter_adapters, merge_adapters
from megamora.config import AdapterConfig, ModelConfig
from megamora.model import build_model, init_weights, normal_init, seeded_fill_
from spawn_ranks import spawn_ranks

WORLD = 2
# ffn 72 with r = 5 gives r_hat 23 (gate/up/down): odd, so M is sharded unevenly over 2 ranks.
MODEL = ModelConfig(dim=32, ffn_dim=72, n_layers=2, n_heads=4, vocab_size=97)
CASES = [("mora", "1", "2"), ("mora", "6", None), ("mora", "4", "1"), ("lora", None, None), ("lora_plus", None, None),
         ("asylora", None, None), ("dora", None, None)]


def build(kind: str, mora_type: str | None, shard: bool):
    model = build_model(MODEL, device="meta")
    apply_adapters(model, AdapterConfig(kind=kind, r=5, alpha=10, dropout=0.0, mora_type=mora_type or "1"))
    if shard:
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    model.to_empty(device="cpu")
    init_weights(model, seed=0, std=0.02)
    randomize(model, seed=1)
    return model


def randomize(model, seed: int) -> None:
    """Non-zero adapters, drawn on the full tensor: the same values sharded or not."""
    for name, layer in iter_adapters(model):
        for p_name, p in layer.named_parameters():
            if not p_name.startswith("base."):
                seeded_fill_(p, normal_init(0.05), seed, f"{name}.{p_name}")


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}


def assert_same_state(sharded, plain) -> None:
    a, b = full_state(sharded), plain.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)
    try:
        tokens = torch.randint(0, MODEL.vocab_size, (2, 11), generator=torch.Generator().manual_seed(7))
        for kind, mora_type, next_type in CASES:
            sharded, plain = build(kind, mora_type, True), build(kind, mora_type, False)
            assert isinstance(next(iter_adapters(sharded))[1].base.weight, DTensor)
            with torch.no_grad():
                torch.testing.assert_close(sharded(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
            for (_, a), (_, b) in zip(iter_adapters(sharded), iter_adapters(plain)):
                dw = a.delta_weight()  # all-gathers the adapter; a plain full tensor
                assert not isinstance(dw, DTensor) and dw.shape == (a.out_features, a.in_features)
                torch.testing.assert_close(dw, b.delta_weight())

            # ReLoRA / ReMoRA restart on sharded parameters, then new non-zero adapters.
            for (name, a), (_, b) in zip(iter_adapters(sharded), iter_adapters(plain)):
                kw = {"seed": 3, "key": f"{name}@restart1"}
                if kind == "mora":
                    kw["next_type"] = next_type
                a.merge_and_reinit(**kw)
                b.merge_and_reinit(**kw)
            assert_same_state(sharded, plain)
            randomize(sharded, seed=2)
            randomize(plain, seed=2)
            with torch.no_grad():
                before = sharded(tokens)
                torch.testing.assert_close(before, plain(tokens), rtol=1e-5, atol=1e-5)

            merged_sharded, merged_plain = merge_adapters(sharded), merge_adapters(plain)
            assert not list(iter_adapters(merged_sharded)) and not list(iter_adapters(merged_plain))
            assert_same_state(merged_sharded, merged_plain)
            with torch.no_grad():
                torch.testing.assert_close(merged_sharded(tokens), before, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(merged_plain(tokens), before, rtol=1e-5, atol=1e-5)
        dist.barrier()  # no rank tears down gloo while another still talks to it
    finally:
        dist.destroy_process_group()


def test_sharded_adapters_merge_like_unsharded(tmp_path):
    spawn_ranks(worker, str(tmp_path), nprocs=WORLD)

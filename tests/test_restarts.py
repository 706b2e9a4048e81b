"""ReLoRA / ReMoRA restarts: function preserved (1 process and 2 FSDP2 ranks), optimizer reset scope,
why the type cycle matters, and a smoke run whose accumulated dW exceeds r_hat."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megamora.adapters import ADAPTERS, MoRALinear, apply_adapters, iter_adapters
from megamora.adapters.mora import type_after
from megamora.analysis import delta_weights, module_type, rank_of
from megamora.config import AdapterConfig, ModelConfig, OptimConfig, RestartConfig, load_config
from megamora.model import build_model, init_weights, seeded_fill_
from megamora.optim import build_optimizer
from megamora.restarts import Restarts, adapter_parameters
from spawn_ranks import spawn_ranks

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODEL = ModelConfig(dim=48, ffn_dim=80, n_layers=2, n_heads=4, vocab_size=64)


def adapted_model(kind: str, mora_type: str = "1", device: str = "cpu", shard: bool = False):
    model = build_model(MODEL, device="meta")
    apply_adapters(model, AdapterConfig(kind=kind, r=4, alpha=8.0, dropout=0.0, mora_type=mora_type))
    if shard:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    model.to_empty(device=device)
    init_weights(model, 0, 0.02)
    for name, layer in iter_adapters(model):  # a trained-looking, non-zero adapter
        for pname, p in layer.named_parameters():
            if not pname.startswith("base."):
                seeded_fill_(p, lambda t, g: t.normal_(0, 0.05, generator=g), 1, f"{name}.{pname}")
    return model


def train_two_steps(model):
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    for _ in range(2):
        torch.manual_seed(5)
        model(torch.randint(0, 64, (2, 8))).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def restarts_for(kind: str, reset: str = "delete") -> Restarts:
    cfg = RestartConfig(every=2, mora_types=["1", "2", "3", "4"], optimizer_reset=reset, prune_ratio=0.5)
    return Restarts(cfg, seed=0, total_steps=10)


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_restart_preserves_function_and_resets_only_adapters(kind):
    model = adapted_model(kind)
    opt = train_two_steps(model)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        before = model(x)
    adapters = {id(p) for p in adapter_parameters(model)}
    others = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()
              if p.requires_grad and id(p) not in adapters}
    event = restarts_for(kind).apply(2, model, opt)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    for _, layer in iter_adapters(model):
        torch.testing.assert_close(layer.delta_weight(), torch.zeros_like(layer.delta_weight()))
        if kind == "mora":
            assert layer.mora_type == "2" and event["mora_type"] == "2"
        else:
            assert layer.lora_A.abs().sum() > 0  # A redrawn, B zero: gradients still flow
    for p in model.parameters():
        if id(p) in adapters:
            assert float(opt.state[p]["step"]) == 0 and float(opt.state[p]["exp_avg"].abs().sum()) == 0
        elif p.requires_grad:
            assert all(torch.equal(opt.state[p][k], v) for k, v in others[id(p)].items())


def test_type_cycle_and_count():
    r = restarts_for("mora")
    assert [type_after(r.cfg, k) for k in range(6)] == ["1", "2", "3", "4", "1", "2"]
    assert [s for s in range(12) if r.due(s)] == [2, 4, 6, 8]  # never at step 0 or at the end


def _merge_twice(types: tuple[str, str]) -> tuple[int, int]:
    torch.manual_seed(0)
    layer = MoRALinear(torch.nn.Linear(60, 60, bias=False), r=4, mora_type=types[0])
    w0 = layer.base.weight.detach().clone()
    for i, next_type in enumerate((types[1], types[1])):
        with torch.no_grad():
            layer.M.normal_()
        layer.merge_and_reinit(next_type=next_type)
        if i == 1:
            break
    return rank_of(layer.base.weight.detach() - w0, rtol=1e-4), layer.r_hat


def test_switching_type_is_what_raises_the_rank():
    rank_switched, r_hat = _merge_twice(("1", "2"))  # merges with types 1 then 2
    rank_same, _ = _merge_twice(("1", "1"))  # merges with types 1 then 1
    assert r_hat == 22  # round(sqrt(120 * 4))
    assert rank_switched > r_hat
    assert rank_same <= r_hat


def _sharded_restart_worker(rank, world, init_file, out_file, kind):
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = adapted_model(kind, shard=True)
        opt = train_two_steps(model)
        restarts_for(kind).apply(2, model, opt)
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
        types = [getattr(layer, "mora_type", None) for _, layer in iter_adapters(model)]
        if rank == 0:
            torch.save({"state": full, "types": types}, out_file)
        dist.barrier()  # no rank tears down gloo while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_sharded_restart_equals_unsharded(tmp_path, kind):
    out = tmp_path / "out.pt"
    spawn_ranks(_sharded_restart_worker, 2, str(tmp_path / "pg"), str(out), kind, nprocs=2)
    got = torch.load(out, weights_only=True)
    model = adapted_model(kind)
    opt = train_two_steps(model)
    restarts_for(kind).apply(2, model, opt)
    want = model.state_dict()
    assert got["state"].keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got["state"][k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert got["types"] == [getattr(layer, "mora_type", None) for _, layer in iter_adapters(model)]


def test_remora_smoke_run_accumulates_rank_above_r_hat(shared_data, tmp_path):
    from megamora.export import initial_weights, load_merged_model
    from megamora.run import pretrain

    cfg = load_config(REPO_CONFIGS / "smoke" / "remora.yaml", [
        f"run_dir={tmp_path}", f"data.local_dir={shared_data}/c4-sample/en",
        f"data.tokenizer={shared_data}/tokenizers/t5-base/spiece.model",
        "steps=12", "restarts.every=5", "eval_every=0", "save_every=0", "eval_tokens=1024",
        "logging.progress_bar=false", "model.n_layers=1",
    ])
    result = pretrain(cfg)
    restarts = [r for r in _records(tmp_path) if r["kind"] == "restart"]
    assert [(r["step"], r["mora_type"]) for r in restarts] == [(5, "2"), (10, "3")]
    _, merged = load_merged_model(tmp_path)
    deltas = delta_weights(initial_weights(tmp_path), merged.state_dict())
    assert len(deltas) == 7
    for name, dw in deltas.items():
        d_in, d_out = dw.shape[1], dw.shape[0]
        r_hat = round(((d_in + d_out) * cfg.adapter.r) ** 0.5)
        rank = rank_of(dw)
        assert r_hat < rank <= min(dw.shape), (name, module_type(name), rank, r_hat)
    assert result.final_eval["perplexity"] > 1


def _records(run_dir):
    from megamora.metrics import read_metrics

    return read_metrics(run_dir)

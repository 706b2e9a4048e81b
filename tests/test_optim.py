"""AdamW construction, the three LR schedules against direct reference formulas at every step, and
the optimizer reset at a restart (adapter state only; delete / random / magnitude), also on 2
FSDP2 gloo ranks where the sharded reset must equal the unsharded one."""

import copy
import math
import os

import pytest
import torch
from torch import nn

from megamora.config import ModelConfig, OptimConfig, RestartConfig
from megamora.model import build_model
from megamora.optim import build_optimizer, build_scheduler, lr_at, reset_optimizer_state
from spawn_ranks import spawn_ranks

T, W0, EVERY, W = 300, 20, 100, 10


# ---------------------------------------------------------------------------------------------
# Reference schedules, written directly from the method description (not from megamora.optim).


def ref_base(t, total=T, warmup=W0, floor=0.0):
    if t < warmup:
        return (t + 1) / warmup
    p = min(1.0, (t - warmup) / (total - warmup))
    return floor + (1 - floor) * (1 + math.cos(math.pi * p)) / 2


def ref_restart_warmup(total=T, warmup=W0, every=EVERY, rw=W, floor=0.0):
    """Simulates the released code step by step: at each restart the running schedule is replaced
    by a re-warmup to the LR the running schedule had reached, then a cosine to 0 at `total`."""
    out, sched = [], ("base", None, None)  # (kind, start, peak)
    for t in range(total + 1):
        if t > 0 and t % every == 0 and t < total:
            current = out_value(sched, t, total, warmup, rw, floor)
            sched = ("restart", t, current)
        out.append(out_value(sched, t, total, warmup, rw, floor))
    return out


def out_value(sched, t, total, warmup, rw, floor):
    kind, start, peak = sched
    if kind == "base":
        return ref_base(t, total, warmup, floor)
    k = t - start
    if k < rw:
        return peak * (k + 1) / rw
    p = min(1.0, (k - rw) / (total - start - rw))
    return peak * (1 + math.cos(math.pi * p)) / 2


def ref_jagged(t, total=T, warmup=W0, every=EVERY, rw=W, floor=0.1):
    """ReLoRA's jagged cosine: position in the cycle decides whether we are re-warming."""
    cycle_step, cycle = t % every, t // every
    if t >= every and cycle_step < rw and cycle * every < total:
        return (cycle_step + 1) / rw * ref_base(cycle * every + rw, total, warmup, floor)
    return ref_base(t, total, warmup, floor)


def _cfgs(lr_kind=None, floor=0.0):
    o = OptimConfig(lr=1e-3, warmup_steps=W0, min_lr_ratio=floor)
    r = None if lr_kind is None else RestartConfig(every=EVERY, lr=lr_kind, warmup=W)
    return o, r


def test_base_schedule_every_step():
    for floor in (0.0, 0.1):
        o, _ = _cfgs(None, floor)
        got = [lr_at(t, total_steps=T, cfg=o) for t in range(T + 1)]
        want = [ref_base(t, floor=floor) for t in range(T + 1)]
        assert got == pytest.approx(want, abs=1e-12)
    o, _ = _cfgs()
    assert lr_at(0, total_steps=T, cfg=o) == pytest.approx(1 / W0)  # never a zero-LR first step
    assert lr_at(W0 - 1, total_steps=T, cfg=o) == pytest.approx(1.0)
    # restarts.every == 0 is the plain schedule
    assert lr_at(150, total_steps=T, cfg=o, restarts=RestartConfig(every=0)) == pytest.approx(ref_base(150))


def test_restart_warmup_every_step():
    o, r = _cfgs("restart_warmup")
    got = [lr_at(t, total_steps=T, cfg=o, restarts=r) for t in range(T + 1)]
    want = ref_restart_warmup()
    assert got == pytest.approx(want, abs=1e-12)
    # shape checks that do not depend on the reference: ~0 at each restart, back to the LR
    # reached before it after W steps, and 0 at the end
    for s in (100, 200):
        assert got[s] == pytest.approx(got[s - 1] / W, rel=0.05)
        assert got[s + W - 1] == pytest.approx(got[s + W], abs=1e-12)
    assert got[200 + W] < got[100 + W]
    assert got[T] == pytest.approx(0.0, abs=1e-12)
    # the restart steps may also be given explicitly, unsorted
    explicit = [lr_at(t, total_steps=T, cfg=o, restarts=r, restart_steps=[200, 100]) for t in range(T + 1)]
    assert explicit == got


def test_jagged_cosine_every_step():
    o, r = _cfgs("jagged_cosine", floor=0.1)
    got = [lr_at(t, total_steps=T, cfg=o, restarts=r) for t in range(T + 1)]
    want = [ref_jagged(t) for t in range(T + 1)]
    assert got == pytest.approx(want, abs=1e-12)
    # outside the re-warmups it is the global envelope, which never drops below the floor
    assert got[150] == pytest.approx(ref_base(150, floor=0.1))
    assert min(got[W0:]) >= 0.1 / W - 1e-12
    assert got[T] == pytest.approx(0.1)


def test_scheduler_follows_lr_at_and_resumes():
    o, r = _cfgs("restart_warmup")
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=o.lr)
    sched = build_scheduler(opt, total_steps=T, cfg=o, restarts=r)
    lrs = []
    for _ in range(T):
        if len(lrs) == 150:
            saved = copy.deepcopy((opt.state_dict(), sched.state_dict()))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([o.lr * v for v in ref_restart_warmup()[:T]], rel=1e-9, abs=1e-15)
    # fresh optimizer + scheduler loaded from the step-150 state continue identically
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=o.lr)
    sched2 = build_scheduler(opt2, total_steps=T, cfg=o, restarts=r)
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    resumed = []
    for _ in range(150, T):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == lrs[150:]


def test_schedule_bad_input():
    o, r = _cfgs("restart_warmup")
    with pytest.raises(ValueError, match="step=-1"):
        lr_at(-1, total_steps=T, cfg=o)
    with pytest.raises(ValueError, match="total_steps=0"):
        lr_at(0, total_steps=0, cfg=o)
    r.lr = "triangle"
    with pytest.raises(ValueError, match="triangle"):
        lr_at(0, total_steps=T, cfg=o, restarts=r)


# ---------------------------------------------------------------------------------------------
# build_optimizer


def test_build_optimizer_groups():
    model = build_model(ModelConfig(dim=16, ffn_dim=32, n_layers=2, n_heads=2, vocab_size=50), device="cpu")
    model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig(lr=3e-4, weight_decay=0.1, betas=[0.8, 0.95], eps=1e-6))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert "layers.1.mlp.gate_proj.weight" in decay and "lm_head.weight" in decay
    assert {"embed_tokens.weight", "norm.weight", "layers.0.input_layernorm.weight"} <= no_decay
    assert all(p.ndim >= 2 for g in opt.param_groups[:1] for p in g["params"])
    assert "layers.0.self_attn.q_proj.weight" not in decay | no_decay  # frozen
    assert len(decay | no_decay) == sum(p.requires_grad for p in model.parameters())
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"]) == (3e-4, (0.8, 0.95), 1e-6)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        build_optimizer(model, OptimConfig())


# ---------------------------------------------------------------------------------------------
# Optimizer reset


class Tiny(nn.Module):
    """Two 'adapter' parameters and two others, with shapes that do not split evenly in two."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(9, 7, generator=g))
        self.gain = nn.Parameter(torch.randn(7, generator=g))
        self.lora_A = nn.Parameter(torch.randn(33, 9, generator=g))
        self.lora_B = nn.Parameter(torch.randn(7, 33, generator=g))

    def adapter_params(self):
        return [self.lora_A, self.lora_B]

    def forward(self, x):
        return (x @ self.w * self.gain + x @ self.lora_A.T @ self.lora_B.T).square().mean()


def _trained(steps=2):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(torch.randn(4, 9)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _snapshot(opt, params):
    return [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


def _assert_others_unchanged(model, opt, before):
    others = [model.w, model.gain]
    for p, state in zip(others, before):
        assert opt.state[p].keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(opt.state[p][k], v)


def test_reset_delete_equals_dropping_adapter_state_only():
    import copy

    model, opt = _trained()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.AdamW(list(twin.parameters()), lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    others = _snapshot(opt, [model.w, model.gain])
    reset_optimizer_state(opt, model.adapter_params(), "delete", 0.0)
    for p in twin.adapter_params():  # what AdamW does for a parameter it has never seen
        del twin_opt.state[p]
    _assert_others_unchanged(model, opt, others)
    x = torch.randn(4, 9)
    for m, o in ((model, opt), (twin, twin_opt)):
        m(x).backward()
        o.step()  # bias correction restarts at step 1 for the adapters
    assert float(opt.state[model.lora_A]["step"]) == 1.0 and float(opt.state[model.w]["step"]) == 3.0
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(model.adapter_params(), twin.adapter_params()):
        assert all(torch.equal(opt.state[p][k], twin_opt.state[q][k]) for k in opt.state[p])


def test_reset_random_prune_fraction_and_step_kept():
    model, opt = _trained()
    others = _snapshot(opt, [model.w, model.gain])
    adapters = _snapshot(opt, model.adapter_params())
    reset_optimizer_state(opt, model.adapter_params(), "random_prune", 0.9, torch.Generator().manual_seed(1))
    _assert_others_unchanged(model, opt, others)
    zeros = total = 0
    for p, before in zip(model.adapter_params(), adapters):
        state = opt.state[p]
        assert torch.equal(state["step"], before["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            kept = state[key] != 0
            assert torch.equal(state[key][kept], before[key][kept])  # survivors untouched
            zeros += int((~kept).sum())
            total += kept.numel()
    assert abs(zeros / total - 0.9) < 0.03, zeros / total  # 1056 entries: 3 sigma is about 0.028
    # same generator seed, same mask
    model2, opt2 = _trained()
    reset_optimizer_state(opt2, model2.adapter_params(), "random_prune", 0.9, torch.Generator().manual_seed(1))
    assert torch.equal(opt2.state[model2.lora_B]["exp_avg"], opt.state[model.lora_B]["exp_avg"])


def test_reset_magnitude_prune_zeroes_exactly_the_smallest():
    model, opt = _trained()
    others = _snapshot(opt, [model.w, model.gain])
    adapters = _snapshot(opt, model.adapter_params())
    ratio = 0.75
    reset_optimizer_state(opt, model.adapter_params(), "magnitude_prune", ratio)
    _assert_others_unchanged(model, opt, others)
    for p, before in zip(model.adapter_params(), adapters):
        assert torch.equal(opt.state[p]["step"], before["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            old, new = before[key].flatten(), opt.state[p][key].flatten()
            order = old.abs().argsort()
            k = round(ratio * old.numel())
            assert torch.all(new[order[:k]] == 0)
            assert torch.equal(new[order[k:]], old[order[k:]])


def test_reset_bad_input_and_no_state():
    model, opt = _trained()
    with pytest.raises(ValueError, match="shrink"):
        reset_optimizer_state(opt, model.adapter_params(), "shrink", 0.5)
    with pytest.raises(ValueError, match="1.5"):
        reset_optimizer_state(opt, model.adapter_params(), "random_prune", 1.5)
    fresh = nn.Parameter(torch.zeros(3))  # no state yet: nothing to do, no error
    reset_optimizer_state(opt, [fresh], "magnitude_prune", 0.5)
    assert fresh not in opt.state


# ---------------------------------------------------------------------------------------------
# 2 FSDP2 ranks (gloo): the reset of sharded state equals the reset of the full state.


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.clone()


def _fsdp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = Tiny()
        fully_shard(model)
        opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.0))
        for _ in range(2):
            torch.manual_seed(10)  # the same batch on both ranks
            model(torch.randn(4, 9)).backward()
            opt.step()
            opt.zero_grad()
        adapters, others = model.adapter_params(), [model.w, model.gain]
        full = lambda ps: [{k: _full(v) for k, v in opt.state[p].items()} for p in ps]  # noqa: E731
        result = {"before": full(adapters), "others_before": full(others)}
        reset_optimizer_state(opt, adapters, "random_prune", 0.5, torch.Generator().manual_seed(3))
        result["random"] = full(adapters)
        reset_optimizer_state(opt, adapters, "magnitude_prune", 0.5)
        result["magnitude"] = full(adapters)
        reset_optimizer_state(opt, adapters, "delete", 0.0)
        result["deleted"] = [all(float(_full(v).abs().sum()) == 0 for v in opt.state[p].values()) for p in adapters]
        result["others_after"] = full(others)
        model(torch.randn(4, 9)).backward()
        opt.step()  # still works after the delete
        result["step_after"] = float(opt.state[model.lora_A]["step"])
        if rank == 0:
            torch.save(result, out_file)
        dist.barrier()  # no rank tears down gloo while another still talks to it
    finally:
        dist.destroy_process_group()


def test_reset_on_two_fsdp2_ranks_equals_unsharded(tmp_path):
    out = tmp_path / "result.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spawn_ranks(_fsdp_worker, 2, str(tmp_path / "init"), str(out), nprocs=2)
    res = torch.load(out)
    # the same resets applied to the gathered full state in one process
    ref = [{k: v.clone() for k, v in s.items()} for s in res["before"]]
    params = [nn.Parameter(torch.zeros_like(s["exp_avg"])) for s in ref]
    opt = torch.optim.AdamW(params)
    for p, s in zip(params, ref):
        opt.state[p] = s
    reset_optimizer_state(opt, params, "random_prune", 0.5, torch.Generator().manual_seed(3))
    for got, want in zip(res["random"], ref):
        for k in want:
            assert torch.equal(got[k], want[k]), k
    reset_optimizer_state(opt, params, "magnitude_prune", 0.5)
    for got, want in zip(res["magnitude"], ref):
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert res["deleted"] == [True, True] and res["step_after"] == 1.0
    for a, b in zip(res["others_before"], res["others_after"]):
        assert all(torch.equal(a[k], b[k]) for k in a)

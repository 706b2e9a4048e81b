"""Optimizer-level methods (issue 18): GaLore and APOLLO equal their reference packages
(`galore-torch` GaLoreAdamW, `apollo-torch` APOLLOAdamW) step by step on one process, projection
refreshes included; the registry, config checks, labels and the memory plan's count of their state.

Tolerance: none. On one process the updates are bitwise equal to the reference's (torch.equal on
every parameter after every step): the same tensor operations in the same order.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from megamora.config import ConfigError, ModelConfig, OptimConfig, load_config
from megamora.engines.tensors import seed_for
from megamora.methods import method_of
from megamora.model import build_model, materialize
from megamora.optim import build_optimizer
from megamora.optimizers import OPTIMIZERS, optimizer_class
from megamora.optimizers.apollo import ApolloAdamW, next_seed
from megamora.optimizers.galore import GaLoreAdamW
from megamora.optimizers.lowrank import split_groups

galore_torch = pytest.importorskip("galore_torch")
apollo_torch = pytest.importorskip("apollo_torch")

STEPS, GAP = 7, 3  # refreshes before steps 0, 3 and 6
TINY = ModelConfig(dim=32, ffn_dim=48, n_layers=2, n_heads=2, vocab_size=97)  # up/gate 48 x 32, down 32 x 48


def tiny_model(seed: int = 0):
    model = build_model(TINY, device="meta")
    materialize(model, torch.device("cpu"), seed=seed, std=0.02)
    return model


def optim_cfg(**kw) -> OptimConfig:
    return OptimConfig(lr=1e-2, eps=1e-6, weight_decay=kw.pop("weight_decay", 0.0), **kw)


def reference_groups(groups: list[dict], ours, theirs, extra: dict) -> list[dict]:
    """Our groups over the copy's parameters, the projected group with the reference's keys."""
    by_id = {id(p): q for p, q in zip(ours.parameters(), theirs.parameters())}
    out = []
    for g in groups:
        ref = {"params": [by_id[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
        if g.get("rank"):
            ref |= {k: g[k] for k in ("rank", "update_proj_gap", "scale", "proj_type")} | extra
        out.append(ref)
    return out


def assert_same_trajectory(model, ours, ref_model, ref, steps: int = STEPS) -> None:
    for step in range(steps):
        tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(step))
        for m in (model, ref_model):
            m(tokens, targets=tokens).backward()
        for opt in (ours, ref):
            for g in opt.param_groups:
                g["lr"] = 1e-2 * (0.5 + 0.1 * step)  # a schedule
            opt.step()
            opt.zero_grad(set_to_none=True)
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert torch.equal(p, q), (step, name, (p - q).abs().max().item())


GALORE_CASES = {
    "std": dict(proj_type="std"),
    "reverse_std": dict(proj_type="reverse_std"),
    "left-wd": dict(proj_type="left", weight_decay=0.1),
    "right-rank-above-dims": dict(proj_type="right", rank=40),  # k = min(rank, m, n)
}


@pytest.mark.parametrize("case", GALORE_CASES.values(), ids=GALORE_CASES.keys())
def test_galore_equals_galore_torch_step_by_step(case):
    case = dict(case)
    cfg = optim_cfg(weight_decay=case.pop("weight_decay", 0.0), name="galore_adamw")
    cfg.galore.rank, cfg.galore.update_proj_gap, cfg.galore.scale = case.pop("rank", 4), GAP, 0.25
    cfg.galore.proj_type = case.pop("proj_type")
    model, ref_model = tiny_model(), tiny_model()
    ours = build_optimizer(model, cfg)
    assert isinstance(ours, GaLoreAdamW)
    groups = reference_groups(ours.param_groups, model, ref_model, {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = galore_torch.GaLoreAdamW(groups, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    assert_same_trajectory(model, ours, ref_model, ref)


APOLLO_CASES = {
    "channel": dict(),
    "tensor-scale-front": dict(scale_type="tensor", scale_front=True, scale=4.0, weight_decay=0.1),
    "no-limiter": dict(norm_growth_limiter=False, scale=2.0),
    "svd": dict(proj="svd"),
}


@pytest.mark.parametrize("case", APOLLO_CASES.values(), ids=APOLLO_CASES.keys())
def test_apollo_equals_apollo_torch_step_by_step(case):
    case = dict(case)
    cfg = optim_cfg(weight_decay=case.pop("weight_decay", 0.0), name="apollo_adamw")
    a = cfg.apollo
    a.rank, a.update_proj_gap = 4, GAP
    for k, v in case.items():
        setattr(a, k, v)
    model, ref_model = tiny_model(), tiny_model()
    groups = split_groups(model, cfg, dict(rank=a.rank, update_proj_gap=GAP, scale=a.scale, proj_type="std",
                                           proj=a.proj, scale_type=a.scale_type, scale_front=a.scale_front,
                                           norm_growth_limiter=a.norm_growth_limiter))
    # seeds=None: the reference's seeds (each parameter's 1-based index in group order)
    ours = ApolloAdamW(groups, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    ref_groups = reference_groups(ours.param_groups, model, ref_model, dict(proj=a.proj, scale_type=a.scale_type))
    ref = apollo_torch.APOLLOAdamW(ref_groups, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                   scale_front=a.scale_front, disable_nl=not a.norm_growth_limiter)
    assert_same_trajectory(model, ours, ref_model, ref)


def test_apollo_seeds_follow_the_run_seed_and_parameter_name():
    cfg = optim_cfg(name="apollo_adamw")
    cfg.apollo.rank = 4
    model = tiny_model()
    opt = build_optimizer(model, cfg, seed=5)
    name = "layers.1.mlp.up_proj.weight"
    p = dict(model.named_parameters())[name]
    first = seed_for(5, f"apollo:{name}")
    assert opt._seed(p, 0) == first and opt._seed(p, 2) == next_seed(next_seed(first))
    model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long)).backward()
    opt.step()
    expected = torch.randn((4, p.shape[1]), generator=torch.Generator().manual_seed(first)) / 2.0  # sqrt(4)
    assert torch.equal(opt.state[p]["proj"], expected)  # up_proj is 48 x 32: right side, Q = 4 x 32


def test_galore_keeps_r_basis_vectors_where_the_reference_keeps_min_m_n():
    """The reference's projector is a slice of U or Vh and keeps the whole basis alive (a memory
    bug: min(m, n) vectors); ours holds exactly the r it uses. The updates are the same (above)."""
    cfg = optim_cfg(name="galore_adamw")
    cfg.galore.rank = 4
    model, ref_model = tiny_model(), tiny_model()
    ours = build_optimizer(model, cfg)
    ref = galore_torch.GaLoreAdamW(reference_groups(ours.param_groups, model, ref_model, {}), lr=cfg.lr,
                                   no_deprecation_warning=True)
    assert_same_trajectory(model, ours, ref_model, ref, steps=1)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        if "proj" not in ours.state[p]:
            continue
        mine = ours.state[p]["proj"].untyped_storage().nbytes()
        theirs = ref.state[q]["projector"].ortho_matrix.untyped_storage().nbytes()
        m, n = p.shape
        assert mine == 4 * 4 * min(m, n), name  # std: r x n (right, m >= n) or m x r (left)
        assert theirs == 4 * min(m, n) ** 2, name  # the whole Vh (n x n) or U (m x m)


def test_registry_config_checks_and_labels():
    assert list(OPTIMIZERS) == ["adamw", "galore_adamw", "apollo_adamw"]
    cfg = load_config(None, ["run_dir=x", "optim.name=galore_adamw"])
    assert (cfg.optim.galore.rank, cfg.optim.galore.update_proj_gap, cfg.optim.galore.scale) == (128, 200, 0.25)
    assert method_of(cfg).label == "GaLore" and method_of(cfg).high_rank
    assert method_of(load_config(None, ["run_dir=x", "optim.name=apollo_adamw"])).label == "APOLLO"
    assert method_of(load_config(None, ["run_dir=x"])).label == "Full-rank"
    bad = {
        "optim.name=sgd": "optim.name='sgd' is not one of",
        "optim.galore.rank=0": "optim.galore.rank=0 must be positive",
        "optim.galore.proj_type=full": "optim.galore.proj_type='full' is not one of",
        "optim.apollo.scale_type=row": "optim.apollo.scale_type='row' is not one of",
        "optim.apollo.proj=qr": "optim.apollo.proj='qr' is not one of",
    }
    for override, message in bad.items():
        name = "apollo_adamw" if "apollo" in override else "galore_adamw"
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
            load_config(None, ["run_dir=x", f"optim.name={name}", override] if "name=" not in override
                        else ["run_dir=x", override])
        assert "\n" not in str(e.value)
    for name in ("galore_adamw", "apollo_adamw"):
        with pytest.raises(ConfigError, match=f"optim.name={name} needs parallel.engine=fsdp2: DeepSpeed"):
            load_config(None, ["run_dir=x", f"optim.name={name}", "parallel.engine=deepspeed"])
        with pytest.raises(ConfigError, match="adapter.kind=mora needs optim.name=adamw"):
            load_config(None, ["run_dir=x", f"optim.name={name}", "adapter.kind=mora"])
    assert optimizer_class("adamw").state_bytes(cfg, 1) is None


def test_adamw_is_unchanged():
    """optim.name=adamw builds torch's fused AdamW over the same groups as before the seam."""
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig())
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"]
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]


def test_projected_are_the_block_matrices():
    cfg = optim_cfg(name="galore_adamw")
    model = tiny_model()
    groups = {g["name"]: g for g in build_optimizer(model, cfg).param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    projected = sorted(names[id(p)] for p in groups["projected"]["params"])
    assert len(projected) == 7 * TINY.n_layers and all(n.startswith("layers.") for n in projected)
    rest = {names[id(p)] for g in ("decay", "no_decay") for p in groups[g]["params"]}
    assert any("embed" in n for n in rest) and any("output" in n or "head" in n for n in rest)


@pytest.mark.parametrize("name", ["galore_adamw", "apollo_adamw"])
def test_plan_counts_the_state_the_optimizer_holds(name):
    from megamora.plan import make_plan

    cfg = load_config(None, ["run_dir=x", f"optim.name={name}", "model.dim=32", "model.ffn_dim=48",
                             "model.n_layers=2", "model.n_heads=2", "model.vocab_size=97",
                             "optim.galore.rank=4", "optim.apollo.rank=4"])
    model = tiny_model()
    opt = build_optimizer(model, cfg.optim)
    model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long)).backward()
    opt.step()
    held = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert make_plan(cfg).memory.moments == held
    adamw = make_plan(load_config(None, ["run_dir=x", "model.dim=32", "model.ffn_dim=48", "model.n_layers=2",
                                         "model.n_heads=2", "model.vocab_size=97"])).memory.moments
    assert held < adamw

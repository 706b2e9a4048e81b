"""Every registered adapter kind through the protocol (exact merge, restart, optimizer groups, plan,
describe), and the paper's other baselines against their reference: LoRA+'s optimizer groups against
PEFT's `create_loraplus_optimizer`, DoRA's forward and gradients against PEFT's
`LoraConfig(use_dora=True)`, AsyLoRA's frozen orthonormal A."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megamora.adapters import (
    ADAPTERS, AdapterLinear, adapter_class, adapter_parameters, apply_adapters, iter_adapters, merge_adapters,
)
from megamora.config import AdapterConfig, ModelConfig, OptimConfig, RestartConfig, load_config
from megamora.model import build_model, init_weights
from megamora.optim import build_optimizer, param_groups
from megamora.plan import count_params

KINDS = sorted(ADAPTERS)
NEW_KINDS = ["lora_plus", "asylora", "dora"]
MODEL = ModelConfig(dim=32, ffn_dim=72, n_layers=2, n_heads=4, vocab_size=97)


def layer_of(kind: str, n_in: int, n_out: int, r: int = 4, bias: bool = True, **options) -> AdapterLinear:
    cfg = AdapterConfig(kind=kind, r=r, alpha=2 * r, dropout=0.0, **options)
    return adapter_class(kind).from_config(nn.Linear(n_in, n_out, bias=bias), cfg)


@torch.no_grad()
def randomize(layer: AdapterLinear, seed: int = 1) -> None:
    """Non-zero values in every adapter tensor (B = 0 would hide a wrong merge); DoRA's magnitude
    scaled away from the base norms so that the direction and the magnitude both matter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in layer.own_parameters():
        if name == "magnitude":
            p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))
        elif name != "lora_A" or not layer.frozen_parameters:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def tiny_model(kind: str, **options):
    model = build_model(MODEL, device="meta")
    apply_adapters(model, AdapterConfig(kind=kind, r=4, alpha=8, dropout=0.0, **options))
    model.to_empty(device="cpu")
    init_weights(model, seed=0, std=0.02)
    return model


# ------------------------------------------------------------------------------- the protocol


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(16, 24), (24, 16), (7, 5), (64, 64)])
def test_forward_equals_merged_weight(kind, shape):
    torch.manual_seed(0)
    layer = layer_of(kind, *shape)
    randomize(layer)
    x = torch.randn(3, 5, shape[0])
    merged = layer.base.weight + layer.delta_weight()
    torch.testing.assert_close(layer(x), x @ merged.t() + layer.base.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_restart_keeps_the_function_and_starts_from_zero(kind):
    torch.manual_seed(0)
    layer = layer_of(kind, 24, 40)
    randomize(layer)
    x = torch.randn(6, 24)
    before = layer(x).detach()
    a_before = layer.lora_A.detach().clone() if hasattr(layer, "lora_A") else None
    layer.merge_and_reinit(seed=3, key="q@restart1", restart=1, restarts=RestartConfig(every=2))
    torch.testing.assert_close(layer(x).detach(), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), torch.zeros(40, 24), rtol=0, atol=1e-5)
    if a_before is not None:  # a new A: the next segment learns in another subspace
        assert not torch.equal(layer.lora_A, a_before) and layer.lora_B.abs().sum() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_whole_model_merges_exactly_and_plans_its_counts(kind):
    model = tiny_model(kind)
    for _, layer in iter_adapters(model):
        randomize(layer)
    tokens = torch.randint(0, MODEL.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
        torch.testing.assert_close(merge_adapters(model)(tokens), before, rtol=1e-5, atol=1e-5)
    cfg = load_config(overrides=["run_dir=x", f"model.dim={MODEL.dim}", f"model.ffn_dim={MODEL.ffn_dim}",
                                 f"model.n_layers={MODEL.n_layers}", f"model.n_heads={MODEL.n_heads}",
                                 f"model.vocab_size={MODEL.vocab_size}", f"adapter.kind={kind}", "adapter.r=4"])
    counts = count_params(cfg)
    real = apply_adapters(build_model(cfg.model, device="cpu"), cfg.adapter)
    assert (counts.adapter, counts.trainable) == (real["adapter_params"], real["trainable_params"])
    assert real["adapter_kind"] == kind and all(m.kind == kind for m in counts.modules)


def test_trainable_parameters_follow_the_kind():
    names = {kind: {n.rsplit(".", 1)[-1] for n, p in tiny_model(kind).named_parameters()
                    if p.requires_grad and "proj" in n} for kind in NEW_KINDS}
    assert {"lora_A", "lora_B"} <= names["lora_plus"]
    assert "lora_B" in names["asylora"] and "lora_A" not in names["asylora"]  # A frozen
    assert {"lora_A", "lora_B", "magnitude"} <= names["dora"]


# ------------------------------------------------------------------------------- LoRA+


def test_loraplus_groups_equal_peft(monkeypatch):
    """Same (lr, weight decay) per parameter as PEFT's create_loraplus_optimizer on the same model
    for every adapter parameter. Outside the adapters two rules differ, both the project's for every
    row of the comparison rather than LoRA+'s: PEFT puts every 1-D parameter (meant for a LoRA layer's
    bias) with B at lambda x lr, here the RMSNorm gains train at lr; and PEFT decays the embeddings,
    here they are not decayed (optim._no_decay). Those are the only differences, asserted below."""
    from peft.optimizers import create_loraplus_optimizer

    model = tiny_model("lora_plus", loraplus_lr_ratio=2.0)
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1)
    ours = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    peft = create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=2.0,
                                     loraplus_weight_decay=cfg.weight_decay)

    def per_param(opt):
        return {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}

    a, b = per_param(ours), per_param(peft)
    assert a.keys() == b.keys()
    adapters = {id(p) for p in adapter_parameters(model)}
    assert all(a[i] == b[i] for i in adapters)
    for name, p in model.named_parameters():
        if p.requires_grad and p.ndim == 1:
            assert a[id(p)] == (cfg.lr, 0.0) and b[id(p)] == (2 * cfg.lr, cfg.weight_decay), name
        elif name == "embed_tokens.weight":
            assert a[id(p)] == (cfg.lr, 0.0) and b[id(p)] == (cfg.lr, cfg.weight_decay)
        elif p.requires_grad:
            assert a[id(p)] == b[id(p)], name
    b_lrs = {a[id(p)][0] for n, p in model.named_parameters() if n.endswith("lora_B")}
    assert b_lrs == {2 * cfg.lr}


def test_loraplus_ratio_follows_the_schedule():
    """The engine sets each step's LR on every group; B's group keeps its multiple of it."""
    from types import SimpleNamespace

    from megamora.engines.base import Engine

    model = tiny_model("lora_plus")
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    Engine.set_lr(SimpleNamespace(optimizer=opt), 3e-4)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"adapters": 3e-4, "adapters_lora_B": 1.2e-3, "decay": 3e-4, "no_decay": 3e-4})


def test_other_kinds_keep_their_groups():
    """LoRA and MoRA: the groups (and so the checkpoints) of runs made before the protocol."""
    for kind in ("lora", "mora"):
        groups = param_groups(tiny_model(kind), OptimConfig())
        assert [g["name"] for g in groups] == ["adapters", "decay", "no_decay"]
        assert all("lr_scale" not in g and "lr" not in g for g in groups)


# ------------------------------------------------------------------------------- AsyLoRA


def test_asylora_a_is_frozen_orthonormal_and_the_same_on_every_draw():
    model, again = tiny_model("asylora"), tiny_model("asylora")
    for (_, layer), (_, twin) in zip(iter_adapters(model), iter_adapters(again)):
        a = layer.lora_A.detach()
        torch.testing.assert_close(a @ a.t(), torch.eye(layer.r), rtol=0, atol=1e-5)
        assert not layer.lora_A.requires_grad and layer.lora_B.requires_grad
        assert torch.equal(a, twin.lora_A)  # seeded by (seed, name)
    trainable = {id(p) for p in adapter_parameters(model)}
    assert all(id(layer.lora_A) not in trainable for _, layer in iter_adapters(model))
    opt_params = {id(p) for g in build_optimizer(model, OptimConfig()).param_groups for p in g["params"]}
    assert all(id(layer.lora_A) not in opt_params for _, layer in iter_adapters(model))


# ------------------------------------------------------------------------------- DoRA against PEFT


class _One(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _peft_and_ours(n_in: int, n_out: int, r: int, dropout: float, bias: bool = True):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=bias)
    ours = layer_of("dora", n_in, n_out, r=r, bias=bias)
    ours.base.load_state_dict(base.state_dict())
    ours.init_from_base()
    ours.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
    inner = nn.Linear(n_in, n_out, bias=bias)
    inner.load_state_dict(base.state_dict())
    peft = get_peft_model(_One(inner), LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"], use_dora=True))
    layer = peft.base_model.model.proj
    # PEFT's own initial magnitude (B = 0: the base weight's row norms) is ours
    torch.testing.assert_close(ours.magnitude, layer.lora_magnitude_vector["default"].weight)
    randomize(ours)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    return ours, peft, layer


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("shape,r", [((24, 40), 4), ((40, 24), 8), ((17, 9), 3)])
def test_dora_forward_and_gradients_equal_peft(shape, r, dropout):
    """fp32, same weights (and the same dropout mask: one draw from the same seed): outputs and the
    gradients of A, B, m and x within 1e-5 (relative) of PEFT's; the initial magnitude is PEFT's too."""
    ours, peft, layer = _peft_and_ours(*shape, r=r, dropout=dropout)

    ours.train(), peft.train()
    x = torch.randn(4, 6, shape[0])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(5)
    ya = ours(xa)
    torch.manual_seed(5)
    yb = peft(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    pairs = {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight,
             "magnitude": layer.lora_magnitude_vector["default"].weight}
    for name, theirs in pairs.items():
        torch.testing.assert_close(getattr(ours, name).grad, theirs.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)


def test_dora_merge_equals_peft_merge():
    ours, peft, layer = _peft_and_ours(24, 40, r=4, dropout=0.0)
    merged = ours.base.weight + ours.delta_weight()
    layer.merge()
    torch.testing.assert_close(merged, layer.base_layer.weight, rtol=1e-5, atol=1e-6)


def test_dora_undetached_norm_back_propagates_through_it():
    """adapter.dora_detach_norm=false: the gradient of the formula m (W + sBA) / ||W + sBA|| itself."""
    torch.manual_seed(0)
    layer = layer_of("dora", 12, 20, r=3, dora_detach_norm=False)
    randomize(layer)
    x = torch.randn(5, 12)
    layer(x).square().sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    v = layer.base.weight.detach() + layer.scale * B @ A
    w = layer.magnitude.detach().unsqueeze(1) * v / v.norm(dim=1, keepdim=True)
    (x @ w.t() + layer.base.bias.detach()).square().sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-4, atol=1e-6)


def test_dora_magnitude_follows_a_warm_start_and_bf16_stays_bf16():
    model = tiny_model("dora")
    for _, layer in iter_adapters(model):
        torch.testing.assert_close(layer.magnitude, layer.base.weight.norm(dim=1))
        with torch.no_grad():
            layer.base.weight.mul_(2)  # what a warm start's load does to the base weights
    from megamora.adapters import init_from_base

    init_from_base(model)
    for _, layer in iter_adapters(model):
        torch.testing.assert_close(layer.magnitude, layer.base.weight.norm(dim=1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(torch.randn(3, layer.in_features)).dtype == torch.bfloat16


def test_bad_options_are_one_line():
    from megamora.config import ConfigError

    with pytest.raises(ConfigError, match=r"adapter.loraplus_lr_ratio=0.0 must be positive"):
        load_config(overrides=["run_dir=x", "adapter.kind=lora_plus", "adapter.loraplus_lr_ratio=0"])
    with pytest.raises(ConfigError, match=r"adapter.kind='dorra' is not one of \['none', 'lora', 'mora'"):
        load_config(overrides=["run_dir=x", "adapter.kind=dorra"])

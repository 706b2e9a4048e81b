"""LoRA and MoRA layers: every operator type against an independent re-statement of the released
code, exact merges (paper Eq. 3), ranks, r_hat values and parameter parity (Table 3), zero-init with
non-zero gradients, merge-and-reinit, dropout placement, bf16 rotation, apply/merge on a Llama."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megamora.adapters import (
    LoRALinear,
    MoRALinear,
    apply_adapters,
    describe_adapters,
    iter_adapters,
    merge_adapters,
    mora_r_hat,
)
from megamora.adapters.mora import _MoRAFunction
from megamora.config import AdapterConfig, ModelConfig
from megamora.model import RMSNorm, build_model, init_weights, kaiming_uniform_init, seeded_fill_

TYPES = ["1", "2", "3", "4", "6", "decouple", "truncation"]
TABLE3 = [(768, 768), (768, 2560), (2560, 768)]  # 250M: q/k/v/o, gate/up, down (in, out)
# Not divisible by r_hat, many periods, tiny (r_hat > in or > out); the first six are sizes the
# released code itself can run (its cyclic padding assumes r_hat - in % r_hat <= in).
AWKWARD = [(37, 53), (53, 37), (100, 100), (16, 200), (200, 16), (5, 3), (3, 9), (7, 64), (64, 7)]


def mora(in_f, out_f, r, t, seed=0, dtype=torch.float32, **kw) -> MoRALinear:
    torch.manual_seed(seed)
    layer = MoRALinear(nn.Linear(in_f, out_f, bias=False), r=r, mora_type=t, **kw).to(dtype)
    with torch.no_grad():
        layer.M.normal_(0, 1.0 / math.sqrt(layer.r_hat))  # random non-zero M
    return layer


# ---------------------------------------------------------------------------------------------
# The released code's operators restated (float64, small loops allowed here), used as the reference.


def released_forward(x: torch.Tensor, M: torch.Tensor, in_f: int, out_f: int, t: int) -> torch.Tensor:
    """decompress(M compress(x)) exactly as the authors' `_apply_mora` computes it."""
    r = M.shape[0]
    if t in (1, 4):
        if in_f % r:
            x = torch.cat([x, x[..., : r - in_f % r]], -1)
        xc = x.view(*x.shape[:-1], -1, r).sum(-2)
    elif t in (2, 3):
        nr = in_f // r
        m = in_f - r * nr
        mr = nr + 1
        parts = [x[..., : m * mr].reshape(*x.shape[:-1], m, mr).sum(-1)] if m else []
        parts.append(x[..., m * mr:].reshape(*x.shape[:-1], r - m, nr).sum(-1))
        xc = torch.cat(parts, -1)
    else:  # 6
        n_in = -(-in_f // r)
        if in_f % r:
            x = torch.cat([x, x[..., : r - in_f % r]], -1)
        chunks = x.view(*x.shape[:-1], n_in, r)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).double() / r))
        emb = torch.outer(torch.arange(n_in).double(), inv_freq)
        emb = torch.cat([emb, emb], -1)
        rot_half = torch.cat([-chunks[..., r // 2:], chunks[..., : r // 2]], -1)
        xc = chunks * emb.cos() + rot_half * emb.sin()
    o = xc @ M.t()
    if t in (1, 3):
        return torch.cat([o] * -(-out_f // r), -1)[..., :out_f]
    if t in (2, 4):
        nr = out_f // r
        m = out_f - r * nr
        return torch.cat([o[..., :m].repeat_interleave(nr + 1, -1), o[..., m:].repeat_interleave(nr, -1)], -1)
    flat = o.reshape(*o.shape[:-2], -1)[..., :out_f]
    return torch.cat([flat] * -(-out_f // flat.shape[-1]), -1)[..., :out_f]


def paper_delta(M: torch.Tensor, in_f: int, out_f: int, t: str) -> torch.Tensor:
    """dW of decouple (Eq. 8, cyclic padding, flatten-then-truncate-or-tile) and truncation (Eq. 5)."""
    r = M.shape[0]
    dW = torch.zeros(out_f, in_f, dtype=torch.float64)
    if t == "truncation":
        k, o = min(r, in_f), min(r, out_f)
        dW[:o, :k] = M[:o, :k]
        return dW
    length = -(-in_f // r) * r
    for i in range(out_f):
        q = i % length
        chunk, row = divmod(q, r)
        for s in range(r):
            dW[i, (chunk * r + s) % in_f] += M[row, s]
    return dW


def adapter_out(layer: MoRALinear, x: torch.Tensor) -> torch.Tensor:
    return layer(x) - F.linear(x, layer.base.weight)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("shape,r", [(s, r) for s in TABLE3 for r in (8, 128)] + [(s, 4) for s in AWKWARD[:6]])
def test_forward_matches_released_code(t, shape, r):
    in_f, out_f = shape
    layer = mora(in_f, out_f, r, t, dtype=torch.float64)
    x = torch.randn(2, 3, in_f, dtype=torch.float64)
    want = released_forward(x, layer.M.detach(), in_f, out_f, t)
    tol = 1e-6 if t == 6 else 1e-12  # the rotation tables are fp32 by design
    assert (adapter_out(layer, x) - want).norm() <= tol * want.norm()


@pytest.mark.parametrize("t", ["decouple", "truncation"])
@pytest.mark.parametrize("shape", [(64, 200), (200, 64), (37, 53), (5, 3), (3, 9)])
def test_paper_only_types_match_their_equations(t, shape):
    layer = mora(*shape, 4, t, dtype=torch.float64)
    torch.testing.assert_close(layer.delta_weight().double(), paper_delta(layer.M.detach(), *shape, t))


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("shape,r", [(s, r) for s in TABLE3 for r in (8, 128)] + [(s, 4) for s in AWKWARD])
def test_forward_equals_linear_with_merged_weight(t, shape, r):
    """Paper Eq. 3 in fp32: W x + f_decomp(M f_comp(x)) == (W + dW) x, to 1e-5 relative."""
    layer = mora(*shape, r, t)
    x = torch.randn(5, shape[0])
    got, want = layer(x), F.linear(x, layer.base.weight + layer.delta_weight())
    assert (got - want).norm() <= 1e-5 * want.norm()


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("shape", [(11, 7), (7, 11), (3, 9), (30, 7), (7, 30), (6, 40), (4, 60), (60, 4)])
def test_backward_matches_finite_differences(t, shape):
    """The hand-written backward (x, M, bias; fused and dropout branches) against gradcheck."""
    layer = mora(*shape, 2, t, dtype=torch.float64)
    geo, W, cos, sin = layer.geometry, layer.base.weight, layer.rot_cos, layer.rot_sin
    x = torch.randn(4, shape[0], dtype=torch.float64, requires_grad=True)
    M = layer.M.detach().clone().requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, M, b: _MoRAFunction.apply(x, x, M, cos, sin, W, b, geo), (x, M, b))
    xd = torch.randn(4, shape[0], dtype=torch.float64, requires_grad=True)  # the dropout branch: x != xd
    assert torch.autograd.gradcheck(lambda x, xd, M: _MoRAFunction.apply(x, xd, M, cos, sin, W, None, geo),
                                    (x, xd, M))


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("shape,r", [((96, 200), 9), ((200, 96), 9), ((50, 50), 4)])
def test_fp32_and_bf16_gradients_match_fp64(t, shape, r):
    """fp32 takes the padded-GEMM path (r_hat -> multiple of 16) and bf16 the unpadded one; the
    fp64 path is the one gradcheck verifies."""
    ref = mora(*shape, r, t, dtype=torch.float64)
    x = torch.randn(33, shape[0], dtype=torch.float64)
    g = torch.randn(33, shape[1], dtype=torch.float64)
    grads = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        layer = mora(*shape, r, t, dtype=dtype)
        with torch.no_grad():
            layer.M.copy_(ref.M)
            layer.base.weight.copy_(ref.base.weight)
        xi = x.to(dtype).detach().requires_grad_()
        layer(xi).backward(g.to(dtype))
        grads[dtype] = (xi.grad.double(), layer.M.grad.double())
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        for got, want in zip(grads[dtype], grads[torch.float64]):
            assert (got - want).norm() <= tol * want.norm()


@pytest.mark.parametrize("t", TYPES)
def test_fp32_layer_under_bf16_autocast_matches_fp64(t):
    """fp32 parameters with bf16 compute from torch.autocast (one process, and DeepSpeed): the fused
    Function gets bf16 inputs, M keeps fp32 and gets an fp32 gradient."""
    shape, r = (96, 200), 9
    ref = mora(*shape, r, t, dtype=torch.float64)
    layer = mora(*shape, r, t)
    with torch.no_grad():
        ref.M.normal_()
        layer.M.copy_(ref.M)
        layer.base.weight.copy_(ref.base.weight)
    x, g = torch.randn(33, shape[0], dtype=torch.float64), torch.randn(33, shape[1], dtype=torch.float64)
    xr = x.clone().requires_grad_()
    ref(xr).backward(g)
    xi = x.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xi)
    assert y.dtype == torch.bfloat16
    y.backward(g.to(torch.bfloat16))
    assert layer.M.grad.dtype == torch.float32 and xi.grad.dtype == torch.float32
    for got, want in ((xi.grad, xr.grad), (layer.M.grad, ref.M.grad)):
        assert (got.double() - want).norm() <= 3e-2 * want.norm()


def _rank(dW: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(dW.double(), rtol=1e-4))  # dW is computed in fp32


def orthogonal_(layer: MoRALinear, seed: int = 0) -> MoRALinear:
    """A random orthogonal M: every singular value is 1, so the numerical rank is unambiguous."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(layer.r_hat, layer.r_hat, generator=g, dtype=torch.float64))
    with torch.no_grad():
        layer.M.copy_(q)
    return layer


@pytest.mark.parametrize("t,shape,r", [("1", s, 128) for s in TABLE3] + [(t, (768, 2560), 128) for t in "234"]
                         + [("6", s, 8) for s in TABLE3])
def test_rank_of_delta_on_table3_shapes(t, shape, r):
    layer = orthogonal_(mora(*shape, r, t))
    want = min(shape) if t == "6" else layer.r_hat
    assert _rank(layer.delta_weight()) == want


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("shape", AWKWARD)
def test_rank_on_awkward_shapes_is_capped_by_the_layer(t, shape):
    layer = orthogonal_(mora(*shape, 4, t))
    want = min(shape) if t in ("6", "decouple") else min(layer.r_hat, *shape)
    assert _rank(layer.delta_weight()) == want


def test_lora_rank_is_r():
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(768, 2560, bias=False), r=16, alpha=32)
    with torch.no_grad():
        lora.lora_B.normal_()
    assert _rank(lora.delta_weight()) == 16


def test_remora_type_cycle_gains_rank_only_across_groupings():
    """Merges sharing a compress or decompress operator stay at rank r_hat; types 1 + 2 go beyond."""
    def merged_rank(types):
        base = nn.Linear(200, 300, bias=False)
        layer = MoRALinear(base, r=4, mora_type=types[0])
        with torch.no_grad():
            base.weight.zero_()
            for i, nxt in enumerate(list(types[1:]) + [None]):
                orthogonal_(layer, seed=i)
                layer.merge_and_reinit(next_type=nxt)
        return _rank(base.weight), layer.r_hat

    rank, r_hat = merged_rank(["1", "1"])
    assert rank == r_hat
    assert merged_rank(["1", "3"])[0] == r_hat
    assert merged_rank(["1", "2"])[0] > r_hat


@pytest.mark.parametrize("shape,want", [((768, 768), 443), ((768, 2560), 653), ((2560, 768), 653),
                                        ((2048, 2048), 724), ((2048, 5461), 980), ((5461, 2048), 980)])
def test_r_hat_values_and_parameter_parity_with_lora(shape, want):
    assert mora_r_hat(*shape, 128) == want
    lora_params = 128 * sum(shape)
    assert abs(want**2 - lora_params) <= 0.005 * lora_params
    layer = MoRALinear(nn.Linear(*shape, bias=False, device="meta"), r=128)
    assert layer.r_hat == want and [p.numel() for p in layer.parameters() if p.requires_grad] == [want**2]


def test_r_hat_rules():
    assert mora_r_hat(768, 768, 8) == 111 and mora_r_hat(768, 768, 8, mora_type="rotation") == 110
    assert mora_r_hat(768, 2560, 8) == 163 and mora_r_hat(768, 2560, 8, mora_type=6) == 162
    assert mora_r_hat(100, 100, 2, rule="floor") == 20 and mora_r_hat(10, 10, 10, rule="round") == 14
    assert mora_r_hat(10, 10, 10, rule="floor") == 14 and mora_r_hat(10, 11, 10, rule="floor") == 14
    assert mora_r_hat(768, 2560, 128, rule="floor") == 652


@pytest.mark.parametrize("call,match", [
    (lambda: MoRALinear(nn.Linear(8, 8), r=2, mora_type=5), "mora_type=5"),
    (lambda: MoRALinear(nn.Linear(8, 8), r=2, mora_type="shear"), "mora_type='shear'"),
    (lambda: MoRALinear(nn.Linear(8, 8), r=2, r_hat_rule="ceil"), "r_hat_rule='ceil'"),
    (lambda: MoRALinear(nn.Linear(8, 8), r=0), "r=0"),
    (lambda: MoRALinear(nn.Linear(8, 8), r=2, dropout=1.0), "dropout=1.0"),
    (lambda: LoRALinear(nn.Linear(8, 8), r=0, alpha=1), "r=0"),
    (lambda: MoRALinear(nn.Linear(1, 1), r=1, mora_type="rotation"), "r_hat >= 2"),
])
def test_bad_arguments_raise_one_line_value_errors(call, match):
    with pytest.raises(ValueError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_type_names_and_numbers_are_the_same_operators():
    for a, b in [(1, "sharing"), ("6", "rotation"), (6, " Rotation ")]:
        la, lb = mora(40, 60, 4, a), mora(40, 60, 4, b)
        assert la.mora_type == lb.mora_type
        torch.testing.assert_close(la.delta_weight(), lb.delta_weight())


@pytest.mark.parametrize("t", TYPES)
def test_fresh_adapter_changes_nothing_but_gets_a_gradient(t):
    base = nn.Linear(48, 80, bias=False)
    layer = MoRALinear(base, r=4, mora_type=t)
    x = torch.randn(6, 48)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    torch.testing.assert_close(layer(x), base(x))
    layer(x).square().sum().backward()
    assert layer.M.grad is not None and layer.M.grad.abs().sum() > 0
    assert base.weight.grad is None and [n for n, p in layer.named_parameters() if p.requires_grad] == ["M"]


def test_fresh_lora_changes_nothing_but_gets_a_gradient():
    base = nn.Linear(48, 80, bias=False)
    lora = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(6, 48)
    torch.testing.assert_close(lora(x), base(x))
    lora(x).square().sum().backward()
    assert lora.lora_B.grad.abs().sum() > 0  # unlike ReLoRA's released code (A = B = 0: no gradient)
    assert base.weight.grad is None and {n for n, p in lora.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_lora_forward_and_merge():
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=True)
    lora = LoRALinear(base, r=4, alpha=2.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 5, 24)
    want = base(x) + 0.5 * (x @ lora.lora_A.t() @ lora.lora_B.t())
    torch.testing.assert_close(lora(x), want)
    torch.testing.assert_close(lora(x), F.linear(x, base.weight + lora.delta_weight(), base.bias))
    before = lora(x).detach()
    lora.merge_and_reinit(seed=3, key="q@restart1")
    torch.testing.assert_close(base(x), before, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(lora.lora_B) == 0
    expect_A = torch.empty(4, 24)
    seeded_fill_(expect_A, kaiming_uniform_init, 3, "q@restart1")
    torch.testing.assert_close(lora.lora_A.detach(), expect_A)


@pytest.mark.parametrize("cycle", [["1", "2", "3", "4", "1"], ["6", "decouple", "6"], ["truncation", "1"]])
def test_merge_and_reinit_preserves_function_and_switches_type(cycle):
    torch.manual_seed(0)
    base = nn.Linear(70, 90, bias=True)
    layer = MoRALinear(base, r=4, mora_type=cycle[0])
    x = torch.randn(8, 70)
    for nxt in cycle[1:]:
        with torch.no_grad():
            layer.M.normal_()
        before = layer(x).detach()
        layer.merge_and_reinit(next_type=nxt)
        assert layer.mora_type == nxt and torch.count_nonzero(layer.M) == 0
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base(x), before, rtol=1e-5, atol=1e-5)
        assert (layer.rot_cos is not None) == (nxt == "6")


def test_type_switch_that_changes_r_hat_is_refused_before_merging():
    layer = mora(768, 768, 8, "1")  # r_hat 111 is odd; rotation would need 110
    w = layer.base.weight.detach().clone()
    with pytest.raises(ValueError, match="r_hat would change 111 -> 110"):
        layer.merge_and_reinit(next_type="rotation")
    assert torch.equal(layer.base.weight, w) and layer.mora_type == "1"
    with pytest.raises(ValueError, match="r_hat would change"):
        layer.set_type(6)


def test_dropout_applies_to_the_adapter_input_only():
    layer = mora(30, 50, 4, "1", dropout=0.5)
    x = torch.randn(7, 30, requires_grad=True)
    g = torch.randn(7, 50)
    torch.manual_seed(1)
    y = layer(x)
    y.backward(g)
    torch.manual_seed(1)
    xd = F.dropout(x, 0.5, training=True)
    dW, W = layer.delta_weight(), layer.base.weight
    want = F.linear(x, W) + F.linear(xd, dW)
    torch.testing.assert_close(y, want)
    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    (F.linear(x2, W) + F.linear(F.dropout(x2, 0.5, training=True), dW)).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, W + dW))


def test_rotation_tables_stay_fp32_and_bf16_forward_is_accurate():
    layer = mora(768, 768, 8, "rotation", seed=1)
    x = torch.randn(16, 768)
    want = F.linear(x, layer.base.weight + layer.delta_weight())
    layer.to(torch.bfloat16)
    assert layer.rot_cos.dtype == torch.float32 and layer.M.dtype == torch.bfloat16
    got = layer(x.bfloat16()).float()
    assert (got - want).norm() <= 2e-2 * want.norm()
    assert "rot_cos" not in layer.state_dict()


def test_layer_input_shapes_and_bias():
    layer = mora(12, 20, 2, "4")
    layer.base.bias = nn.Parameter(torch.randn(20), requires_grad=False)
    x = torch.randn(2, 3, 4, 12)
    torch.testing.assert_close(layer(x), F.linear(x, layer.base.weight + layer.delta_weight(), layer.base.bias))


# ---------------------------------------------------------------------------------------------
# On the Llama: apply on the meta device, initialise, merge.


def tiny_cfg() -> ModelConfig:
    return ModelConfig(dim=32, ffn_dim=72, n_layers=2, n_heads=4, vocab_size=97)


def adapted_llama(kind="mora", seed=0, **kw):
    model = build_model(tiny_cfg(), device="meta")
    cfg = AdapterConfig(kind=kind, r=4, alpha=8, dropout=0.0, **kw)
    summary = apply_adapters(model, cfg)
    model.to_empty(device="cpu")
    init_weights(model, seed, 0.02)
    return model, summary


def randomize_adapters(model, seed=1):
    for name, layer in iter_adapters(model):
        for p_name, p in layer.named_parameters():
            if not p_name.startswith("base."):
                seeded_fill_(p, lambda t, g: t.normal_(0, 0.05, generator=g), seed, f"{name}.{p_name}")


def test_apply_adapters_on_meta_model_wraps_targets_and_sets_trainable_flags():
    model = build_model(tiny_cfg(), device="meta")
    summary = apply_adapters(model, AdapterConfig(kind="mora", r=4, target_modules=["q_proj", "down_proj"],
                                                  train_embeddings=False, train_head=True, train_norms=False))
    names = [n for n, _ in iter_adapters(model)]
    assert names == [f"layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    assert isinstance(model.layers[0].self_attn.k_proj, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{a}.M" for a in names} | {"lm_head.weight"}
    assert all(not m.weight.requires_grad for m in model.modules() if isinstance(m, RMSNorm))
    assert summary["mora_r_hat"] == {"q_proj": mora_r_hat(32, 32, 4), "down_proj": mora_r_hat(72, 32, 4)}
    assert summary["trainable_params"] == 2 * (16**2 + 20**2) + 97 * 32
    assert summary["total_params"] == sum(p.numel() for p in model.parameters())


def test_apply_kind_none_is_a_no_op_and_bad_targets_raise():
    model = build_model(tiny_cfg(), device="meta")
    summary = apply_adapters(model, AdapterConfig(kind="none"))
    assert not list(iter_adapters(model)) and all(p.requires_grad for p in model.parameters())
    assert summary["trainable_params"] == summary["total_params"] and summary["adapter_kind"] == "none"
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        apply_adapters(model, AdapterConfig(kind="lora", target_modules=["qkv_proj"]))


@pytest.mark.parametrize("kind", ["lora", "mora"])
def test_init_weights_seeds_base_weights_like_the_plain_model(kind):
    plain = build_model(tiny_cfg(), device="cpu")
    init_weights(plain, 0, 0.02)
    model, _ = adapted_llama(kind, mora_type="6" if kind == "mora" else "1")
    sd = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(sd[k], v)
    tokens = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(model(tokens), plain(tokens))  # fresh adapters change nothing
    for _, layer in iter_adapters(model):
        if kind == "lora":
            bound = 1 / math.sqrt(layer.in_features)
            assert 0 < layer.lora_A.abs().max() <= bound and torch.count_nonzero(layer.lora_B) == 0
        else:
            assert torch.count_nonzero(layer.M) == 0 and layer.rot_cos.dtype == torch.float32
            assert torch.isfinite(layer.rot_cos).all() and layer.rot_cos[0].eq(1).all()


@pytest.mark.parametrize("kind,t", [("lora", "1"), ("mora", "1"), ("mora", "6"), ("mora", "2")])
def test_merge_adapters_gives_a_plain_llama_with_the_same_outputs(kind, t):
    model, _ = adapted_llama(kind, mora_type=t)
    randomize_adapters(model)
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = model(tokens)
    merged = merge_adapters(model)
    assert not list(iter_adapters(merged))
    plain = build_model(tiny_cfg(), device="cpu")
    plain.load_state_dict(merged.state_dict())  # exactly the plain Llama's keys
    torch.testing.assert_close(plain(tokens), before, rtol=1e-5, atol=1e-5)


def test_describe_adapters_for_lora():
    model, summary = adapted_llama("lora")
    assert summary["adapter_kind"] == "lora" and summary["lora_r"]["q_proj"] == 4
    assert summary["adapter_params"] == 2 * (4 * 4 * (32 + 32) + 3 * 4 * (32 + 72))
    assert describe_adapters(model) == summary

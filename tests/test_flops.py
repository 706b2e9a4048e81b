"""FLOPs per token (megamora.plan.step_flops) against torch's FLOP counter on a real forward +
backward of tiny full-rank, LoRA and MoRA models: frozen base weights cost 4 FLOPs per parameter
per token, not 6 (issue 16, item 12).

torch.utils.flop_counter.FlopCounterMode counts every GEMM the step runs from its shapes (mm, addmm,
bmm; in-place addmm_ and the CPU attention kernels registered here with torch's own formulas), so
it is a count independent of the code under test. Its attention figures are for the full s x s
scores and its backward recomputes them: the model FLOPs of causal attention are half its forward
plus half of its backward without the recomputation (4 of its 5 bmm)."""

from __future__ import annotations

import pytest
import torch
from torch.utils import flop_counter

from megamora.adapters import apply_adapters
from megamora.config import load_config
from megamora.metrics import PEAK_BF16_FLOPS, peak_flops
from megamora.model import build_model, materialize
from megamora.plan import flops_per_token, format_plan, make_plan, step_flops

aten = torch.ops.aten
SDPA_FORWARD = aten._scaled_dot_product_flash_attention_for_cpu
SDPA_BACKWARD = aten._scaled_dot_product_flash_attention_for_cpu_backward
SEQ, BATCH = 32, 2


def _register_cpu_formulas() -> None:
    """In-place addmm_ (MoRA's base GEMM, the loss) and the CPU flash-attention kernels, which
    torch's counter does not know, with the formulas it uses for their CUDA / out-of-place forms."""
    registry = flop_counter.flop_registry
    if aten.addmm_ not in registry:
        flop_counter.register_flop_formula(aten.addmm_, get_raw=True)(flop_counter.addmm_flop)
    if SDPA_FORWARD not in registry:
        flop_counter.register_flop_formula(SDPA_FORWARD)(
            lambda q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v))
    if SDPA_BACKWARD not in registry:
        flop_counter.register_flop_formula(SDPA_BACKWARD)(
            lambda g, q, k, v, *args, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(g, q, k, v))


def tiny(*overrides: str):
    return load_config(overrides=["run_dir=x", "model.dim=64", "model.ffn_dim=176", "model.n_layers=2",
                                  "model.n_heads=4", "model.vocab_size=320", f"data.seq_len={SEQ}",
                                  f"micro_batch_size={BATCH}", *overrides])


def counted_step(cfg) -> tuple[int, float]:
    """(GEMM FLOPs, causal attention model FLOPs) of one forward + backward, per FlopCounterMode.
    bf16 weights: MoRA pads fp32 GEMM widths to a multiple of 16, which model FLOPs do not count."""
    _register_cpu_formulas()
    model = build_model(cfg.model, device="meta")
    apply_adapters(model, cfg.adapter)
    materialize(model, torch.device("cpu"), seed=0, std=0.02)
    model.to(torch.bfloat16)
    model.lm_head.chunk_size = 24  # chunked loss: two chunks, the same GEMMs
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02)  # B and M start at zero; any values count the same
    tokens = torch.randint(0, cfg.model.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    with flop_counter.FlopCounterMode(display=False) as counter:
        model(tokens[:, :-1], tokens[:, 1:]).backward()
    counts = counter.get_flop_counts()["Global"]
    forward, backward = counts.get(SDPA_FORWARD, 0), counts.get(SDPA_BACKWARD, 0)
    assert forward > 0 and backward > 0  # the formulas above were used
    return counter.get_total_flops() - forward - backward, (forward + backward * 4 / 5) / 2


CASES = {
    "full": [],
    "full-gqa": ["model.n_kv_heads=2"],
    "lora": ["adapter.kind=lora", "adapter.r=4"],
    "lora_plus": ["adapter.kind=lora_plus", "adapter.r=4"],
    "asylora": ["adapter.kind=asylora", "adapter.r=4"],
    "dora-dropout": ["adapter.kind=dora", "adapter.r=4", "adapter.dropout=0.1"],
    "dora-undetached": ["adapter.kind=dora", "adapter.r=4", "adapter.dropout=0", "adapter.dora_detach_norm=false"],
    "mora-1": ["adapter.kind=mora", "adapter.r=4", "adapter.mora_type=1"],
    "mora-2": ["adapter.kind=mora", "adapter.r=4", "adapter.mora_type=2"],
    "mora-6": ["adapter.kind=mora", "adapter.r=4", "adapter.mora_type=6"],
    "mora-decouple": ["adapter.kind=mora", "adapter.r=8", "adapter.mora_type=decouple"],
    # nothing trains before layer 0's down_proj: its q/k/v/o/gate/up compute no gradients at all
    "lora-down-only-frozen": ["adapter.kind=lora", "adapter.r=4", "adapter.target_modules=[down_proj]",
                              "adapter.train_embeddings=false", "adapter.train_norms=false",
                              "adapter.train_head=false"],
    "mora-frozen-outside": ["adapter.kind=mora", "adapter.r=4", "adapter.train_embeddings=false",
                            "adapter.train_norms=false", "adapter.train_head=false"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_step_flops_match_torchs_counter(case):
    cfg = tiny(*CASES[case])
    gemm, attention = counted_step(cfg)
    ours = step_flops(cfg)
    tokens = BATCH * SEQ
    # exact, but for work done once per forward (DoRA's norm) spread over its tokens as a fraction
    assert (ours.base + ours.adapters) * tokens == pytest.approx(gemm, rel=1e-12, abs=0)
    assert ours.attention * tokens == attention
    assert (ours.adapters > 0) == (cfg.adapter.kind != "none")


def test_frozen_base_weights_cost_four_flops_per_parameter():
    """By hand: the tiny model's linear layers (2 x (4 x 64^2 + 3 x 64 x 176) = 100352 parameters)
    and head (64 x 320): 6 per parameter full rank, 4 for the frozen base of LoRA; the adapters
    (r = 4) add 6 r (in + out) each; attention 3 x 2 s h per layer."""
    linear, head = 2 * (4 * 64 * 64 + 3 * 64 * 176), 64 * 320
    attention = 2 * 3 * 2 * SEQ * 64
    full = step_flops(tiny())
    assert (full.base, full.adapters, full.attention) == (6 * (linear + head), 0, attention)
    lora = step_flops(tiny("adapter.kind=lora", "adapter.r=4"))
    in_plus_out = 2 * (4 * 128 + 3 * (64 + 176))  # q, k, v, o; gate, up, down
    assert (lora.base, lora.adapters, lora.attention) == (4 * linear + 6 * head, 6 * 4 * in_plus_out, attention)


def test_the_plan_and_the_trainer_use_the_same_count():
    cfg = tiny("adapter.kind=mora", "adapter.r=4", "global_batch_size=4", "micro_batch_size=4", "steps=3")
    plan = make_plan(cfg)
    assert plan.flops_per_token == flops_per_token(cfg) == step_flops(cfg).total
    assert plan.flops == step_flops(cfg) and plan.flops.adapters > 0
    assert plan.total_flops == plan.flops_per_token * plan.total_tokens
    assert f"adapters {plan.flops.adapters:.4g}" in format_plan(plan)


# ---------------------------------------------------------------------------------------------
# Peaks


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H800", 989e12), ("NVIDIA H800 PCIe", 756e12),
    ("NVIDIA B200", 2250e12), ("NVIDIA GB200", 2500e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A800-SXM4-80GB", 312e12),
    ("NVIDIA A800 80GB PCIe", 312e12), ("NVIDIA L40S", 362e12),
    ("Tesla V100-SXM2-32GB", None),  # no bf16 tensor cores: no bf16 MFU
])
def test_peak_bf16_flops_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == peak


def test_peak_table_has_no_v100_and_names_are_ordered_specific_first():
    assert not any("V100" in key for key in PEAK_BF16_FLOPS)
    keys = list(PEAK_BF16_FLOPS)
    for i, key in enumerate(keys):  # a key that contains an earlier one would never be reached
        assert not any(earlier in key for earlier in keys[:i]), key


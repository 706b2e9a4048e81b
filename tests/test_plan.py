"""The dry-run plan: parameter counts against a real model, memory rules against hand-computed
numbers, and `launch/pretrain.py --dry-run` through a subprocess (no training, no run directory)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megamora.adapters import apply_adapters
from megamora.config import ConfigError, load_config
from megamora.model import build_model
from megamora.plan import activation_bytes, count_params, format_plan, make_plan

REPO = Path(__file__).resolve().parents[1]
ENTRY = str(REPO / "launch" / "pretrain.py")

# dim 32, ffn 64, 2 layers, 2 heads, vocab 128
TINY = ["run_dir=unused", "model.dim=32", "model.ffn_dim=64", "model.n_layers=2", "model.n_heads=2",
        "model.vocab_size=128", "data.seq_len=16", "micro_batch_size=2", "global_batch_size=8", "steps=10"]

# By hand. Plain model: embed 128*32 + head 128*32 + final norm 32, and per block two norms 2*32,
# q/k/v/o 4*32*32, gate/up/down 3*32*64 = 10304.
BLOCK = 2 * 32 + 4 * 32 * 32 + 3 * 32 * 64
BASE = 2 * 128 * 32 + 32 + 2 * BLOCK
NORMS = 2 * 2 * 32 + 32
# LoRA r=4: r (in + out) per layer: attention 4*(32+32), mlp 4*(32+64).
LORA = 2 * (4 * 4 * 64 + 3 * 4 * 96)
# MoRA r=4: r_hat = round(sqrt((in + out) r)): attention sqrt(256) = 16, mlp sqrt(384) = 19.6 -> 20.
MORA = 2 * (4 * 16**2 + 3 * 20**2)


def tiny(*extra: str):
    return load_config(None, [*TINY, *extra])


@pytest.mark.parametrize("kind,adapter", [("lora", LORA), ("mora", MORA)])
def test_counts_match_hand_and_real_model(kind, adapter):
    cfg = tiny(f"adapter.kind={kind}", "adapter.r=4")
    counts = count_params(cfg)
    assert (counts.total, counts.adapter) == (BASE + adapter, adapter)
    assert counts.trainable == adapter + 2 * 128 * 32 + NORMS  # adapters, embeddings, head, norms
    assert counts.block == BLOCK + adapter // 2
    real = apply_adapters(build_model(cfg.model, device="cpu"), cfg.adapter)
    assert (counts.total, counts.trainable, counts.adapter) == (
        real["total_params"], real["trainable_params"], real["adapter_params"])
    sizes = {m.name: m.sizes["r" if kind == "lora" else "r_hat"] for m in counts.modules}
    if kind == "lora":
        assert sizes == real["lora_r"] == {n: 4 for n in sizes}
    else:
        assert sizes == real["mora_r_hat"] == {"q_proj": 16, "k_proj": 16, "v_proj": 16, "o_proj": 16,
                                               "gate_proj": 20, "up_proj": 20, "down_proj": 20}
        assert {m.name: m.sizes["type"] for m in counts.modules} == real["mora_type"]
    assert sum(m.params for m in counts.modules) == adapter and all(m.layers == 2 for m in counts.modules)


def test_memory_rules_by_hand_world_2():
    P, T, B = BASE + MORA, MORA + 2 * 128 * 32 + NORMS, BLOCK + MORA // 2  # 33280, 12800, 12528
    R = 2 * 128 * 32 + 32  # embeddings, head, final norm: 8224
    mems = {}
    for engine, stage in [("fsdp2", 2), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]:
        cfg = tiny("adapter.kind=mora", "adapter.r=4", f"parallel.engine={engine}", f"parallel.zero_stage={stage}")
        mems[engine, stage] = make_plan(cfg, world_size=2, distributed=True).memory

    m = mems["fsdp2", 2]  # fp32 shards + two gathered blocks and the root unit in fp32 (param_dtype float32)
    assert (m.params_stored, m.params_gathered, m.grads, m.master, m.moments) == (
        4 * P // 2, (2 * B + R) * 4, 4 * T // 2, 0, 8 * T // 2)
    assert m.params == 66560 + 133120 and m.optimizer == 51200
    assert m.grads_unsharded == 4 * T  # accumulation 2: full fp32 gradients until the last micro-batch
    m = mems["deepspeed", 1]
    assert (m.params, m.grads, m.master, m.moments) == (4 * P, 4 * T, 4 * T // 2, 8 * T // 2)
    assert (m.params, m.grads, m.optimizer) == (133120, 51200, 76800)
    m = mems["deepspeed", 2]
    assert (m.params, m.grads, m.optimizer) == (133120, 25600, 76800)
    m = mems["deepspeed", 3]  # ZeRO-3 gathers the stored fp32 partitions
    assert (m.params_stored, m.params_gathered, m.grads, m.optimizer) == (66560, 100224, 25600, 76800)
    for m in mems.values():
        assert m.total == m.params + m.grads + m.grads_unsharded + m.optimizer + m.activations
    assert all(m.grads_unsharded == 0 for (engine, _), m in mems.items() if engine == "deepspeed")

    # FSDP2 gathers in its compute dtype
    cfg = tiny("adapter.kind=mora", "adapter.r=4", "parallel.param_dtype=bfloat16")
    assert make_plan(cfg, world_size=2, distributed=True).memory.params_gathered == (2 * B + R) * 2
    # no launcher: one plain process, nothing sharded or gathered
    m = make_plan(cfg).memory
    assert (m.params, m.grads, m.optimizer) == (4 * P, 4 * T, 8 * T)


def test_activations_by_hand_and_checkpointing_lowers_them():
    cfg = tiny()
    b, s, h, f, a, V = 2, 16, 32, 64, 2, 128
    block = 4 * b * s * (6 * h + 2 * h + 4 * f) + 4 * b * a * s  # q/k/v/norms/residuals + SwiGLU + logsumexp
    head = 4 * 2 * b * s * h + 8 * b * s * V
    assert block == 65792 and head == 40960
    plain = activation_bytes(cfg.model, b, s, 4, checkpointing=False)
    ckpt = activation_bytes(cfg.model, b, s, 4, checkpointing=True)
    assert plain == 2 * block + head == 172544
    assert ckpt == 2 * 4 * b * s * h + block + head == 114944
    assert activation_bytes(cfg.model, b, s, 2, checkpointing=False) < plain  # bf16 halves the blocks

    mem = make_plan(tiny("parallel.activation_checkpointing=true")).memory
    assert (mem.activations, mem.activations_checkpointed) == (plain, ckpt)
    assert mem.activations_used == ckpt < mem.activations
    assert mem.total < make_plan(cfg).memory.total


def test_plan_batch_tokens_flops_and_text():
    from megamora.plan import flops_per_token

    cfg = tiny("adapter.kind=lora", "adapter.r=4", "parallel.engine=deepspeed", "parallel.zero_stage=3")
    plan = make_plan(cfg, world_size=2, distributed=True)
    assert (plan.engine, plan.grad_accum, plan.tokens_per_step, plan.total_tokens) == (
        "DeepSpeed ZeRO-3", 2, 8 * 16, 10 * 8 * 16)
    assert plan.total_flops == flops_per_token(cfg) * plan.total_tokens
    text = format_plan(plan)
    for needle in ("DeepSpeed ZeRO-3", "world size                2", "accumulation 2", "q_proj", "lora r=4",
                   f"{plan.params.total:,}", "optimizer state", "activations (ckpt)", "total"):
        assert needle in text, needle
    assert make_plan(tiny(), world_size=2, distributed=True).engine == "FSDP2"
    assert make_plan(tiny()).engine == "single process"
    with pytest.raises(ConfigError, match="global_batch_size=8"):
        make_plan(tiny(), world_size=3, distributed=True)


def dry_run(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full_env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, ENTRY, "--config", str(REPO / "configs/smoke/mora.yaml"), *args],
                          env=full_env, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_dry_run_prints_plan_and_creates_nothing(tmp_path):
    # the data and tokenizer need not exist for a dry run
    proc = dry_run(f"run_dir={tmp_path}/x", "--dry-run", f"data.local_dir={tmp_path}/nodata")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("single process", "world size                1", "9,180,032", "8,377,216", "158,464",
                   "r_hat=64 type=1", "parameters", "gradients", "optimizer state", "activations", "GiB"):
        assert needle in out, needle
    assert not (tmp_path / "x").exists()


def test_dry_run_deepspeed_zero3_world_2(tmp_path):
    proc = dry_run("--local_rank=0", f"run_dir={tmp_path}/x", "parallel.engine=deepspeed",
                   "--dry-run", "parallel.zero_stage=3", WORLD_SIZE="2", RANK="0")
    assert proc.returncode == 0, proc.stderr
    assert "DeepSpeed ZeRO-3" in proc.stdout and "world size                2" in proc.stdout
    assert "fp32 master" in proc.stdout and not (tmp_path / "x").exists()
    # only rank 0 prints
    proc = dry_run(f"run_dir={tmp_path}/x", "--dry-run", "--local-rank", "1", WORLD_SIZE="2", RANK="1")
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr


def test_dry_run_bad_config_is_one_line(tmp_path):
    for bad, needle in [("parallel.zero_stage=4", "parallel.zero_stage"), ("model.dimm=3", "model.dimm"),
                        ("micro_batch_size=3", "global_batch_size")]:
        proc = dry_run(f"run_dir={tmp_path}/x", "--dry-run", bad)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], \
            proc.stderr
        assert not (tmp_path / "x").exists()

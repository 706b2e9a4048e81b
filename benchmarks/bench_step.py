"""One whole training step of our model against peers at identical shapes, batch, dtype, threads and
trainable set: forward, loss, backward, AdamW step, zero_grad(set_to_none=True).

    .venv/bin/python benchmarks/bench_step.py                      # smoke size: 20m, seq 256, batch 8, fp32 + bf16
    .venv/bin/python benchmarks/bench_step.py --preset 60m         # the larger CPU-feasible size
    .venv/bin/python benchmarks/bench_step.py --memory             # peak memory of one step per method
    make bench-peers BENCH_ARGS="--preset 60m"                     # in .venv-bench, where torchtitan imports

Contenders (--contenders picks a subset; the order given is the ABBA order; --compile adds
ours-full+compile, ours-lora+compile and ours-mora1+compile: each block torch.compile'd as
parallel.compile does, compiled during the warm-up steps):
  ours-full     megamora's Llama, full rank, built as the trainer does (meta device, materialize) with
                build_optimizer; loss = model(tokens, targets=targets) (the fp32 mean cross-entropy;
                with an older model that has no `targets`, F.cross_entropy(logits.float()) instead).
  hf-full       transformers' LlamaForCausalLM at our shapes (megamora.hf.hf_config), attn_implementation
                "sdpa", use_cache off. Loss through its own `labels=` path with `shift_labels=targets`:
                the input is tokens[:, :-1] as for us and HF's ForCausalLMLoss skips its internal shift,
                so its loss covers exactly our seq_len positions per sequence (equal work, equal loss).
  titan-full    torchtitan's Llama3Model (torchtitan 0.3.0) from its own `_build_llama3_layers` with our
                dim / layers / heads / kv heads, ffn hidden dim set to ours (not its multiple_of rule),
                RoPE theta ours with no Llama-3.1 scaling, our norm eps and vocabulary, tied if ours is.
                Its default fused wqkv is kept (its fastest). Inner attention ScaledDotProductAttention
                (causal SDPA, as ours and HF): its LM builder only offers flex / varlen, which need
                torch.compile or CUDA. Weights from its own init_states; loss = F.cross_entropy(
                logits.float()), as its trainer computes it. Skipped, with the reason, where torchtitan
                does not import (it pins datasets < 4.8 and needs triton: use .venv-bench).
  hf-peft-lora  hf-full + PEFT LoRA on q, k, v, o, gate, up, down with our r, alpha and dropout.
  ours-lora     our LoRA at the same r / alpha / dropout.
  ours-mora1/6  our MoRA type 1 (sharing) / 6 (rotation) from the same adapter.r, which MoRA turns into
                r_hat itself (mora_r_hat): the trainable parameters equal LoRA's up to r_hat rounding.
  ours-lora_plus, ours-dora   our LoRA+ / DoRA at LoRA's r (DoRA adds one magnitude per output row).
  ours-asylora  our AsyLoRA at 2r: only B trains, so its trainable parameters r x out equal LoRA's
                r x (in + out) on the square projections.
  hf-peft-dora  hf-full + PEFT LoRA with use_dora=True (r / alpha / dropout as ours).
  hf-peft-lora_plus   hf-peft-lora with PEFT's create_loraplus_optimizer (fused AdamW, our lambda).
With adapters only the adapters train on both sides (--train-extras: embeddings, head and norms too,
as the paper's Table 3 does). Every contender: fp32 master weights, torch.optim.AdamW with our
hyperparameters, fused (the default of HF's Trainer and of torchtitan, and ours), bf16 through torch.autocast around forward + loss.

Timing: every contender is built once and warmed up; each of --rounds rounds runs every contender for
--steps steps, in the given order on even rounds and reversed on odd ones (ABBA), so drift on the machine
hits all alike. The table has the median over rounds of ms/step and tokens/s (batch x seq_len / step)
and the ratios of those medians, with the median of the per-round ratios in brackets.

Memory (--memory): each contender and dtype in a fresh subprocess (--memory-one NAME). On CPU:
`model` = resident memory after building the model and optimizer minus before (taken once the
contender's libraries are imported and each kind of op has run on tiny tensors); `peak` = the highest
resident memory (VmHWM, reset to the current RSS after the build via /proc/self/clear_refs) during
3 steps (the 2nd and later have AdamW's state alive) minus the same baseline; `step` = peak - model:
activations, gradients, optimizer state and temporaries. glibc's mmap threshold is pinned at 128 KiB
in the child so that freed large blocks go back to the OS and RSS follows the live bytes. On CUDA the
same three from torch.cuda.memory_allocated / max_memory_allocated. Ratios are to ours-lora.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megamora.adapters import apply_adapters
from megamora.compute import compile_blocks
from megamora.config import TrainConfig, load_config
from megamora.model import build_model, count_parameters, materialize
from megamora.optim import build_optimizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CONTENDERS = ("ours-full", "hf-full", "titan-full", "ours-lora", "hf-peft-lora", "ours-mora1", "ours-mora6")
# The paper's other baselines (adapter kinds) and PEFT's own versions of them; asked for by name.
BASELINES = ("ours-lora_plus", "hf-peft-lora_plus", "ours-asylora", "ours-dora", "hf-peft-dora")
# parallel.compile on (each block torch.compile'd, as the trainer does it): asked for by name or --compile
COMPILED = ("ours-full+compile", "ours-lora+compile", "ours-mora1+compile")
# (ours, theirs, what, goal): "speed" = their step time / ours (= our tokens/s over theirs), "time" = ours / theirs
GOALS = [("ours-full", "hf-full", "speed", 1.2), ("ours-full", "titan-full", "speed", 1.0),
         ("ours-lora", "hf-peft-lora", "speed", 1.2), ("ours-mora1", "ours-lora", "time", 1.00),
         ("ours-mora6", "ours-lora", "time", 1.10), ("ours-full+compile", "ours-full", "speed", 1.0),
         ("ours-lora+compile", "ours-lora", "speed", 1.0), ("ours-mora1+compile", "ours-mora1", "speed", 1.0),
         ("ours-lora_plus", "hf-peft-lora_plus", "speed", 1.2), ("ours-dora", "hf-peft-dora", "speed", 1.0),
         ("ours-lora_plus", "ours-lora", "time", 1.05), ("ours-asylora", "ours-lora", "time", 1.10),
         ("ours-dora", "ours-lora", "time", 1.5)]
MEMORY_STEPS = 3
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5


class Unavailable(RuntimeError):
    """A contender that cannot be built in this environment (a missing package); it is skipped."""


@dataclass
class Contender:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens, targets) -> scalar fp32 loss
    trainable: int


# ---------------------------------------------------------------------------------------------
# Shared with bench_utilisation.py: arguments, config, our model.


def add_common_args(p: argparse.ArgumentParser, rounds: int, steps: int) -> None:
    p.add_argument("--preset", default="20m", help="megamora.config.MODEL_PRESETS (9m 20m 35m 60m 130m ...)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--vocab", type=int, default=32100)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES),
                   help="compute dtype (bfloat16: torch.autocast over fp32 weights)")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--steps", type=int, default=steps, help="timed steps per contender per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender before the rounds")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)


def setup(args: argparse.Namespace) -> torch.device:
    torch.set_num_threads(args.threads)
    return torch.device(args.device)


def bench_config(args: argparse.Namespace, extra: list[str] = ()) -> TrainConfig:
    return load_config(None, ["run_dir=unused", f"model.preset={args.preset}", f"model.vocab_size={args.vocab}",
                              f"data.seq_len={args.seq_len}", f"micro_batch_size={args.batch}",
                              f"global_batch_size={args.batch}", "steps=1000000", "optim.warmup_steps=1", *extra])


def build_ours(cfg: TrainConfig, device: torch.device, seed: int = 0, name: str = "ours") -> Contender:
    """Our model as the trainer builds it: on meta, adapters swapped in, then materialized."""
    model = build_model(cfg.model, device="meta")
    apply_adapters(model, cfg.adapter)
    materialize(model, device, seed, cfg.model.init_std)
    model.train()
    if "targets" in inspect.signature(model.forward).parameters:
        loss = lambda x, y: model(x, targets=y)  # noqa: E731
    else:  # a model from before the fused loss: logits, then the trainer's loss
        loss = lambda x, y: F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())  # noqa: E731
    return Contender(name, model, build_optimizer(model, cfg.optim), loss, count_parameters(model, trainable_only=True))


def batch_for(cfg: TrainConfig, batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len + 1), generator=gen).to(device)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_step(c: Contender, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> None:
    with autocast(x.device, dtype):
        loss = c.loss(x, y)
    loss.backward()
    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(c: Contender, batch: torch.Tensor, dtype: torch.dtype, steps: int) -> float:
    """Seconds per step, averaged over `steps` consecutive steps."""
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # HF's loss views its labels
    sync(batch.device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(c, x, y, dtype)
    sync(batch.device)
    return (time.perf_counter() - start) / steps


def step_flops(c: Contender, batch: torch.Tensor, dtype: torch.dtype) -> int:
    """The matmul FLOPs of one training step (forward and backward, as torch's FLOP counter counts
    mm / bmm / addmm / attention), so that a time ratio can be read against the work ratio."""
    from torch.utils import flop_counter

    if torch.ops.aten.addmm_ not in flop_counter.flop_registry:  # in-place GEMMs (MoRA, the loss) count too
        flop_counter.register_flop_formula(torch.ops.aten.addmm_, get_raw=True)(flop_counter.addmm_flop)
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    with flop_counter.FlopCounterMode(display=False) as counter:
        train_step(c, x, y, dtype)
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# Peers


def peer_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             fused=True)


def build_hf(cfg: TrainConfig, device: torch.device, seed: int, variant: str | None, train_extras: bool) -> Contender:
    """hf-full (variant None), or with PEFT: "lora", "dora" (use_dora), "lora_plus" (LoRA+'s optimizer)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as e:  # noqa: BLE001 - any import failure means: skip this peer
        raise Unavailable(f"transformers is not importable here ({type(e).__name__}: {e})") from None
    from megamora.hf import hf_config

    fields = hf_config(cfg.model, max_position_embeddings=max(2048, cfg.data.seq_len))
    for key in ("architectures", "torch_dtype", "rope_scaling"):
        fields.pop(key, None)
    fields["use_cache"] = False  # training: no KV cache
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa"))
    name = "hf-full"
    optimizer = None
    if variant:
        try:
            from peft import LoraConfig, get_peft_model
            from peft.optimizers import create_loraplus_optimizer
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"peft is not importable here ({type(e).__name__}: {e})") from None
        a = cfg.adapter
        model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                                 target_modules=list(a.target_modules), bias="none",
                                                 use_dora=variant == "dora"))
        if train_extras:
            for n, p in model.named_parameters():
                if "embed_tokens" in n or "lm_head" in n or "norm" in n:
                    p.requires_grad_(True)
        if variant == "lora_plus":
            o = cfg.optim
            optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                                  loraplus_lr_ratio=a.loraplus_lr_ratio,
                                                  loraplus_weight_decay=o.weight_decay, fused=True)
        name = f"hf-peft-{variant}"
    model.train()

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x, labels=y, shift_labels=y).loss

    return Contender(name, model, optimizer or peer_optimizer(model, cfg, device), loss,
                     count_parameters(model, trainable_only=True))


def titan_unavailable() -> str | None:
    """Why torchtitan's Llama3 cannot be built here, or None."""
    try:
        import torchtitan.models.llama3  # noqa: F401
        from torchtitan.models.common import ScaledDotProductAttention  # noqa: F401
        from torchtitan.models.llama3 import _build_llama3_layers  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def build_titan(cfg: TrainConfig, device: torch.device, seed: int) -> Contender:
    reason = titan_unavailable()
    if reason:
        raise Unavailable(f"torchtitan is not importable here ({reason})")
    import dataclasses

    from torchtitan.models import llama3 as t
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, ScaledDotProductAttention

    m = cfg.model
    layers = t._build_llama3_layers(
        n_layers=m.n_layers, dim=m.dim, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
        hidden_dim=m.ffn_dim,  # ours exactly, instead of compute_ffn_hidden_dim's multiple_of rounding
        rope=ComplexRoPE.Config(dim=m.dim // m.n_heads, max_seq_len=cfg.data.seq_len, theta=m.rope_theta),
        fuse_qkv=True,  # torchtitan's default in every llama3 flavour
        attn_backend="flex")  # replaced below: its LM builder refuses "sdpa"
    for layer in layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
        layer.attention_norm = dataclasses.replace(layer.attention_norm, eps=m.norm_eps)
        layer.ffn_norm = dataclasses.replace(layer.ffn_norm, eps=m.norm_eps)
    config = t.Llama3Model.Config(
        dim=m.dim, vocab_size=m.vocab_size, enable_weight_tying=m.tie_embeddings,
        tok_embeddings=Embedding.Config(num_embeddings=m.vocab_size, embedding_dim=m.dim,
                                        param_init=t._EMBEDDING_SKIP_INIT if m.tie_embeddings else t._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=m.dim, eps=m.norm_eps, param_init=t._NORM_INIT),
        lm_head=Linear.Config(in_features=m.dim, out_features=m.vocab_size, param_init=t._output_linear_init(m.dim)),
        layers=layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = config.build()
    model.init_states(buffer_device=device)
    model.train()

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())

    return Contender("titan-full", model, peer_optimizer(model, cfg, device), loss, count_parameters(model, trainable_only=True))


def adapter_overrides(args: argparse.Namespace, kind: str, mora_type: str = "1", r_times: int = 1) -> list[str]:
    extras = "true" if args.train_extras else "false"
    out = [f"adapter.kind={kind}", f"adapter.r={args.r * r_times}", f"adapter.mora_type={mora_type}",
           f"adapter.train_embeddings={extras}", f"adapter.train_head={extras}", f"adapter.train_norms={extras}"]
    if args.alpha is not None:
        out.append(f"adapter.alpha={args.alpha}")
    if args.dropout is not None:
        out.append(f"adapter.dropout={args.dropout}")
    return out


def build(name: str, args: argparse.Namespace, device: torch.device) -> Contender:
    if name.endswith("+compile"):
        contender = build(name.removesuffix("+compile"), args, device)
        compile_blocks(contender.model)
        contender.name = name
        return contender
    lora = adapter_overrides(args, "lora")  # also fixes r / alpha / dropout for the HF peers
    if name == "ours-full":
        return build_ours(bench_config(args), device, args.seed, name)
    if name in ("ours-lora", "ours-mora1", "ours-mora6"):
        extra = lora if name == "ours-lora" else adapter_overrides(args, "mora", name[-1])
        return build_ours(bench_config(args, extra), device, args.seed, name)
    if name in ("ours-lora_plus", "ours-dora", "ours-asylora"):
        kind = name.removeprefix("ours-")
        extra = adapter_overrides(args, kind, r_times=2 if kind == "asylora" else 1)
        return build_ours(bench_config(args, extra), device, args.seed, name)
    if name == "hf-full" or name.startswith("hf-peft-"):
        variant = name.removeprefix("hf-peft-") if name != "hf-full" else None
        return build_hf(bench_config(args, lora), device, args.seed, variant, args.train_extras)
    if name == "titan-full":
        return build_titan(bench_config(args), device, args.seed)
    raise ValueError(f"unknown contender {name!r}; one of {list(CONTENDERS + BASELINES + COMPILED)}")


# ---------------------------------------------------------------------------------------------
# Timing


def time_contenders(contenders: list[Contender], batch: torch.Tensor, dtype: torch.dtype,
                    rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Per contender, seconds per step of every round (ABBA order)."""
    for c in contenders:
        if warmup:
            timed_steps(c, batch, dtype, warmup)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for i in range(rounds):
        for c in contenders if i % 2 == 0 else contenders[::-1]:
            times[c.name].append(timed_steps(c, batch, dtype, steps))
    return times


def print_times(times: dict[str, list[float]], trainable: dict[str, int], flops: dict[str, int], tokens: int,
                dtype_name: str) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{dtype_name}")
    head = (f"{'contender':18} {'trainable':>12} {'GFLOP/step':>10} {'ms/step':>9} {'tokens/s':>10} "
            f"{'min ms':>8} {'max ms':>8}")
    print(head)
    print("-" * len(head))
    for name, t in med.items():
        print(f"{name:18} {trainable[name]:>12,} {flops[name] / 1e9:>10.2f} {t * 1e3:>9.1f} {tokens / t:>10.0f} "
              f"{min(times[name]) * 1e3:>8.1f} {max(times[name]) * 1e3:>8.1f}")
    for ours, theirs, what, goal in GOALS:
        if ours not in med or theirs not in med:
            continue
        pairs = list(zip(times[ours], times[theirs]))
        if what == "speed":
            value, paired = med[theirs] / med[ours], statistics.median(b / a for a, b in pairs)
            label, ok, goal_text = f"tokens/s {ours} / {theirs}", value >= goal, f">= {goal:.2f}"
        else:
            value, paired = med[ours] / med[theirs], statistics.median(a / b for a, b in pairs)
            label, ok, goal_text = f"step time {ours} / {theirs}", value <= goal, f"<= {goal:.2f}"
        work = f"  (matmul FLOPs {flops[ours] / flops[theirs]:.3f}x)" if what == "time" else ""
        print(f"  {label:38} {value:6.3f} [{paired:6.3f}]  goal {goal_text}  {'met' if ok else 'NOT MET'}{work}")


# ---------------------------------------------------------------------------------------------
# Memory


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def preload(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Import what the contender's build imports and run each kind of op once on tiny tensors, so that
    library code and first-use runtime buffers are not counted as the model's or the step's bytes."""
    with contextlib.suppress(Exception):
        if name.startswith("hf"):
            import transformers.models.llama.modeling_llama  # noqa: F401
        if name.startswith("hf-peft"):
            import peft  # noqa: F401
        if name.startswith("titan"):
            import torchtitan.models.llama3  # noqa: F401
    lin = nn.Linear(64, 64, bias=False, device=device)
    opt = torch.optim.AdamW(lin.parameters(), fused=True)
    x = torch.randn(2, 2, 16, 64, device=device)
    with autocast(device, dtype):
        q = lin(x)
        y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        loss = F.cross_entropy(F.silu(y).flatten(0, 2).float(), torch.zeros(64, dtype=torch.long, device=device))
    loss.backward()
    opt.step()
    del lin, opt, x, q, y, loss
    sync(device)


def memory_one(args: argparse.Namespace, device: torch.device) -> dict:
    """Bytes of one contender in this (fresh) process: model + optimizer built, peak during steps."""
    import resource

    dtype = DTYPES[args.dtypes[0]]
    cuda = device.type == "cuda"
    preload(args.memory_one, device, dtype)
    before = torch.cuda.memory_allocated(device) if cuda else (_status_kib("VmRSS") or 0) * 1024
    c = build(args.memory_one, args, device)
    cfg = bench_config(args)
    batch = batch_for(cfg, args.batch, device, args.seed)
    sync(device)
    if cuda:
        model = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        model = (_status_kib("VmRSS") or 0) * 1024
        exact = _reset_peak_rss()
    timed_steps(c, batch, dtype, MEMORY_STEPS)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        how = "cuda allocated"
    else:
        hwm = _status_kib("VmHWM")
        peak = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        how = "RSS (VmHWM reset after build)" if exact and hwm is not None else "RSS (ru_maxrss, includes build)"
    return {"name": c.name, "trainable": c.trainable, "model": model - before, "peak": peak - before,
            "step": peak - model, "how": how}


def memory_table(args: argparse.Namespace, names: list[str], argv: list[str]) -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    passthrough = strip_options(argv, {"--memory", "--contenders", "--dtypes", "--rounds", "--steps", "--warmup"})
    mib = 2**20
    for dtype_name in args.dtypes:
        rows = {}
        for name in names:
            cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--memory-one", name, "--dtypes", dtype_name]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")]
            if proc.returncode != 0 or not lines:
                print(f"{name}: failed ({proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(lines[-1][len("MEMORY "):])
            if "skip" in row:
                print(f"skip {name}: {row['skip']}")
                continue
            rows[name] = row
        if not rows:
            continue
        how = next(iter(rows.values()))["how"]
        print(f"\n{dtype_name}: bytes above the process before the build, {how}, peak over {MEMORY_STEPS} steps")
        head = (f"{'contender':18} {'trainable':>12} {'model MiB':>10} {'step MiB':>9} {'peak MiB':>9} "
                f"{'peak/lora':>9} {'step/lora':>9}")
        print(head)
        print("-" * len(head))
        ref = rows.get("ours-lora")
        for name, r in rows.items():
            ratio = f"{r['peak'] / ref['peak']:>9.3f} {r['step'] / ref['step']:>9.3f}" if ref else ""
            print(f"{name:18} {r['trainable']:>12,} {r['model'] / mib:>10.1f} {r['step'] / mib:>9.1f} "
                  f"{r['peak'] / mib:>9.1f} {ratio}")


def strip_options(argv: list[str], drop: set[str]) -> list[str]:
    """argv without the options in `drop` and their values (values: the following non-option words)."""
    out, skipping = [], False
    for word in argv:
        if word.startswith("--"):
            skipping = word.split("=", 1)[0] in drop
            if skipping:
                continue
        elif skipping:
            continue
        out.append(word)
    return out


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, rounds=7, steps=3)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS + BASELINES + COMPILED))
    p.add_argument("--compile", action="store_true", help=f"add {', '.join(COMPILED)} (parallel.compile: true)")
    p.add_argument("--r", type=int, default=32, help="adapter.r of LoRA and MoRA (MoRA derives r_hat from it)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the config's)")
    p.add_argument("--dropout", type=float, default=None, help="adapter dropout (default: the config's)")
    p.add_argument("--train-extras", action="store_true",
                   help="with adapters, train embeddings, head and norms too (both sides)")
    p.add_argument("--memory", action="store_true", help="peak memory per contender (one subprocess each)")
    p.add_argument("--memory-one", metavar="NAME", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    device = setup(args)

    if args.memory_one:
        try:
            row = memory_one(args, device)
        except Unavailable as e:
            row = {"skip": str(e)}
        print("MEMORY " + json.dumps(row), flush=True)
        return

    cfg = bench_config(args)
    m = cfg.model
    tokens = args.batch * args.seq_len
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; model {args.preset} "
          f"(dim {m.dim}, ffn {m.ffn_dim}, {m.n_layers} layers, {m.n_heads} heads, vocab {m.vocab_size}); "
          f"batch {args.batch} x {args.seq_len} = {tokens} tokens/step; adapters r {args.r}"
          f"{', + embeddings/head/norms' if args.train_extras else ', adapters only'}")
    if args.compile:
        args.contenders = [*args.contenders, *(n for n in COMPILED if n not in args.contenders)]
    if "titan-full" in args.contenders and (reason := titan_unavailable()):
        print(f"skip titan-full: torchtitan is not importable here ({reason})")
        args.contenders = [n for n in args.contenders if n != "titan-full"]
    if args.memory:
        memory_table(args, args.contenders, argv)
        return

    contenders = []
    for name in args.contenders:
        try:
            contenders.append(build(name, args, device))
        except Unavailable as e:
            print(f"skip {name}: {e}")
    if "titan-full" in args.contenders:
        print("titan-full: torchtitan Llama3Model, fused wqkv (its default), complex RoPE, SDPA inner attention")
    print(f"median of {args.rounds} rounds x {args.steps} steps, ABBA order, after {args.warmup} warm-up steps; "
          f"ratios of medians [median of per-round ratios]")
    trainable = {c.name: c.trainable for c in contenders}
    batch = batch_for(cfg, args.batch, device, args.seed)
    for dtype_name in args.dtypes:
        flops = {c.name: step_flops(c, batch, DTYPES[dtype_name]) for c in contenders}
        times = time_contenders(contenders, batch, DTYPES[dtype_name], args.rounds, args.steps, args.warmup)
        print_times(times, trainable, flops, tokens, dtype_name)


if __name__ == "__main__":
    main()

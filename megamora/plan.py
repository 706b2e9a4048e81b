"""The plan of a run before it starts: parallelism, batch, tokens, parameters, FLOPs and an estimate
of the memory each rank needs. Everything is computed from the config and a meta-device model (no
weights, no process group, no data); `launch/pretrain.py --dry-run` prints `format_plan(make_plan(...))`.

    plan = make_plan(cfg, world_size=8, distributed=True)
    plan.memory.total / 2**30   # GiB per rank

Memory rules, in bytes per rank. P = all parameters, T = trainable parameters, W = world size,
B = the parameters of one transformer block (frozen base weights and adapters included). A shard
of n elements is ceil(n / W) (both engines pad to equal shards). Parameters are stored in fp32 on
both engines; `parallel.param_dtype` is only the compute dtype. AdamW keeps two fp32 moments per
trainable parameter; frozen parameters have neither gradients nor optimizer state.

    engine             parameters   gathered copy              gradients   master     moments
    single process     4 P          -                          4 T         -          8 T
    FSDP2              4 P / W      (2 B + R) x param_dtype    4 T / W     -          8 T / W
    DeepSpeed ZeRO-1   4 P          -                          4 T         4 T / W    8 T / W
    DeepSpeed ZeRO-2   4 P          -                          4 T / W     4 T / W    8 T / W
    DeepSpeed ZeRO-3   4 P / W      2 B x 4 (fp32)             4 T / W     4 T / W    8 T / W

FSDP2 with HSDP (parallel.shard_size = S < W) shards over the S ranks of a group: read W as S in
its row. With gradient accumulation, FSDP2 also holds unsharded gradients, r T bytes (r: reduce_dtype
bytes), from the first micro-batch's backward until the last one's reduce-scatter, unless
parallel.reduce_scatter_every_micro_batch shards them every micro-batch (`grads_unsharded`).

"Gathered copy": a sharded engine all-gathers one block to compute it while prefetching the next,
so about two blocks are unsharded at a time; FSDP2's root unit (R: embeddings, final norm, head)
stays gathered from the start of forward to the end of backward. FSDP2 gathers in param_dtype (its
mixed-precision policy); ZeRO-3 gathers the stored fp32 partitions and releases the root's modules
after use. Not counted: communication buckets, transient casts, the allocator's fragmentation.

Activations, in the compute dtype (e bytes: 4 float32, 2 bfloat16), for micro batch b, sequence
s, dim h, ffn dim f, heads a, key/value width h_kv = n_kv_heads x head_dim, vocabulary V. Saved
for backward by one block (`block_activation_bytes`):

    attention: block input (residual and norm input), norm output (q/k/v input), q, k, v after
               rotary, attention output (o_proj input)          e b s (4 h + 2 h_kv)
               + SDPA's logsumexp                               4 b a s
    SwiGLU:    residual after attention, norm output (gate/up input), gate, up, silu(gate),
               silu(gate) x up (down_proj input)                e b s (2 h + 4 f)

The b a s^2 score matrix is not counted: SDPA runs a flash / memory-efficient kernel (the CPU flash
kernel, CUDA flash for bf16, memory-efficient for fp32) that saves only the output and logsumexp.
Outside the blocks (`head_activation_bytes`): the final norm's input and output, e 2 b s h, and
the logits in fp32 plus their gradient, 8 b s V. With activation checkpointing each block keeps
only its input, e b s h, and one block's full activations exist again during its recompute.
Not counted: the adapters' own saved tensors (dropout copies, LoRA's A x, MoRA's compressed
input), RMSNorm's fp32 internals, the input ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megamora.config import ConfigError, ModelConfig, TrainConfig

Mode = Literal["single", "fsdp2", "zero1", "zero2", "zero3"]

ENGINE_NAMES: dict[str, str] = {
    "single": "single process",
    "fsdp2": "FSDP2",
    "zero1": "DeepSpeed ZeRO-1",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
FP32 = 4
GATHERED_BLOCKS = 2  # the block being computed and the prefetched next one


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module type (q_proj, ...) across all layers."""

    name: str
    kind: str  # adapter.kind
    layers: int  # how many layers adapt this module type
    params: int  # adapter parameters of this type, all layers together
    sizes: dict  # what the kind describes ({"r": 8}; MoRA {"r_hat": 115, "type": "1"}); lists where layers differ


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    adapter: int
    adapter_kind: str  # none | lora | mora
    block: int  # all parameters of one transformer block (what a sharded engine gathers)
    root: int  # embeddings, final norm and head (FSDP2's root unit)
    modules: list[AdapterModule] = field(default_factory=list)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank; the components are disjoint, the properties sum them."""

    params_stored: int  # the fp32 parameters (or this rank's shard of them)
    params_gathered: int  # unsharded copies of the blocks in flight (sharded engines)
    grads: int
    # FSDP2 with gradient accumulation: the unsharded gradients (reduce_dtype) held from the first
    # micro-batch's backward to the last one's reduce-scatter (0 with reduce_scatter_every_micro_batch)
    grads_unsharded: int
    master: int  # DeepSpeed's fp32 master copy of the trainable parameters
    moments: int  # AdamW exp_avg + exp_avg_sq (an optimizer-level method: all its state)
    activations: int  # at this micro batch, without activation checkpointing
    activations_checkpointed: int  # the same with activation checkpointing
    activation_checkpointing: bool  # which of the two the run uses

    @property
    def params(self) -> int:
        return self.params_stored + self.params_gathered

    @property
    def optimizer(self) -> int:
        return self.master + self.moments

    @property
    def activations_used(self) -> int:
        return self.activations_checkpointed if self.activation_checkpointing else self.activations

    @property
    def total(self) -> int:
        return self.params + self.grads + self.grads_unsharded + self.optimizer + self.activations_used


@dataclass(frozen=True)
class Plan:
    mode: Mode
    engine: str  # human-readable, e.g. "DeepSpeed ZeRO-3"
    world_size: int
    shard_size: int  # ranks that shard one copy of the model (the world size but with HSDP)
    micro_batch: int  # sequences per rank per forward/backward
    global_batch: int  # sequences per optimizer step
    grad_accum: int
    seq_len: int
    steps: int
    tokens_per_step: int
    total_tokens: int
    params: ParamCounts
    flops_per_token: float
    flops: StepFlops  # flops_per_token by where it goes
    total_flops: float
    param_dtype: str
    memory: MemoryEstimate
    optimizer: str = "adamw"  # optim.name


# ---------------------------------------------------------------------------------------------
# Parallelism and parameter counts


def engine_mode(engine: str, zero_stage: int, distributed: bool) -> Mode:
    """fsdp2 without a launcher (no WORLD_SIZE) is a plain single process: the model is not sharded."""
    if engine == "deepspeed":
        return f"zero{zero_stage}"  # type: ignore[return-value]
    return "fsdp2" if distributed else "single"


def count_params(cfg: TrainConfig) -> ParamCounts:
    """Build the model with its adapters on the meta device (no memory, no init) and count."""
    from megamora.adapters import apply_adapters, iter_adapters
    from megamora.model import build_model, count_parameters

    model = build_model(cfg.model, device="meta")
    try:
        summary = apply_adapters(model, cfg.adapter)
    except ValueError as e:  # e.g. an r that gives MoRA an r_hat < 1
        raise ConfigError(str(e).splitlines()[0]) from e
    by_type: dict[str, list] = {}
    for name, layer in iter_adapters(model):
        by_type.setdefault(name.rsplit(".", 1)[-1], []).append(layer)
    modules = [_adapter_module(short, layers) for short, layers in by_type.items()]
    return ParamCounts(
        total=summary["total_params"],
        trainable=summary["trainable_params"],
        adapter=summary["adapter_params"],
        adapter_kind=summary["adapter_kind"],
        block=count_parameters(model.layers[0]),
        root=summary["total_params"] - sum(count_parameters(layer) for layer in model.layers),
        modules=modules,
    )


def _adapter_module(short: str, layers: list) -> AdapterModule:
    def one_or_all(values):
        values = sorted(set(values))
        return values[0] if len(values) == 1 else values

    described = [layer.describe() for layer in layers]
    return AdapterModule(
        name=short,
        kind=layers[0].kind,
        layers=len(layers),
        params=sum(p.numel() for layer in layers for _, p in layer.own_parameters()),
        sizes={key: one_or_all(d[key] for d in described) for key in described[0]},
    )


# ---------------------------------------------------------------------------------------------
# FLOPs per token of a training step (forward + backward), counting what is computed. A GEMM of an
# (in, out) weight costs 2 in out per token forward, 2 in out for its input's gradient (only where
# something before it trains) and 2 in out for its weight's gradient (only if the weight trains):
# 6 per parameter for full-rank training, 4 for a frozen base weight. The adapters add their own
# GEMMs; causal attention costs 2 s h per token forward (half of the s x s scores) and twice that
# backward. Not counted: elementwise work, activation-checkpointing recomputation (MFU counts model
# FLOPs, not hardware FLOPs), MoRA's fp32 alignment padding.


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per token by where they go; `total` is what MFU divides by the peak."""

    base: float  # the model's own linear layers and the output head
    adapters: float  # LoRA's A and B, MoRA's M
    attention: float

    @property
    def total(self) -> float:
        return self.base + self.adapters + self.attention


def _trains(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def linear_flops(layer, input_grad: bool, tokens: int) -> tuple[int, int, bool]:
    """(base, adapter) FLOPs per token of one linear layer, plain or adapted, and whether its output
    needs a gradient (its input does, or something in it trains)."""
    from megamora.adapters.base import AdapterLinear

    base = layer.base if isinstance(layer, AdapterLinear) else layer
    n = base.in_features * base.out_features
    base_flops = 2 * n * (1 + input_grad + base.weight.requires_grad)
    extra = layer.flops_per_token(input_grad, tokens) if base is not layer else 0
    return base_flops, extra, input_grad or _trains(layer)


def block_flops(block, seq_len: int, input_grad: bool, tokens: int | None = None) -> tuple[StepFlops, bool]:
    """One transformer block, following which activations need a gradient; returns whether its output does."""
    base = extra = 0

    def run(layers, grad_in: bool) -> bool:
        nonlocal base, extra
        out = False
        for layer in layers:
            b, e, g = linear_flops(layer, grad_in, tokens or seq_len)
            base, extra, out = base + b, extra + e, out or g
        return out

    attn, mlp = block.self_attn, block.mlp
    qkv_grad = run([attn.q_proj, attn.k_proj, attn.v_proj], input_grad or _trains(block.input_layernorm))
    attention = 2 * seq_len * attn.n_heads * attn.head_dim * (3 if qkv_grad else 1)
    h_grad = run([attn.o_proj], qkv_grad) or input_grad  # (run first: no short circuit)
    act_grad = run([mlp.gate_proj, mlp.up_proj], h_grad or _trains(block.post_attention_layernorm))
    out_grad = run([mlp.down_proj], act_grad) or h_grad
    return StepFlops(base, extra, attention), out_grad


def model_flops(model, seq_len: int, tokens: int | None = None) -> StepFlops:
    """FLOPs per token of a training step of `model` (any device, meta included) at this sequence length."""
    base = extra = attention = 0.0
    grad = model.embed_tokens.weight.requires_grad
    for block in model.layers:
        f, grad = block_flops(block, seq_len, grad, tokens)
        base, extra, attention = base + f.base, extra + f.adapters, attention + f.attention
    head = model.lm_head
    head_flops = 2 * head.in_features * head.out_features * (
        1 + (grad or _trains(model.norm)) + head.weight.requires_grad)
    return StepFlops(base + head_flops, extra, attention)


def step_flops(cfg: TrainConfig) -> StepFlops:
    """The run's FLOPs per token, from its model and adapters built on the meta device."""
    from megamora.adapters import apply_adapters
    from megamora.model import build_model

    model = build_model(cfg.model, device="meta")
    try:
        apply_adapters(model, cfg.adapter)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    return model_flops(model, cfg.data.seq_len, cfg.micro_batch_size * cfg.data.seq_len)


def flops_per_token(cfg: TrainConfig) -> float:
    return step_flops(cfg).total


# ---------------------------------------------------------------------------------------------
# Memory per rank: the rules of the module docstring, one function per line of the table


def shard(n: int, world_size: int) -> int:
    """Elements per rank of n elements split W ways (padded to equal shards)."""
    return -(-n // world_size)


def param_bytes(counts: ParamCounts, mode: Mode, world_size: int, param_dtype: str) -> tuple[int, int]:
    """(stored, gathered) parameter bytes per rank."""
    if mode in ("single", "zero1", "zero2"):
        return FP32 * counts.total, 0
    stored = FP32 * shard(counts.total, world_size)
    if mode == "fsdp2":  # gathers in param_dtype; the root unit stays gathered through forward and backward
        return stored, (GATHERED_BLOCKS * counts.block + counts.root) * DTYPE_BYTES[param_dtype]
    return stored, GATHERED_BLOCKS * counts.block * FP32  # ZeRO-3 gathers the stored fp32 partitions


def grad_bytes(counts: ParamCounts, mode: Mode, world_size: int) -> int:
    # ZeRO-1 and a single process keep full gradients; the others reduce-scatter them.
    if mode in ("single", "zero1"):
        return FP32 * counts.trainable
    return FP32 * shard(counts.trainable, world_size)


def unsharded_grad_bytes(counts: ParamCounts, mode: Mode, accum: int, cfg: TrainConfig) -> int:
    """FSDP2 skips the reduce-scatter on all but the last micro-batch, so every rank accumulates
    full gradients in reduce_dtype (FSDP2 upcasts the param_dtype gradients to it) until then."""
    if mode != "fsdp2" or accum == 1 or cfg.parallel.reduce_scatter_every_micro_batch:
        return 0
    return DTYPE_BYTES[cfg.parallel.reduce_dtype] * counts.trainable


def optimizer_bytes(counts: ParamCounts, mode: Mode, world_size: int) -> tuple[int, int]:
    """(fp32 master copy, AdamW moments) bytes per rank."""
    if mode == "single":
        return 0, 2 * FP32 * counts.trainable
    part = shard(counts.trainable, world_size)
    master = FP32 * part if mode.startswith("zero") else 0  # FSDP2 updates the fp32 params in place
    return master, 2 * FP32 * part


def optimizer_state_bytes(cfg: TrainConfig, world_size: int, adamw_moments: int) -> int:
    """AdamW's moments, or the state of the optimizer-level method `optim.name` (GaLore: an m x r
    projector and r x n moments per projected matrix, megamora.optimizers)."""
    from megamora.optimizers import optimizer_class

    held = optimizer_class(cfg.optim.name).state_bytes(cfg, world_size)
    return adamw_moments if held is None else held


def block_activation_bytes(m: ModelConfig, batch: int, seq_len: int, dtype_bytes: int) -> int:
    """Tensors one transformer block saves for backward (see the module docstring)."""
    h, f, a = m.dim, m.ffn_dim, m.n_heads
    h_kv = (m.n_kv_heads or m.n_heads) * (m.dim // m.n_heads)
    tokens = batch * seq_len
    attention = dtype_bytes * tokens * (4 * h + 2 * h_kv) + FP32 * batch * a * seq_len  # + logsumexp
    swiglu = dtype_bytes * tokens * (2 * h + 4 * f)
    return attention + swiglu


def head_activation_bytes(m: ModelConfig, batch: int, seq_len: int, dtype_bytes: int) -> int:
    """Final norm input and output, plus the fp32 logits and their gradient."""
    tokens = batch * seq_len
    return dtype_bytes * 2 * tokens * m.dim + 2 * FP32 * tokens * m.vocab_size


def activation_bytes(m: ModelConfig, batch: int, seq_len: int, dtype_bytes: int, checkpointing: bool) -> int:
    block = block_activation_bytes(m, batch, seq_len, dtype_bytes)
    head = head_activation_bytes(m, batch, seq_len, dtype_bytes)
    if not checkpointing:
        return m.n_layers * block + head
    # Only each block's input is kept; one block's activations come back during its recompute.
    return m.n_layers * dtype_bytes * batch * seq_len * m.dim + block + head


def estimate_memory(counts: ParamCounts, cfg: TrainConfig, mode: Mode, world_size: int, accum: int = 1) -> MemoryEstimate:
    p = cfg.parallel
    if mode == "fsdp2":  # HSDP: each shard group holds one copy of the model
        world_size = p.mesh_shape(world_size)[1]
    stored, gathered = param_bytes(counts, mode, world_size, p.param_dtype)
    master, moments = optimizer_bytes(counts, mode, world_size)
    moments = optimizer_state_bytes(cfg, world_size if mode != "single" else 1, moments)
    e = DTYPE_BYTES[p.param_dtype]
    b, s = cfg.micro_batch_size, cfg.data.seq_len
    return MemoryEstimate(
        params_stored=stored,
        params_gathered=gathered,
        grads=grad_bytes(counts, mode, world_size),
        grads_unsharded=unsharded_grad_bytes(counts, mode, accum, cfg),
        master=master,
        moments=moments,
        activations=activation_bytes(cfg.model, b, s, e, checkpointing=False),
        activations_checkpointed=activation_bytes(cfg.model, b, s, e, checkpointing=True),
        activation_checkpointing=p.activation_checkpointing,
    )


# ---------------------------------------------------------------------------------------------
# The whole plan


def make_plan(cfg: TrainConfig, world_size: int = 1, distributed: bool = False) -> Plan:
    """The plan of `cfg` on `world_size` ranks. `distributed`: launched by torchrun / deepspeed
    (WORLD_SIZE set), so fsdp2 shards even on one rank. Raises ConfigError for a global batch that
    the ranks cannot split or adapters the model cannot take."""
    from megamora.train import grad_accum_steps

    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be positive")
    try:
        accum = grad_accum_steps(cfg, world_size)
        cfg.parallel.mesh_shape(world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    mode = engine_mode(cfg.parallel.engine, cfg.parallel.zero_stage, distributed)
    counts = count_params(cfg)
    tokens_per_step = cfg.global_batch_size * cfg.data.seq_len
    flops = step_flops(cfg)
    fpt = flops.total
    return Plan(
        mode=mode,
        engine=ENGINE_NAMES[mode],
        world_size=world_size,
        shard_size=cfg.parallel.mesh_shape(world_size)[1] if mode == "fsdp2" else world_size,
        micro_batch=cfg.micro_batch_size,
        global_batch=cfg.global_batch_size,
        grad_accum=accum,
        seq_len=cfg.data.seq_len,
        steps=cfg.steps,
        tokens_per_step=tokens_per_step,
        total_tokens=cfg.steps * tokens_per_step,
        params=counts,
        flops_per_token=fpt,
        flops=flops,
        total_flops=fpt * cfg.steps * tokens_per_step,
        param_dtype=cfg.parallel.param_dtype,
        memory=estimate_memory(counts, cfg, mode, world_size, accum),
        optimizer=cfg.optim.name,
    )


# ---------------------------------------------------------------------------------------------
# Text


def _count(n: int) -> str:
    """9180032 -> '9.18M (9,180,032)'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit} ({n:,})"
    return f"{n:,}"


def _gib(n: int) -> str:
    return f"{n / 2**30:9.3f} GiB"


def _adapter_line(mod: AdapterModule) -> str:
    size = " ".join(f"{k}={v}" for k, v in mod.sizes.items())
    return f"  {mod.name:<24}{mod.kind} {size}, {mod.layers} layers, {mod.params:,} params"


def _state_label(plan: Plan) -> str:
    from megamora.optimizers import optimizer_class

    method = optimizer_class(plan.optimizer)
    return "AdamW moments" if method.name == "adamw" else f"{method.label}: projections and low-rank moments"


def format_plan(plan: Plan) -> str:
    """The plan as the lines `launch/pretrain.py --dry-run` prints."""
    pc, mem = plan.params, plan.memory
    ckpt = "on" if mem.activation_checkpointing else "off"
    lines = [
        f"{'engine':<26}{plan.engine}",
        f"{'world size':<26}{plan.world_size}"
        + (f" (HSDP: {plan.world_size // plan.shard_size} replicas, shard groups of {plan.shard_size})"
           if plan.shard_size < plan.world_size else ""),
        f"{'batch':<26}micro {plan.micro_batch} x world {plan.world_size} x accumulation {plan.grad_accum}"
        f" = global {plan.global_batch} sequences of {plan.seq_len} tokens",
        f"{'gradient accumulation':<26}{plan.grad_accum}",
        f"{'tokens':<26}{plan.tokens_per_step:,} per step, {plan.total_tokens:,} in total ({plan.steps:,} steps)",
        f"{'parameters':<26}total {_count(pc.total)}, trainable {_count(pc.trainable)}"
        f" ({pc.trainable / pc.total:.1%})",
        f"{'adapter parameters':<26}{_count(pc.adapter)} ({pc.adapter_kind})",
        *(_adapter_line(m) for m in pc.modules),
        f"{'FLOPs per token':<26}{plan.flops_per_token:.4g}  (linear layers and head {plan.flops.base:.4g}, adapters "
        f"{plan.flops.adapters:.4g}, attention {plan.flops.attention:.4g}; what MFU counts)",
        f"{'training FLOPs':<26}{plan.total_flops:.4g}",
        f"memory per rank (estimate, {plan.param_dtype} compute, activation checkpointing {ckpt}):",
        f"  {'parameters':<24}{_gib(mem.params)}"
        + (f"  (stored {mem.params_stored / 2**30:.3f} + gathered blocks {mem.params_gathered / 2**30:.3f})"
           if mem.params_gathered else ""),
        f"  {'gradients':<24}{_gib(mem.grads)}",
        *([f"  {'unsharded gradients':<24}{_gib(mem.grads_unsharded)}  (held across micro-batches; "
           "0 with parallel.reduce_scatter_every_micro_batch=true)"] if mem.grads_unsharded else []),
        f"  {'optimizer state':<24}{_gib(mem.optimizer)}"
        + (f"  (fp32 master {mem.master / 2**30:.3f} + AdamW moments {mem.moments / 2**30:.3f})"
           if mem.master else f"  ({_state_label(plan)})"),
        f"  {'activations':<24}{_gib(mem.activations)}{'  <- used' if not mem.activation_checkpointing else ''}",
        f"  {'activations (ckpt)':<24}{_gib(mem.activations_checkpointed)}"
        f"{'  <- used' if mem.activation_checkpointing else ''}",
        f"  {'total':<24}{_gib(mem.total)}",
    ]
    return "\n".join(lines)

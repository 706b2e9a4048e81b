"""Typed run configuration: dataclasses, YAML files, dotted command-line overrides.

A config is built in layers, later ones winning: the dataclass defaults, YAML files in the order
given (a base file, then per-method deltas), and `section.key=value` overrides. A model preset (e.g.
`model.preset: 250m`, in any of the files) fills the shape fields that neither a YAML file nor the
command line set. Unknown keys and badly typed values raise
`ConfigError` with one line naming them, before anything is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A bad key, type or value in the run configuration."""


# Shapes of the ReLoRA / MoRA model ladder: (dim, ffn_dim, n_layers, n_heads).
MODEL_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "9m": (128, 352, 4, 4),
    "20m": (256, 688, 4, 4),
    "35m": (384, 1024, 6, 8),
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "250m": (768, 2560, 24, 16),
    "350m": (1024, 2736, 24, 16),
    "1b": (2048, 5461, 24, 32),
    "3b": (2560, 6848, 32, 32),
    "7b": (4096, 11008, 32, 32),
}


@dataclass
class ModelConfig:
    preset: Optional[str] = None  # fills dim / ffn_dim / n_layers / n_heads not given explicitly
    dim: int = 128
    ffn_dim: int = 352
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: multi-head attention; fewer: grouped-query attention
    vocab_size: int = 32100  # t5-base tokenizer with its 100 sentinel tokens
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02


@dataclass
class AdapterConfig:
    kind: str = "none"  # none, or a kind of megamora.adapters.ADAPTERS: lora | mora | lora_plus | asylora | dora
    r: int = 128
    alpha: float = 64.0  # LoRA only; MoRA has no scaling (method-facts)
    dropout: float = 0.05
    mora_type: str = "1"  # 1, 2, 3, 4, 6 or sharing | rotation | decouple | truncation
    r_hat_rule: str = "round"  # round (released code) | floor (paper)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # Options of one kind, prefixed with it (validated by the kind's check_config).
    loraplus_lr_ratio: float = 4.0  # lora_plus: B's LR / A's (lambda; the MoRA paper searched {2, 4})
    dora_detach_norm: bool = True  # dora: no gradient through ||W + s B A|| (DoRA Sec. 4.3; PEFT's choice)
    # Parts of the model outside the adapters that keep training (Table 3 trains all three).
    train_embeddings: bool = True
    train_head: bool = True
    train_norms: bool = True


@dataclass
class RestartConfig:
    every: int = 0  # merge-and-reinit every N steps; 0 disables (plain LoRA / MoRA)
    mora_types: list[str] = field(default_factory=lambda: ["1", "2", "3", "4"])  # cycled after each merge
    optimizer_reset: str = "delete"  # delete | random_prune | magnitude_prune
    prune_ratio: float = 0.999  # fraction of moments zeroed by the prune strategies
    lr: str = "restart_warmup"  # restart_warmup | jagged_cosine
    warmup: int = 50  # re-warmup steps after each restart


@dataclass
class DataConfig:
    # Hub mode (local_dir unset): stream `dataset`/`dataset_config` with `datasets`.
    dataset: str = "allenai/c4"
    dataset_config: str = "en"
    # Local mode: a folder of C4-format json.gz shards, read with the two globs below.
    local_dir: Optional[str] = None
    train_glob: str = "c4-train.*.json.gz"
    validation_glob: str = "c4-validation.*.json.gz"
    tokenizer: str = "t5-base"  # Hub name, or a path to spiece.model / tokenizer.json
    seq_len: int = 512
    shuffle_buffer: int = 1000  # documents; 0 keeps the stream order
    encode_batch: int = 64  # documents tokenized per call
    # The validation set is this many interleaved pieces (document j goes to piece j % N); each rank
    # tokenizes only its pieces, and the set is the same for any world size. 1: one stream in order,
    # the set every earlier run was evaluated on (so their perplexities stay comparable); the table3
    # configs, whose 100 M validation tokens would take every rank minutes, use 64.
    validation_pieces: int = 1
    # Batches a background thread prepares ahead per data stream (the trainer takes one per stream
    # per optimizer step: this many steps ahead); 0 reads them on the training thread. Same batches.
    # Unset: 2 on CUDA (the host reads while the GPU computes), 0 on CPU, where the reader competes
    # with the step for the cores (0.65x measured: benchmarks/bench_data.py --step matmul).
    prefetch_batches: Optional[int] = None
    # Longer documents are skipped (counted as skipped_too_long): bounds reader memory and the data
    # state in checkpoints. Far above real C4 documents (the longest of the 2000 sampled: 61k characters).
    max_doc_chars: int = 1_000_000
    # Hub mode with a file-based builder (dataset=json, or hf:// URLs): split name -> file glob.
    data_files: Optional[dict[str, str]] = None


@dataclass
class GaLoreConfig:
    """optim.name=galore_adamw (Zhao et al. 2024): the gradient of each 2-D block weight projected onto
    its top-`rank` singular vectors, refreshed every `update_proj_gap` steps; defaults as published."""

    rank: int = 128  # the paper's 60M rank (its Table 2: 128 / 256 / 256 / 512 at 60M / 130M / 350M / 1B)
    update_proj_gap: int = 200  # T: steps between SVD refreshes of the projector
    scale: float = 0.25  # alpha: the projected-back update's scale
    proj_type: str = "std"  # std | reverse_std | left | right (std: project the smaller side)


@dataclass
class ApolloConfig:
    """optim.name=apollo_adamw (Zhu et al. 2025): low-rank moments of a random projection only give a
    channel-wise (or tensor-wise) scaling of the raw gradient; defaults as the released recipe."""

    rank: int = 256
    update_proj_gap: int = 200  # steps between re-draws of the random projection
    scale: float = 1.0  # the update is multiplied by sqrt(scale) (as the released code does)
    proj: str = "random"  # random (APOLLO) | svd (GaLore's projector)
    scale_type: str = "channel"  # channel | tensor (APOLLO-Mini: rank 1, scale 128, tensor)
    scale_front: bool = False  # apply sqrt(scale) before the norm-growth limiter instead of after
    norm_growth_limiter: bool = True  # Fira's limiter: the scaled gradient's norm grows <= 1.01x per step


@dataclass
class OptimConfig:
    # adamw (torch's fused AdamW) or an optimizer-level method of megamora.optimizers.OPTIMIZERS
    name: str = "adamw"
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # 0 disables
    galore: GaLoreConfig = field(default_factory=GaLoreConfig)
    apollo: ApolloConfig = field(default_factory=ApolloConfig)


@dataclass
class ParallelConfig:
    engine: str = "fsdp2"  # fsdp2 | deepspeed (megamora.engines)
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 1 | 2 | 3 (ignored by fsdp2)
    # A DeepSpeed JSON file whose keys override the config generated from this run's settings
    # (offload, bucket sizes...); nested sections merge key by key.
    deepspeed_config: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda
    # How long a collective waits for the slowest rank before the run fails (init_process_group's
    # timeout): covers rank skew at start-up, evals and checkpoint writes to a shared filesystem.
    timeout_s: int = 1800
    # Internal precision of fp32 matmuls on CUDA (torch.set_float32_matmul_precision): high = TF32
    # tensor cores, highest = true fp32, medium = bf16. CPU runs always compute fp32 matmuls in fp32.
    fp32_matmul_precision: str = "high"
    param_dtype: str = "float32"  # compute dtype of the sharded params: float32 | bfloat16
    reduce_dtype: str = "float32"  # gradient reduce-scatter dtype
    activation_checkpointing: bool = False
    # torch.compile every transformer block (regional compilation, as torchtitan does; megamora.compute).
    compile: bool = False
    # Tokens per chunk of the output layer + cross-entropy (megamora.loss); 0: from the full logits.
    loss_chunk_size: int = 1024
    # FSDP2 only. Ranks that hold one sharded copy of the model (e.g. the GPUs of one node); the
    # world is world_size / shard_size such groups, which all-reduce gradients (HSDP: every block's
    # all-gather stays inside a group). 0: all ranks (plain FSDP).
    shard_size: int = 0
    # FSDP2 only. With gradient accumulation, reduce-scatter gradients after every micro-batch
    # instead of keeping them unsharded (reduce_dtype bytes per trainable parameter, per rank)
    # until the last: less memory, accumulation steps x the gradient traffic.
    reduce_scatter_every_micro_batch: bool = False

    def mesh_shape(self, world_size: int) -> tuple[int, int]:
        """(replicate, shard): the FSDP2 device mesh of `world_size` ranks."""
        shard = self.shard_size or world_size
        if world_size % shard:
            raise ValueError(f"parallel.shard_size={self.shard_size} does not divide the world size {world_size}")
        return world_size // shard, shard


@dataclass
class LoggingConfig:
    log_every: int = 10
    progress_bar: bool = True
    wandb_mode: str = "disabled"  # disabled | offline | online
    wandb_project: str = "megamora"


@dataclass
class TrainConfig:
    run_dir: str = MISSING
    seed: int = 0
    steps: int = 10000
    global_batch_size: int = 1024  # sequences per optimizer step, across all ranks
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    eval_every: int = 1000  # 0: evaluate only at the end
    eval_tokens: int = 10_000_000
    final_eval_tokens: Optional[int] = None  # None: same as eval_tokens
    save_every: int = 1000  # 0: save only at the end
    # Steps between the ranks' agreement on a stop signal (a collective and a host sync): a signal
    # stops the run at the next multiple of this after it arrives.
    stop_check_every: int = 10
    keep_last: int = 2
    # ReLoRA's full-rank warm start: a checkpoint (or run directory: its newest checkpoint) of a
    # full-rank run, or a Hugging Face LlamaForCausalLM folder (safetensors), whose weights this run
    # starts from instead of the seeded initialisation.
    warm_start: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    restarts: RestartConfig = field(default_factory=RestartConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank: global = micro x world size x accumulation."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size x "
                             f"world size = {self.micro_batch_size} x {world_size}")
        return self.global_batch_size // per_step


_CHOICES = {
    "adapter.r_hat_rule": ("round", "floor"),
    "restarts.optimizer_reset": ("delete", "random_prune", "magnitude_prune"),
    "restarts.lr": ("restart_warmup", "jagged_cosine"),
    "parallel.engine": ("fsdp2", "deepspeed"),
    "parallel.zero_stage": (1, 2, 3),
    "parallel.device": ("auto", "cpu", "cuda"),
    "parallel.fp32_matmul_precision": ("high", "highest", "medium"),
    "parallel.param_dtype": ("float32", "bfloat16"),
    "parallel.reduce_dtype": ("float32", "bfloat16"),
    "logging.wandb_mode": ("disabled", "offline", "online"),
}


# MoRA operator types and their aliases, as megamora.adapters.mora reads them (MORA_TYPES; kept here
# without torch so that a bad type fails with the other config errors).
MORA_TYPE_ALIASES = {"sharing": "1", "rotation": "6"}
MORA_TYPE_NAMES = ("1", "2", "3", "4", "6", "sharing", "rotation", "decouple", "truncation")


def mora_type_key(value: str) -> str | None:
    """The MoRA type a value names (1, "1" and "sharing" -> "1"), or None if it names none."""
    key = str(value).strip().lower()
    return MORA_TYPE_ALIASES.get(key, key) if key in MORA_TYPE_NAMES else None


ConfigPaths = Union[str, Path, Sequence[Union[str, Path]], None]


def config_files(paths: ConfigPaths) -> list[Path]:
    """None, one path or a sequence of paths, as a list (a str is one path, not a sequence)."""
    if paths is None:
        return []
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def load_config(paths: ConfigPaths = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Build a validated TrainConfig from YAML files and `a.b=value` overrides.

    `paths` is None, one file or a sequence of files, merged in order (a later file wins key by key;
    lists are replaced whole), then the overrides, then the preset's shape fields under all of them.
    """
    try:
        schema = OmegaConf.structured(TrainConfig)
        layers = []
        for path in config_files(paths):
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            layers.append(OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form section.key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        user = OmegaConf.merge(*layers) if layers else OmegaConf.create()
        merged = OmegaConf.merge(schema, _preset_layer(user), user)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    validate(cfg)
    return cfg


def _preset_layer(user) -> dict:
    preset = OmegaConf.select(user, "model.preset")
    if preset is None:
        return {}
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"model.preset={preset!r} is not one of {sorted(MODEL_PRESETS)}")
    dim, ffn_dim, n_layers, n_heads = MODEL_PRESETS[preset]
    return {"model": dict(dim=dim, ffn_dim=ffn_dim, n_layers=n_layers, n_heads=n_heads)}


def _one_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    key = getattr(e, "full_key", None)
    head = msg[0] if msg else type(e).__name__
    return f"{key}: {head}" if key and key not in head else head


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that the type system cannot express."""
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        _check(value in choices, f"{dotted}={value!r} is not one of {list(choices)}")
    m = cfg.model
    for name in ("dim", "ffn_dim", "n_layers", "n_heads", "vocab_size"):
        _check(getattr(m, name) > 0, f"model.{name}={getattr(m, name)} must be positive")
    _check(m.dim % m.n_heads == 0, f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
    _check((m.dim // m.n_heads) % 2 == 0, f"model head dim {m.dim // m.n_heads} must be even for rotary embeddings")
    if m.n_kv_heads is not None:
        _check(
            0 < m.n_kv_heads <= m.n_heads and m.n_heads % m.n_kv_heads == 0,
            f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}",
        )
    for name in ("steps", "global_batch_size", "micro_batch_size", "eval_tokens", "keep_last", "stop_check_every"):
        _check(getattr(cfg, name) > 0, f"{name}={getattr(cfg, name)} must be positive")
    for name in ("seed", "eval_every", "save_every"):
        _check(getattr(cfg, name) >= 0, f"{name}={getattr(cfg, name)} must be >= 0")
    _check(cfg.parallel.timeout_s > 0, f"parallel.timeout_s={cfg.parallel.timeout_s} must be positive")
    _check(cfg.data.validation_pieces > 0, f"data.validation_pieces={cfg.data.validation_pieces} must be positive")
    _check(cfg.parallel.loss_chunk_size >= 0, f"parallel.loss_chunk_size={cfg.parallel.loss_chunk_size} must be >= 0")
    _check(cfg.parallel.shard_size >= 0, f"parallel.shard_size={cfg.parallel.shard_size} must be >= 0")
    for name in ("shard_size", "reduce_scatter_every_micro_batch"):  # DeepSpeed shards in its own way
        _check(cfg.parallel.engine == "fsdp2" or not getattr(cfg.parallel, name),
               f"parallel.{name}={getattr(cfg.parallel, name)} applies to parallel.engine=fsdp2 only")
    _check(cfg.logging.log_every > 0, f"logging.log_every={cfg.logging.log_every} must be positive")
    _check(cfg.data.seq_len > 0, f"data.seq_len={cfg.data.seq_len} must be positive")
    _check(cfg.data.shuffle_buffer >= 0, f"data.shuffle_buffer={cfg.data.shuffle_buffer} must be >= 0")
    _check(cfg.data.prefetch_batches is None or cfg.data.prefetch_batches >= 0,
           f"data.prefetch_batches={cfg.data.prefetch_batches} must be >= 0")
    _check(cfg.data.max_doc_chars > 0, f"data.max_doc_chars={cfg.data.max_doc_chars} must be positive")
    o = cfg.optim
    _check(o.lr > 0, f"optim.lr={o.lr} must be positive")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas={o.betas} must be two values in [0, 1)")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0")
    a = cfg.adapter
    _check_adapter_kind(cfg)
    if a.kind != "none":
        _check(a.r > 0, f"adapter.r={a.r} must be positive")
        _check(0 <= a.dropout < 1, f"adapter.dropout={a.dropout} must be in [0, 1)")
        known = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        bad = [t for t in a.target_modules if t not in known]
        _check(not bad and a.target_modules, f"adapter.target_modules has unknown names {bad}; known: {sorted(known)}")
    _check_mora_types(cfg)
    r = cfg.restarts
    _check(r.every >= 0, f"restarts.every={r.every} must be >= 0")
    if r.every:
        _check(a.kind != "none", "restarts.every needs an adapter (adapter.kind is none)")
        _check(r.warmup >= 0, f"restarts.warmup={r.warmup} must be >= 0")
        _check(0 <= r.prune_ratio <= 1, f"restarts.prune_ratio={r.prune_ratio} must be in [0, 1]")
        _check(len(r.mora_types) > 0, "restarts.mora_types must not be empty")
    if a.kind != "none":
        from megamora.adapters import adapter_class  # the registry (imports torch: after the plain checks)

        adapter_class(a.kind).check_config(cfg)
    from megamora.optimizers import optimizer_class

    try:
        cls = optimizer_class(o.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cls.check_config(cfg)


def _check_adapter_kind(cfg: TrainConfig) -> None:
    from megamora.adapters import ADAPTERS

    kind = cfg.adapter.kind
    _check(kind == "none" or kind in ADAPTERS, f"adapter.kind={kind!r} is not one of {['none', *ADAPTERS]}")


def _check_mora_types(cfg: TrainConfig) -> None:
    # Checked whatever adapter.kind is: a typo is an error even where the value is not used yet.
    # That the cycle keeps r_hat depends on the layer shapes: megamora.run.check_adapters.
    names = ", ".join(MORA_TYPE_NAMES)
    _check(mora_type_key(cfg.adapter.mora_type) is not None,
           f"adapter.mora_type={cfg.adapter.mora_type!r} is not one of {names}")
    for i, t in enumerate(cfg.restarts.mora_types):
        _check(mora_type_key(t) is not None, f"restarts.mora_types[{i}]={t!r} is not one of {names}")


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)

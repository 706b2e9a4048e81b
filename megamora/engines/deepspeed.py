"""DeepSpeed ZeRO 1 / 2 / 3 (`parallel.engine: deepspeed`, `parallel.zero_stage`).

The DeepSpeed JSON config is generated from the run's own config, so batch sizes, accumulation and
clipping are stated once; `parallel.deepspeed_config` names a JSON file whose keys override the
generated ones (offload, bucket sizes, ...), nested sections merged key by key. The optimizer is the
project's AdamW, passed to `deepspeed.initialize` as a client optimizer (no fused-op build), also
under ZeRO-Offload (torch's fused AdamW steps the offloaded fp32 partitions on the CPU), and the LR
schedule stays the project's (the Trainer sets each group's lr before every step).

Precision: parameters (frozen base weights included) stay fp32, as under FSDP2, so a ReLoRA /
ReMoRA merge adds dW into exact fp32 weights; `parallel.param_dtype: bfloat16` computes in bf16
through torch.autocast and `parallel.reduce_dtype: bfloat16` sets DeepSpeed's
`communication_data_type`. DeepSpeed's own bf16 / fp16 modes are not offered: they keep frozen
weights in bf16 only (no fp32 master copy), so merges and exports would lose precision. ZeRO-3
therefore gathers fp32 (twice FSDP2's bf16 traffic); the bf16 casts of the gathered weights are not
kept past their use (measured with and without autocast's cast cache: benchmarks/bench_zero_memory.py).

ZeRO-3 partitions the meta-device model in `shard` (deepspeed.zero.Init, module by module): no rank
holds the whole model at start-up, and the seeded init writes each rank's slices.

Checkpoints are DeepSpeed's own (`engine.save_checkpoint`) in `<checkpoint>/deepspeed/`; they
resume on the same ZeRO stage and world size. DeepSpeed reads them with pickle
(`torch.load(weights_only=False)`); here every such load is forced to `weights_only=True` with
DeepSpeed's few config enums allowed, so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn

from megamora.config import TrainConfig
from megamora.engines.base import Engine

TAG = "deepspeed"  # the sub-directory of a checkpoint that holds DeepSpeed's files
INSTALL_HINT = "pip install -e '.[deepspeed]' (after torch, so that pip keeps the installed torch build)"
# Keys of the generated config that come from the run config and may not be overridden.
_OWNED_KEYS = {
    "train_batch_size": "global_batch_size", "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "global_batch_size / micro_batch_size", "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim (the project's AdamW)", "scheduler": "optim (the project's LR schedule)",
    "bf16": "parallel.param_dtype", "fp16": "parallel.param_dtype",
    "zero_force_ds_cpu_optimizer": "the project's AdamW, offloaded or not",
}


@functools.cache
def require_deepspeed():
    """Import DeepSpeed quietly, its logger moved to stderr (it logs to stdout, where the tools print
    their results) at WARNING level (the project logs its own set-up)."""
    chatter = io.StringIO()  # e.g. "Setting accelerator to CPU", printed at import
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            import deepspeed
    except ImportError as e:
        raise ValueError(f"parallel.engine=deepspeed needs DeepSpeed, which is not installed ({e}): {INSTALL_HINT}") from None
    deepspeed.utils.logger.setLevel(logging.WARNING)
    for handler in deepspeed.utils.logger.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    # DeepSpeed still calls collectives that torch deprecates, warning on every call site
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    return deepspeed


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_override_file(path: Optional[str]) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        override = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"parallel.deepspeed_config={path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"parallel.deepspeed_config={path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(override, dict):
        raise ValueError(f"parallel.deepspeed_config={path}: expected a JSON object, got {type(override).__name__}")
    owned = sorted(k for k in override if k in _OWNED_KEYS)
    if owned:
        raise ValueError(f"parallel.deepspeed_config={path} sets {owned[0]!r}; it comes from the run config "
                         f"({_OWNED_KEYS[owned[0]]})")
    stage = override.get("zero_optimization", {}).get("stage")
    if stage is not None:
        raise ValueError(f"parallel.deepspeed_config={path} sets zero_optimization.stage; use parallel.zero_stage")
    return override


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of this run: generated, then overridden by parallel.deepspeed_config."""
    generated = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,  # the client AdamW (torch.optim.AdamW)
        # ZeRO-Offload steps the client AdamW on the CPU (torch's fused kernel: as fast as
        # DeepSpeedCPUAdam, the arithmetic of the FSDP2 runs, all state in its state_dict;
        # benchmarks/bench_offload_optimizer.py), where DeepSpeed would insist on DeepSpeedCPUAdam.
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**62,  # the project logs its own metrics
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.reduce_dtype == "bfloat16":
        generated["communication_data_type"] = "bf16"
    return _merge(generated, read_override_file(cfg.parallel.deepspeed_config))


def device_args(device: torch.device) -> SimpleNamespace | None:
    """DeepSpeed puts itself on cuda:LOCAL_RANK unless `args.device_rank` says otherwise: give it the
    GPU the run picked (megamora.distributed.pick_device), which differs where each task sees one GPU."""
    return SimpleNamespace(device_rank=device.index) if device.type == "cuda" else None


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        if cfg.parallel.compile:  # ZeRO-3 gathers through module hooks that the compiled blocks would trace
            raise ValueError("parallel.compile=true is supported with parallel.engine=fsdp2 only (DeepSpeed: use "
                             "parallel.compile=false)")
        require_deepspeed()
        read_override_file(cfg.parallel.deepspeed_config)

    @classmethod
    def destroy_process_group(cls) -> None:
        comm = sys.modules.get("deepspeed.comm")  # None: DeepSpeed was never imported
        if comm is not None and comm.is_initialized():
            comm.destroy_process_group()  # also drops DeepSpeed's cached groups
        else:  # failed before deepspeed.initialize
            super().destroy_process_group()

    def shard(self, model: nn.Module) -> None:
        """ZeRO-3: every meta parameter becomes its partition now, so no rank ever holds the whole
        model; the seeded init then writes each rank's slices (ZeroAccess.set_full_), the values of
        any world size. ZeRO-1/2 keep whole parameters on every rank (they partition optimizer state
        and gradients in setup)."""
        if self.cfg.parallel.zero_stage == 3:
            partition_meta_parameters(model, self.dist.device, deepspeed_config(self.cfg, self.dist.world_size))

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        deepspeed = require_deepspeed()
        self.config = deepspeed_config(self.cfg, self.dist.world_size)
        self.model, self.optimizer, _, _ = deepspeed.initialize(args=device_args(self.dist.device), model=model,
                                                                optimizer=optimizer, config=self.config,
                                                                dist_init_required=False)
        self.module = self.model.module

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        # DeepSpeed divides by the accumulation steps and reduces at its own boundary, which it
        # counts from gradient_accumulation_steps; the two counts must agree.
        if self.model.is_gradient_accumulation_boundary() != last_micro_batch:
            raise RuntimeError("DeepSpeed's gradient accumulation boundary disagrees with the Trainer's")
        self.model.backward(loss)
        if not last_micro_batch:
            self.model.step()  # bookkeeping only: DeepSpeed steps the optimizer at the boundary

    def step(self) -> torch.Tensor:
        self.model.step()  # clip (gradient_clipping), optimizer step, zero grad
        norm = self.model.get_global_grad_norm()  # a tensor, or a float where DeepSpeed read it itself
        return torch.as_tensor(float("nan") if norm is None else norm).detach()

    def checkpoint_info(self) -> dict[str, Any]:
        return {**super().checkpoint_info(), "zero_stage": self.cfg.parallel.zero_stage}

    def check_resume(self, info: dict[str, Any], path: Path) -> None:
        super().check_resume(info, path)
        for key, now in (("zero_stage", self.cfg.parallel.zero_stage), ("world_size", self.dist.world_size)):
            if info.get(key) != now:
                raise ValueError(f"{path} was saved with DeepSpeed {key}={info.get(key)}; this run has {key}={now} "
                                 "(DeepSpeed checkpoints resume on the same ZeRO stage and world size)")

    def save(self, path: Path) -> None:
        self.model.save_checkpoint(str(path), tag=TAG, save_latest=False)

    def load(self, path: Path) -> None:
        with weights_only_torch_load():
            self.model.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False,
                                       load_module_strict=True)

    @staticmethod
    def read_model(path: Path, model: nn.Module) -> None:
        require_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        quiet = open(os.devnull, "w")  # its progress bars and prints
        with weights_only_torch_load(), quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG)
        model.load_state_dict(state, strict=True)


def partition_meta_parameters(model: nn.Module, device: torch.device, config: dict[str, Any]) -> None:
    """Replace each meta parameter of `model` by a ZeRO-3 partitioned one (deepspeed.zero.Init, one
    module at a time, children first: Init converts a module's whole tree). A rank holds at most one
    full parameter at a time (its values are not drawn yet: Init broadcasts rank 0's bytes, as
    deepspeed.initialize would); tied parameters stay one parameter."""
    deepspeed = require_deepspeed()
    deepspeed.init_distributed(dist_init_required=False)  # joins the run's group (its config counts the ranks)
    made: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(meta) -> (meta kept alive, partitioned)
    for module in reversed(list(model.modules())):
        own = [(name, p) for name, p in module.named_parameters(recurse=False) if p.is_meta]
        for name, meta in own:
            if id(meta) not in made:
                made[id(meta)] = meta, nn.Parameter(torch.empty_like(meta, device=device),
                                                    requires_grad=meta.requires_grad)
            setattr(module, name, made[id(meta)][1])
        if own:
            deepspeed.zero.Init(module=module, config_dict_or_path=config)


@functools.cache
def _safe_globals() -> list:
    """Non-tensor types DeepSpeed pickles into its checkpoints: an enum, a fragment address (a
    named tuple) and its loss scaler (plain attributes)."""
    require_deepspeed()  # imported quietly: its import prints to stdout, where the tools print results
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_torch_load():
    """Every torch.load inside (DeepSpeed's included) runs with weights_only=True."""
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_safe_globals()):
            return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


class ZeroAccess:
    """DeepSpeed ZeRO parameters (megamora.engines.tensors). ZeRO-3 partitions every parameter
    (`ds_id`); ZeRO-1/2 keep parameters whole on every rank but partition the optimizer's flat fp32
    master copies (`_hp_mapping`). A trainable parameter's truth is its master copy: writing only
    the module parameter would be undone by the next optimizer step."""

    @staticmethod
    def owns(t: torch.Tensor) -> bool:
        return hasattr(t, "ds_id") or hasattr(t, "_hp_mapping")

    @staticmethod
    def shape(t: torch.Tensor) -> torch.Size:
        return t.ds_shape if hasattr(t, "ds_id") else t.shape

    @staticmethod
    def _has_master(t: torch.Tensor) -> bool:
        """A trainable parameter that the ZeRO optimizer holds an fp32 master copy of (ZeRO-3
        parameters are partitioned before the optimizer exists: the seeded init writes them first)."""
        return t.requires_grad and (hasattr(t, "_hp_mapping") or hasattr(t, "_z3_optimizer"))

    @staticmethod
    @torch.no_grad()
    def full(t: torch.Tensor) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        shape = ZeroAccess.shape(t)
        if ZeroAccess._has_master(t):
            return safe_get_full_fp32_param(t).reshape(shape)
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.detach().clone().reshape(shape)

    @staticmethod
    @torch.no_grad()
    def set_full_(t: torch.Tensor, value: torch.Tensor) -> None:
        import torch.distributed as dist
        from deepspeed.utils import safe_set_full_fp32_param

        value = value.reshape(ZeroAccess.shape(t))
        if hasattr(t, "ds_id"):
            # Write this rank's slice of the partition in place. (GatheredParameters(modifier_rank=0)
            # would leave the partition of a "persistent" small parameter stale: the next step's
            # re-gather would silently undo the write.)
            part = t.ds_tensor
            start = part.ds_numel * dist.get_rank(group=t.ds_process_group)
            mine = value.reshape(-1)[start:start + part.ds_numel]
            part.data[: mine.numel()].copy_(mine)
            if t.data.numel() == t.ds_numel:  # currently gathered (persistent): the full copy too
                t.data.copy_(value)
        else:
            t.data.copy_(value)
        if ZeroAccess._has_master(t):
            safe_set_full_fp32_param(t, value.to(device=t.device, dtype=torch.float32))

    @staticmethod
    def add_full_(t: torch.Tensor, update: torch.Tensor) -> None:
        ZeroAccess.set_full_(t, ZeroAccess.full(t).float() + update.to(t.device).float())

    @staticmethod
    def _keys(optimizer) -> set[str]:
        states = optimizer.optimizer.state.values()
        return set(next(iter(states), {}))

    @staticmethod
    def _link_state(optimizer) -> None:
        # ZeRO-1/2 link each parameter to its slice of the flat optimizer state after the first
        # step of the *first* group only, leaving the other groups' parameters unlinked: link all.
        if hasattr(optimizer, "_hp_optimizer_states_linked"):
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()

    @staticmethod
    def optimizer_state(optimizer, param, key: str) -> Optional[torch.Tensor]:
        from deepspeed.utils import safe_get_full_optimizer_state

        if key not in ZeroAccess._keys(optimizer):
            return None
        ZeroAccess._link_state(optimizer)
        return safe_get_full_optimizer_state(param, key).reshape(ZeroAccess.shape(param))

    @staticmethod
    def set_optimizer_state_(optimizer, param, key: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        ZeroAccess._link_state(optimizer)
        safe_set_full_optimizer_state(param, value.to(torch.float32).reshape(ZeroAccess.shape(param)), key)

    @staticmethod
    @torch.no_grad()
    def reset_step_(optimizer, params: list[torch.Tensor]) -> None:
        """The step count lives on the flat partition of each parameter group, so the group must
        hold exactly `params` (megamora.optim gives the adapters a group of their own)."""
        wanted = {id(p) for p in params}
        inner = optimizer.optimizer
        for group_index, group in enumerate(inner.param_groups):
            members = _group_members(optimizer, group_index)
            hits = sum(id(p) in wanted for p in members)
            if hits == 0:
                continue
            if hits != len(members):
                raise ValueError(f"optimizer group {group.get('name', group_index)!r} mixes the parameters whose step "
                                 "is reset with others: DeepSpeed keeps one step count per group")
            for flat in _group_partitions(optimizer, group_index):
                step = inner.state.get(flat, {}).get("step")
                if torch.is_tensor(step):
                    step.zero_()
                elif step is not None:
                    inner.state[flat]["step"] = 0


def _group_partitions(optimizer, group_index: int) -> list[torch.Tensor]:
    """The flat fp32 partitions (the optimizer's own parameters) of one optimizer group. ZeRO-3
    puts them into the group only for the duration of its step."""
    if hasattr(optimizer, "bit16_groups"):  # stage 1 / 2
        return [optimizer.single_partition_of_fp32_groups[group_index]]
    return [flat for sub, flat in enumerate(optimizer.fp32_partitioned_groups_flat)
            if optimizer.sub_group_to_group_id[sub] == group_index]


def _group_members(optimizer, group_index: int) -> list[torch.Tensor]:
    """The model parameters of one optimizer group of a ZeRO optimizer (stage 1/2 or 3)."""
    if hasattr(optimizer, "bit16_groups"):  # stage 1 / 2
        return list(optimizer.bit16_groups[group_index])
    return [p for sub, params in enumerate(optimizer.fp16_groups)  # stage 3: sub-groups of groups
            if optimizer.sub_group_to_group_id[sub] == group_index for p in params]

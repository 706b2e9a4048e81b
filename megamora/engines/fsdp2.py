"""PyTorch FSDP2 (`fully_shard`), the default engine; also a plain single process when launched
without torchrun (no process group: nothing is sharded and bf16 comes from autocast).

Every transformer block is its own FSDP unit, then the root (embeddings, final norm, head).
Parameters stay fp32 and sharded; `parallel.param_dtype` is the dtype of the unsharded compute
copies and `parallel.reduce_dtype` that of the gradient reduce-scatter. Checkpoints are DCP
(torch.distributed.checkpoint): they reshard on load, so a run saved on N ranks resumes on M.

Loading never runs code from a checkpoint: DCP pickles its `.metadata`, which is read here through
an allow-list unpickler (DCP's metadata classes, torch.Size, dtypes, layouts, paths only); tensors
are read by DCP with torch.load(weights_only=True), and the few non-tensor values (optimizer
hyper-parameters) by `SafeLoadPlanner`, also weights_only. A checkpoint that cannot be read
(missing, truncated, corrupt or crafted file) fails with a one-line ValueError naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.futures import Future

from megamora.config import ParallelConfig
from megamora.distributed import DTYPES, process_group_active
from megamora.engines.base import Engine


class FSDP2Engine(Engine):
    name = "fsdp2"
    load_restores_all_parameters = True  # check_model_keys: exactly the model's keys

    @property
    def sharded(self) -> bool:
        return process_group_active()

    def shard(self, model: nn.Module) -> None:
        if not self.sharded:
            return
        # cast_forward_inputs=False: the rotary cos/sin tables passed into every block stay fp32, as in
        # one process under autocast; the hidden states are in param_dtype already (the root's
        # embedding computes in it), so the cast would touch nothing else.
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[self.cfg.parallel.param_dtype],
                                  reduce_dtype=DTYPES[self.cfg.parallel.reduce_dtype], cast_forward_inputs=False)
        mesh = device_mesh(self.cfg.parallel, self.dist.world_size, self.dist.device.type)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = self.module = model
        self.optimizer = optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.accum = self.cfg.grad_accum_steps(self.dist.world_size)

    def checkpoint_info(self) -> dict[str, Any]:
        # (replicate, shard) ranks; a checkpoint resumes on any mesh (DCP reshards)
        mesh = list(self.cfg.parallel.mesh_shape(self.dist.world_size)) if self.sharded else [1, 1]
        return {**super().checkpoint_info(), "mesh": mesh}

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        # Sharded, the mixed-precision policy casts; one plain process uses autocast instead.
        return None if self.sharded else super().autocast_dtype

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        if self.sharded:
            # By default gradients stay unsharded until the last micro-batch, then one reduce-scatter;
            # reduce_scatter_every_micro_batch shards them every micro-batch (HSDP's all-reduce across
            # replicas still runs once, on the last).
            every = self.cfg.parallel.reduce_scatter_every_micro_batch
            self.module.set_requires_gradient_sync(every or last_micro_batch)
            if every:
                self.module.set_requires_all_reduce(last_micro_batch)
        (loss / self.accum).backward()

    def step(self) -> torch.Tensor:
        grad_norm = clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def save(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        _dcp(dcp.save, {"model": model_sd, "optim": optim_sd}, path)

    def load(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        check_model_keys(path, model_sd)
        _dcp_load(state, path)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    @staticmethod
    def read_model(path: Path, model: nn.Module) -> None:
        model_sd = get_model_state_dict(model)
        check_model_keys(path, model_sd)
        _dcp_load({"model": model_sd}, path)
        set_model_state_dict(model, model_sd)


def device_mesh(parallel: ParallelConfig, world_size: int, device_type: str) -> DeviceMesh:
    """The ranks' mesh: 1-D (plain FSDP) or (replicate, shard) for HSDP (parallel.shard_size)."""
    replicate, shard = parallel.mesh_shape(world_size)
    if replicate == 1:
        return init_device_mesh(device_type, (shard,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (replicate, shard), mesh_dim_names=("replicate", "shard"))


def _dcp(fn, state: dict, path: Path) -> None:
    """dcp.save, also in one process without a process group (no warning about it); loads go
    through `_dcp_load`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, checkpoint_id=str(path), no_dist=not process_group_active())


# --------------------------------------------------------------------------- safe loading

# Every global a DCP `.metadata` pickle names (torch 2.13; listed by unpickling real checkpoints of
# 1 and 2 ranks): DCP's metadata classes, torch.Size, torch.layout's reducer (a lookup among torch's
# layouts) and the checkpoint_id path. dtypes (`torch.float32`, ...) are allowed by type below.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "pathlib._local": {"PosixPath", "PurePosixPath"},  # where Python >= 3.13 pickles them from
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},  # older pickle protocols name them
}


class MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals DCP metadata holds, so a crafted `.metadata`
    (whose pickle would call os.system, eval, ...) fails before any of its code runs."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        value = vars(torch).get(name) if module == "torch" else None  # vars: no lazy submodule import
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds: refused, "
                                     "nothing in it was run")


class CheckpointMismatch(ValueError):
    """A checkpoint whose model weights are not the model's: other keys or shapes (e.g. a LoRA
    config with a MoRA checkpoint). `detail` says which, in one line."""

    def __init__(self, path: Path, missing=(), unexpected=(), shapes=()):
        self.path, self.missing, self.unexpected, self.shapes = path, sorted(missing), sorted(unexpected), shapes
        lists = {"missing keys": self.missing, "unexpected keys": self.unexpected, "other shapes": shapes}
        self.detail = "; ".join(f"{what} [{_few(keys)}]" for what, keys in lists.items() if keys)
        super().__init__(f"{path}: holds the weights of another model: {self.detail}")


def _few(items, shown: int = 3) -> str:
    items = list(items)
    more = f", ... ({len(items)} in all)" if len(items) > shown else ""
    return ", ".join(map(str, items[:shown])) + more


def error_cause(e: BaseException) -> str:
    """An exception as a short phrase for one line: its first line, or its type if it has no text."""
    text = str(e).strip()
    if text.startswith("Weights only load failed"):  # torch's cause follows its advice to retry unsafely
        marker = "WeightsUnpickler error:"
        cause = text.rsplit(marker, 1)[1] if marker in text else text.split("\n\n", 1)[-1]
        text = f"refused by torch.load(weights_only=True): {cause.strip()}"
    lines = text.splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def read_dcp_metadata(path: Path) -> Metadata:
    """The DCP metadata of checkpoint `path`, read without running code from it, once every shard
    file it lists is known to be in the checkpoint and long enough (a truncated copy fails here)."""
    path = Path(path)
    try:
        with open(path / ".metadata", "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if not (isinstance(metadata, Metadata) and isinstance(metadata.state_dict_metadata, dict)
                and isinstance(metadata.storage_data, dict)):
            raise pickle.UnpicklingError("not DCP metadata")
    except Exception as e:  # anything a damaged or crafted pickle raises
        raise ValueError(f"{path}: cannot read .metadata ({error_cause(e)})") from None
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        if not (isinstance(info, _StorageInfo) and _is_file_name(info.relative_path)
                and isinstance(info.offset, int) and isinstance(info.length, int)):
            raise ValueError(f"{path}: cannot read .metadata (not a shard of this checkpoint: {info!r})")
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        try:
            have = (path / name).stat().st_size
        except OSError as e:
            raise ValueError(f"{path}: cannot read {name} ({error_cause(e)})") from None
        if have < size:
            raise ValueError(f"{path}: cannot read {name} (truncated: {have} bytes, .metadata lists {size})")
    return metadata


def _is_file_name(name: Any) -> bool:
    """A file directly in the checkpoint folder (DCP writes `__<rank>_<n>.distcp`), nothing elsewhere."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def check_model_keys(path: Path, model_sd: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointMismatch unless checkpoint `path` holds exactly the model's weights (DCP
    itself would name only the first missing key, and ignores unexpected ones)."""
    saved = {k.removeprefix("model."): v for k, v in read_dcp_metadata(path).state_dict_metadata.items()
             if k.startswith("model.")}
    shapes = [f"{k}: {tuple(saved[k].size)} vs {tuple(v.shape)}" for k, v in model_sd.items()
              if isinstance(saved.get(k), TensorStorageMetadata) and tuple(saved[k].size) != tuple(v.shape)]
    missing, unexpected = set(model_sd) - set(saved), set(saved) - set(model_sd)
    if missing or unexpected or shapes:
        raise CheckpointMismatch(path, missing, unexpected, shapes)


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader, with `.metadata` read by `read_dcp_metadata` and each shard file read
    on its own, so that an error names the file."""

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP then never falls back to per-rank files
        metadata = read_dcp_metadata(Path(self.path))
        if metadata.storage_meta is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner) -> Future:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in per_file.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except Exception as e:
                raise ValueError(f"{self.path}: cannot read {name} ({error_cause(e)})") from None
        done: Future = Future()
        done.set_result(None)
        return done


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor values (pickled with torch.save) load weights_only,
    where DCP's own planner uses torch.load(weights_only=False)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _dcp_load(state: dict, path: Path) -> None:
    """dcp.load through SafeFileSystemReader and SafeLoadPlanner; failures are one-line ValueErrors."""
    read_dcp_metadata(path)  # fails here in one line, not wrapped (and logged) by DCP
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(),
                     no_dist=not process_group_active())
    except CheckpointException as e:  # DCP wraps every rank's error, traceback and all
        errors = [failure[0] for failure in e.failures.values()] or [e]
        first = next((x for x in errors if isinstance(x, ValueError)), errors[0])
        if isinstance(first, ValueError):  # ours: already one line naming the file
            raise first.with_traceback(None) from None
        raise ValueError(f"{path}: cannot load ({error_cause(first)})") from None


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global grad norm over (possibly sharded) parameters, a 0-d tensor on the device; clips in place
    when max_norm > 0 with the scale computed on the device (the host never waits for backward)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):  # reduce the per-shard norms into the global one
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total


class DTensorAccess:
    """FSDP2 shards: every rank holds a slice of the full tensor (megamora.engines.tensors)."""

    @staticmethod
    def owns(t: torch.Tensor) -> bool:
        return isinstance(t, DTensor)

    @staticmethod
    def full(t: DTensor) -> torch.Tensor:
        return t.full_tensor()

    @staticmethod
    def _my_slice(t: DTensor, full: torch.Tensor) -> torch.Tensor:
        # src_data_rank=None: every rank already has the full value, so no broadcast
        local = distribute_tensor(full.to(t.device), t.device_mesh, t.placements, src_data_rank=None).to_local()
        return local

    @staticmethod
    @torch.no_grad()
    def set_full_(t: DTensor, value: torch.Tensor) -> None:
        shard = t.to_local()
        shard.copy_(DTensorAccess._my_slice(t, value))

    @staticmethod
    @torch.no_grad()
    def set_full_from_(t: DTensor, make_value: Callable[[], torch.Tensor], owner: int) -> None:
        """t = make_value(), called on one rank only (the mesh coordinate (k, k, ...), k = owner modulo
        the smallest mesh dimension), which sends every other rank its slice."""
        mesh = t.device_mesh
        src = owner % min(mesh.shape)
        if all(c == src for c in mesh.get_coordinate()):
            value = make_value().to(device=t.device, dtype=t.dtype)
        else:
            value = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        t.to_local().copy_(distribute_tensor(value, mesh, t.placements, src_data_rank=src).to_local())

    @staticmethod
    @torch.no_grad()
    def add_full_(t: DTensor, update: torch.Tensor) -> None:
        # each rank adds its own slice: no gather of the (large) base weight
        shard = t.to_local()
        shard.copy_((shard.float() + DTensorAccess._my_slice(t, update).float()).to(shard.dtype))

    @staticmethod
    def optimizer_state(optimizer, param, key: str) -> Optional[torch.Tensor]:
        value = optimizer.state.get(param, {}).get(key)
        if value is None:
            return None
        return value.full_tensor() if isinstance(value, DTensor) else value.detach()

    @staticmethod
    def set_optimizer_state_(optimizer, param, key: str, value: torch.Tensor) -> None:
        state = optimizer.state[param][key]
        if isinstance(state, DTensor):
            DTensorAccess.set_full_(state, value)
        else:
            state.copy_(value)

    @staticmethod
    @torch.no_grad()
    def reset_step_(optimizer, params: list[torch.Tensor]) -> None:
        for p in params:
            step = optimizer.state.get(p, {}).get("step")
            if step is not None:
                (step.to_local() if isinstance(step, DTensor) else step).zero_()

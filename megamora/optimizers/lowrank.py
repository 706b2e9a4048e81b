"""AdamW with the moments of the 2-D block weights kept in a low-rank space: what GaLore and APOLLO
share. A subclass says how the projection is refreshed (`_new_projection`) and how the low-rank Adam
direction becomes the full-rank update (`_full_rank_update`).

The arithmetic is the released GaLore / APOLLO code's (their AdamW is Hugging Face's, not torch's):

    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2;   d = m / (sqrt(v) + eps)
    w -= lr sqrt(1 - b2^t) / (1 - b1^t) * update(d);    then w -= lr wd w   (decay after the update)

for every parameter; a projected one (its group has `rank`) takes g = the projected gradient, with
the projection refreshed when the 0-based step t-1 is a multiple of `update_proj_gap` (step 0 first).

Sides. A projected m x n weight G is multiplied on the right (R = G Q^T, Q: k x n) or on the left
(R = P^T G, P: m x k); `std` projects the smaller side (right when m >= n).
FSDP2 (DTensor Shard(0), rows split over the ranks) keeps everything on shards where the algebra
allows: right side, R, the moments and the update are row shards and Q is replicated (k x n);
left side, P is row-sharded, R = sum over ranks of P_i^T G_i (an all-reduce of k x n) and the
moments are replicated. Full-rank norms (APOLLO's limiter) are all-reduced sums of squares.

State per projected parameter: step (0-d, CPU), proj, exp_avg, exp_avg_sq (+ a subclass's 0-d
tensors): tensors only, so DCP saves and reshards them and loads them weights-only.
"""

from __future__ import annotations

import math
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from megamora.config import OptimConfig, TrainConfig

SIDES = {"std": None, "reverse_std": None, "left": "left", "right": "right"}


def projection_side(proj_type: str, shape: tuple[int, ...]) -> str:
    """"left" or "right": which side of an m x n gradient `proj_type` projects."""
    if proj_type not in SIDES:
        raise ValueError(f"proj_type={proj_type!r} is not one of {list(SIDES)}")
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


def projected_shapes(side: str, shape: tuple[int, int], k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(projection, moments) shapes of an m x n weight projected to k on `side`."""
    m, n = shape
    return ((k, n), (m, k)) if side == "right" else ((m, k), (k, n))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _sharded(p: torch.Tensor) -> bool:
    return isinstance(p, DTensor) and dist.is_initialized()


def _shard_group(p: DTensor):
    """The process group that splits p's rows (the shard dimension of an HSDP mesh)."""
    dim = next(i for i, pl in enumerate(p.placements) if isinstance(pl, Shard))
    return p.device_mesh.get_group(dim)


def rows_like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (same number of rows as p, the same value on every rank) split by rows as p is."""
    if not _sharded(p):
        return full
    return distribute_tensor(full.to(_local(p).device), p.device_mesh, p.placements, src_data_rank=None)


def zeros_rows_like(p: torch.Tensor, local: torch.Tensor, cols: int) -> torch.Tensor:
    """Zeros shaped like `local` (this rank's rows), as a row-sharded DTensor of p.shape[0] x cols."""
    zeros = torch.zeros_like(local)
    if not _sharded(p):
        return zeros
    return DTensor.from_local(zeros, p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size((p.shape[0], cols)), stride=(cols, 1))


def sum_over_shards(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Sum a per-shard partial result over the ranks that split p's rows."""
    if _sharded(p):
        dist.all_reduce(t, group=_shard_group(p))
    return t


def full_norm(local: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The Frobenius norm of a row-sharded tensor split as p is (torch.norm on one process)."""
    if not _sharded(p):
        return torch.linalg.vector_norm(local)
    sq = local.float().square().sum()
    dist.all_reduce(sq, group=_shard_group(p))
    return sq.sqrt().to(local.dtype)


class LowRankAdamW(torch.optim.Optimizer):
    """See the module docstring. Projected groups carry `rank`, `update_proj_gap`, `scale`, `proj_type`."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        # Parameter index in group order: which rank computes a refresh (spread over the ranks).
        self._index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    # -- the subclasses' part ----------------------------------------------------------------

    def _new_projection(self, p: torch.Tensor, group: dict, side: str, step: int) -> torch.Tensor:
        """The projection for the refresh at 0-based `step`: Q (k x n, replicated) for the right
        side, P (m x k, split by rows as p is) for the left."""
        raise NotImplementedError

    def _full_rank_update(self, p, grad, low, direction, proj, side, group, state) -> torch.Tensor:
        """This rank's rows of the full-rank update from the low-rank Adam `direction`."""
        raise NotImplementedError

    # -- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group.get("rank"):
                    self._projected_step(p, group)
                else:
                    self._dense_step(p, group)
        return loss

    def _adam_direction(self, state: dict, grad: torch.Tensor, group: dict) -> tuple[torch.Tensor, float]:
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = int(state["step"].item())  # a CPU tensor: no device sync
        exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"] * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
        return exp_avg / denom, step_size

    @staticmethod
    def _apply(p: torch.Tensor, update: torch.Tensor, step_size: float, group: dict) -> None:
        w = _local(p)
        w.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:  # decoupled, after the update (as the released code)
            w.add_(w, alpha=-group["lr"] * group["weight_decay"])

    def _dense_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        direction, step_size = self._adam_direction(state, _local(p.grad), group)
        self._apply(p, direction, step_size, group)

    def _projected_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
        grad = _local(p.grad)
        side = projection_side(group["proj_type"], tuple(p.shape))
        t = int(state["step"].item())
        if "proj" not in state or t % group["update_proj_gap"] == 0:
            state["proj"] = self._new_projection(p, group, side, t)
        proj = _local(state["proj"])
        if side == "right":
            low = torch.matmul(grad, proj.t())  # this rank's rows
        else:
            low = sum_over_shards(torch.matmul(proj.t(), grad), p)  # the same k x n on every rank
        if "exp_avg" not in state:
            if side == "right":
                state["exp_avg"] = zeros_rows_like(p, low, low.shape[1])
                state["exp_avg_sq"] = zeros_rows_like(p, low, low.shape[1])
            else:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
        direction, step_size = self._adam_direction(state, low, group)
        update = self._full_rank_update(p, grad, low, direction, proj, side, group, state)
        self._apply(p, update, step_size, group)

    # -- helpers for the subclasses -------------------------------------------------------------

    def _owner(self, p: torch.Tensor) -> int:
        return self._index[p] % dist.get_world_size()

    def _computed_once(self, p: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype,
                       compute) -> torch.Tensor:
        """compute() on one rank (spread by parameter), broadcast, so every rank holds the same value."""
        if not _sharded(p):
            return compute()
        owner = self._owner(p)
        if dist.get_rank() == owner:
            value = compute().contiguous()
        else:
            value = torch.empty(shape, dtype=dtype, device=_local(p).device)
        dist.broadcast(value, src=owner)
        return value


def maybe_full_grad(p: torch.Tensor) -> torch.Tensor:
    """The whole gradient of p (gathered from the shards when sharded)."""
    return p.grad.full_tensor() if _sharded(p) else p.grad


def svd_projection(opt: LowRankAdamW, p: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """GaLore's projector: the top-k singular vectors (k = min(rank, m, n)) of the whole gradient on
    the side projected, from an fp32 SVD on one rank (gathered first when sharded), broadcast."""
    full = maybe_full_grad(p)  # a collective: every rank gathers
    m, n = full.shape
    k = min(rank, m, n)

    def svd() -> torch.Tensor:
        u, _, vh = torch.linalg.svd(full.float(), full_matrices=False)
        # clone: a slice would keep the whole U or Vh alive (min(m, n) columns, not k)
        return (vh[:k] if side == "right" else u[:, :k]).clone().to(full.dtype)

    shape = (k, n) if side == "right" else (m, k)
    value = opt._computed_once(p, shape, full.dtype, svd)
    return value if side == "right" else rows_like(p, value)


def split_groups(model: nn.Module, cfg: OptimConfig, options: dict) -> list[dict]:
    """megamora.optim.param_groups with the 2-D weights of the transformer blocks (not embeddings,
    head or norms) moved from "decay" into a first group "projected" that carries `options`."""
    from megamora.optim import param_groups

    projected = {id(p) for name, p in model.named_parameters() if is_projected(name, p)}
    groups = []
    for group in param_groups(model, cfg):
        if group["name"] == "decay":
            mine = [p for p in group["params"] if id(p) in projected]
            rest = [p for p in group["params"] if id(p) not in projected]
            if mine:
                groups.insert(0, {**group, "name": "projected", "params": mine, **options})
            if rest:
                groups.append({**group, "params": rest})
        else:
            groups.append(group)
    return groups


def is_projected(name: str, p: torch.Tensor) -> bool:
    return p.requires_grad and p.ndim == 2 and name.startswith("layers.")


def state_bytes(cfg: TrainConfig, world_size: int, rank_of, proj_type: str, scalars: int = 0) -> int:
    """Optimizer-state bytes on the busiest rank (fp32): per projected m x n weight the projection and
    two moments (row-sharded or replicated by side, see the module docstring) plus `scalars` 0-d
    tensors; two moments for every other trainable parameter, split W ways. Step counters not counted."""
    from megamora.model import build_model

    model = build_model(cfg.model, device="meta")
    rows = lambda m: -(-m // world_size)  # noqa: E731  (FSDP2: rank 0 has the most rows)
    elements, dense = 0, 0
    for name, p in model.named_parameters():
        if not is_projected(name, p):
            dense += p.numel()
            continue
        m, n = p.shape
        k = rank_of(m, n)
        if projection_side(proj_type, (m, n)) == "right":
            elements += k * n + 2 * rows(m) * k + scalars
        else:
            elements += rows(m) * k + 2 * k * n + scalars
    return 4 * (elements + 2 * -(-dense // world_size))

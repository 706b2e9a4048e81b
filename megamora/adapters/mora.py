"""MoRA (Jiang et al., 2024): a square trainable M between a parameter-free compress and decompress.

    h = W0 x + decompress(M compress(x))            (paper Eq. 2; exactly a linear map dW x, Eq. 3)

Semantics follow the authors' released code (`shared/reference/method-facts.md`, "MoRA layer"):
r_hat = int(sqrt((in + out) r) + 0.5) (paper's floor selectable), M starts at zero, no scaling,
dropout on x before compression, cyclic padding with the input's own first elements.

Every operator type is one row of `MORA_TYPES`: a compress operator, a decompress operator and
whether M acts on the whole compressed vector (shared) or on each r_hat-chunk of it (decoupled,
with an optional RoPE-style rotation per chunk). Each operator is a linear map with an exact adjoint
(`_OPERATORS`); the forward, the hand-written backward and `delta_weight` all use the same
functions, so a merge can never disagree with the forward pass.

Every shape is handled exactly, including tiny layers where r_hat > in or r_hat > out: cyclic
padding repeats the input as often as needed, contiguous groups may be empty, and rank(dW) is then
at most min(in, out). Only sizes that make r_hat < 1 (< 2 for the decoupled types) are refused.

Speed and memory (benchmarks/bench_adapters.py): the base GEMM and the adapter share one autograd
node; the operators write straight into preallocated outputs (one memory pass each, the decompress
adding onto the base output); fp32 GEMM widths are padded to a multiple of 16; the decoupled types
run one batched GEMM over only the chunks whose outputs survive, with the rotation folded into
P_k = M R_k (O(chunks r^2) work instead of rotating every token). Backward keeps the compressed
input (shared types) or the chunked input, never more than the layer input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from megamora.adapters.base import AdapterLinear
from megamora.config import AdapterConfig, ConfigError, RestartConfig, TrainConfig, mora_type_key
from megamora.distributed import exact_fp32_matmuls
from megamora.engines.tensors import add_full_, full_tensor, set_full_
from megamora.model import InitFn, zeros_init

# ---------------------------------------------------------------------------------------------
# Linear operators on the last dimension of 2-D tensors. An operator maps length a -> length b:
# `apply(x, out)` writes into out (N, b), `adjoint(g, out)` into out (N, a) (the transpose of the
# same 0/1 matrix, for the hand-written backward). With add=True they accumulate into `out`
# instead, which lets the adapter add itself onto the base GEMM's output in the same memory pass.
# Sizes are read from the shapes.


def cyclic_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """y[j] = x[j mod n] for j < length: tiling, cyclic padding, or truncation when length <= n."""
    n = x.shape[-1]
    if length <= n:
        return x[..., :length]
    if length <= 2 * n:
        return torch.cat([x, x[..., : length - n]], dim=-1)
    return x.repeat(*([1] * (x.dim() - 1)), -(-length // n))[..., :length]


def _write(dst: torch.Tensor, src: torch.Tensor, add: bool) -> None:
    if add:
        dst.add_(src)
    else:
        dst.copy_(src)


def _accumulating(fn: Callable[[torch.Tensor, torch.Tensor], None]):
    """Give a summing operator (only ever written into a fresh buffer) the add=True form too."""
    def op(src: torch.Tensor, out: torch.Tensor, add: bool = False) -> None:
        if not add:
            return fn(src, out)
        tmp = out.new_empty(out.shape)
        fn(src, tmp)
        out.add_(tmp)
    return op


def _tile_into(x: torch.Tensor, out: torch.Tensor, add: bool = False) -> None:
    """out[:, j] = x[:, j mod n]."""
    n, b = x.shape[-1], out.shape[-1]
    k, rem = divmod(b, n)
    if k:
        _write(out[:, : k * n].unflatten(1, (k, n)), x.unsqueeze(1).expand(-1, k, -1), add)
    if rem:
        _write(out[:, k * n :], x[:, :rem], add)


def _sum_periods(z: torch.Tensor, out: torch.Tensor) -> None:
    """out = z.sum(1) for z (N, k, ...). For the few periods of the Table 3 shapes a chain of adds
    is ~2x faster on CPU than a reduction over a strided dimension."""
    k = z.shape[1]
    if k > 4:
        torch.sum(z, dim=1, out=out)
        return
    torch.add(z[:, 0], z[:, 1], out=out)
    for j in range(2, k):
        out += z[:, j]


@_accumulating
def _fold_into(z: torch.Tensor, out: torch.Tensor) -> None:
    """out[:, i] = sum of z[:, j] over j = i mod a (adjoint of _tile_into)."""
    length, a = z.shape[-1], out.shape[-1]
    k, rem = divmod(length, a)
    if k == 0:
        out[:, :length].copy_(z)
        out[:, length:].zero_()
    elif k == 1:
        out[:, rem:].copy_(z[:, rem:a])
        torch.add(z[:, :rem], z[:, a:], out=out[:, :rem])
    else:
        _sum_periods(z[:, : k * a].unflatten(1, (k, a)), out)
        if rem:
            out[:, :rem] += z[:, k * a :]


@_accumulating
def _strided_into(x: torch.Tensor, out: torch.Tensor) -> None:
    """Released compress of types 1/4: pad cyclically with x's first elements to a multiple of r,
    sum the r-chunks (group of element i = i mod r), without materialising the padded input."""
    n, r = x.shape[-1], out.shape[-1]
    pad = -n % r
    if pad > n:  # tiny layer: the input repeats more than once
        return _fold_into(cyclic_pad(x, n + pad), out)
    _fold_into(x, out)
    if pad:
        out[:, r - pad :] += x[:, :pad]


def _strided_adjoint_into(g: torch.Tensor, out: torch.Tensor, add: bool = False) -> None:
    r, n = g.shape[-1], out.shape[-1]
    pad = -n % r
    if pad > n:
        return _fold_into(cyclic_pad(g, n + pad), out, add)
    _tile_into(g, out, add)
    if pad:
        out[:, :pad] += g[:, r - pad :]


@_accumulating
def _group_sum_into(x: torch.Tensor, out: torch.Tensor) -> None:
    """Released contiguous grouping (types 2/3): n elements into r groups, the first m = n mod r of
    q + 1 consecutive elements, the rest of q (q = n // r; groups are empty when n < r)."""
    r = out.shape[-1]
    q, m = divmod(x.shape[-1], r)
    torch.sum(x[:, : m * (q + 1)].unflatten(1, (m, q + 1)), dim=2, out=out[:, :m])
    torch.sum(x[:, m * (q + 1) :].unflatten(1, (r - m, q)), dim=2, out=out[:, m:])


def _group_repeat_into(o: torch.Tensor, out: torch.Tensor, add: bool = False) -> None:
    """repeat_interleave with the group sizes of _group_sum_into (its adjoint)."""
    r = o.shape[-1]
    q, m = divmod(out.shape[-1], r)
    _write(out[:, : m * (q + 1)].unflatten(1, (m, q + 1)), o[:, :m, None].expand(-1, -1, q + 1), add)
    _write(out[:, m * (q + 1) :].unflatten(1, (r - m, q)), o[:, m:, None].expand(-1, -1, q), add)


def _fit_into(x: torch.Tensor, out: torch.Tensor, add: bool = False) -> None:
    """Keep the first elements, or zero-pad (paper Eq. 4); its own adjoint."""
    c = min(x.shape[-1], out.shape[-1])
    _write(out[:, :c], x[:, :c], add)
    if not add:
        out[:, c:].zero_()


@dataclass(frozen=True)
class Operator:
    apply: Callable[..., None]
    adjoint: Callable[..., None]


_OPERATORS: dict[str, Operator] = {
    "strided": Operator(_strided_into, _strided_adjoint_into),  # sum groups {i : i mod r = g}
    "contiguous": Operator(_group_sum_into, _group_repeat_into),  # sum runs of consecutive elements
    "tile": Operator(_tile_into, _fold_into),  # y[i] = o[i mod r]; also the decoupled reshape
    "interleave": Operator(_group_repeat_into, _group_sum_into),  # repeat_interleave
    "fit": Operator(_fit_into, _fit_into),  # truncate / zero-pad
}


@dataclass(frozen=True)
class MoRAOps:
    name: str
    compress: str
    decompress: str
    decoupled: bool = False  # M acts on every r_hat-chunk of the (cyclically padded) input
    rotate: bool = False  # rotate chunk k by angles k * theta_j before M (RoPE style)


# The meaning of every MoRA type, in one place (numbers as in the released code).
MORA_TYPES: dict[str, MoRAOps] = {
    "1": MoRAOps("sharing", "strided", "tile"),  # paper Eq. 6
    "2": MoRAOps("type2", "contiguous", "interleave"),
    "3": MoRAOps("type3", "contiguous", "tile"),
    "4": MoRAOps("type4", "strided", "interleave"),
    "6": MoRAOps("rotation", "tile", "tile", decoupled=True, rotate=True),  # paper Eq. 9
    "decouple": MoRAOps("decouple", "tile", "tile", decoupled=True),  # paper Eq. 8
    "truncation": MoRAOps("truncation", "fit", "fit"),  # paper Eq. 4
}
_ALIASES = {"sharing": "1", "rotation": "6"}


def type_after(restarts: RestartConfig, restarts_done: int) -> str:
    """The operator type of the ReMoRA cycle after `restarts_done` restarts."""
    return restarts.mora_types[restarts_done % len(restarts.mora_types)]


def canonical_mora_type(mora_type: int | str) -> str:
    """1, "1", "sharing" -> "1"; "rotation" -> "6"; "decouple" and "truncation" stay as they are."""
    key = str(mora_type).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in MORA_TYPES:
        raise ValueError(f"mora_type={mora_type!r} is not one of 1, 2, 3, 4, 6, sharing, rotation, decouple, truncation")
    return key


def mora_r_hat(in_features: int, out_features: int, r: int, rule: str = "round", mora_type: int | str = 1) -> int:
    """The square size: the released code's nearest integer to sqrt((in + out) r) ("round") or the
    paper's floor ("floor"); rounded down to even for rotation (rotate-half pairs) and for decouple,
    which is rotation with the rotation switched off (same r_hat, so Table 4's rows compare alike)."""
    if r <= 0:
        raise ValueError(f"r={r} must be positive")
    n = (in_features + out_features) * r
    if rule == "round":
        r_hat = int(math.sqrt(n) + 0.5)
    elif rule == "floor":
        r_hat = math.isqrt(n)
    else:
        raise ValueError(f"r_hat_rule={rule!r} is not one of ['round', 'floor']")
    if MORA_TYPES[canonical_mora_type(mora_type)].decoupled:
        r_hat = r_hat // 2 * 2
        if r_hat < 2:
            raise ValueError(f"rotation / decouple need r_hat >= 2; got {r_hat} for a {in_features}->{out_features} "
                             f"layer at r={r}")
    return r_hat


# ---------------------------------------------------------------------------------------------
# Geometry of one layer: sizes derived once from (in, out, r_hat, type).

# fp32 GEMM output widths are zero-padded to a multiple of 16: CPU BLAS runs ~1.7x faster on them
# (443 -> 448). bf16 GEMMs showed no such effect, and padding would cost extra zero-fills.
_ALIGN = {torch.float32: 16}


@dataclass(frozen=True)
class _Geometry:
    in_features: int
    out_features: int
    r_hat: int
    ops: MoRAOps

    @property
    def chunks(self) -> int:
        """r_hat-chunks M acts on: 1 if shared; if decoupled, only those whose outputs survive the
        final truncation to out_features (the rest of the input provably has no effect)."""
        if not self.ops.decoupled:
            return 1
        return min(-(-self.in_features // self.r_hat), -(-self.out_features // self.r_hat))

    @property
    def width(self) -> int:  # length of the compressed vector
        return self.chunks * self.r_hat

    def r_pad(self, dtype: torch.dtype) -> int:
        align = _ALIGN.get(dtype, 1)
        return -(-self.r_hat // align) * align


def rotation_tables(chunks: int, r_hat: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin (chunks, r_hat): chunk k, column j -> angle k * 10000^(-2(j mod r_hat/2)/r_hat)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, r_hat, 2, device=device, dtype=torch.float32) / r_hat)
    angles = torch.outer(torch.arange(chunks, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half_cols(a: torch.Tensor) -> torch.Tensor:
    h = a.shape[-1] // 2
    return torch.cat([-a[..., h:], a[..., :h]], dim=-1)


def rotate_into(M: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """P_k = M R_k (chunks, r, r), where R_k x = x cos_k + rotate_half(x) sin_k, in fp32 (or fp64):
    folding the rotation into M costs O(chunks r^2) instead of O(tokens x in) per step."""
    M = M.to(torch.promote_types(M.dtype, torch.float32))
    return M * cos.unsqueeze(1) - _rotate_half_cols(M) * sin.unsqueeze(1)  # M J = -rotate_half_cols(M)


def rotate_back(grad_P: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """dL/dM = sum_k dL/dP_k R_k^T (the adjoint of rotate_into)."""
    g = grad_P.to(torch.promote_types(grad_P.dtype, torch.float32))
    return (g * cos.unsqueeze(1) + _rotate_half_cols(g) * sin.unsqueeze(1)).sum(0)


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape[-2:] == (rows, cols):
        return t  # F.pad would copy
    return F.pad(t, (0, cols - t.shape[-1], 0, rows - t.shape[-2]))


# ---------------------------------------------------------------------------------------------
# The adapter path, added onto `out` (N, out_features): shared types (M on the whole compressed
# vector) and decoupled types (a batched GEMM over the chunks).


def _shared_forward(xd, K, geo: _Geometry, out: torch.Tensor, add: bool = True) -> torch.Tensor:
    """out += decompress(K compress(xd)) (add=False: out = ...; every decompress writes all of out);
    returns compress(xd), which the backward needs."""
    r = geo.r_hat
    xc = xd.new_empty(xd.shape[0], r)
    _OPERATORS[geo.ops.compress].apply(xd, xc)
    o = xc @ _pad_to(K, geo.r_pad(xd.dtype), r).t()  # (N, r_pad): aligned GEMM width
    _OPERATORS[geo.ops.decompress].apply(o[:, :r], out, add=add)
    return xc


def _shared_backward(g, xc, K, geo: _Geometry, grad_xd: torch.Tensor | None, add: bool = True):
    """Returns dL/dK; adds dL/dxd into grad_xd (add=False: writes it; skipped when None)."""
    r, rp = geo.r_hat, geo.r_pad(g.dtype)
    go = g.new_empty(g.shape[0], rp)
    if rp > r:
        go[:, r:].zero_()
    _OPERATORS[geo.ops.decompress].adjoint(g, go[:, :r])
    grad_K = (xc.t() @ go)[:, :r].t()  # computed transposed so the GEMM width is aligned
    if grad_xd is not None:
        gxc = go @ _pad_to(K, rp, rp)
        _OPERATORS[geo.ops.compress].adjoint(gxc[:, :r], grad_xd, add=add)
    return grad_K


def _chunk_view(t: torch.Tensor, chunks: int, r: int) -> torch.Tensor:
    """(N, >= chunks*r) -> (N, chunks, r) view of the first chunks*r columns."""
    return t[:, : chunks * r].unflatten(1, (chunks, r))


def _chunks_first(xd: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """The cyclically padded input as a contiguous (chunks, N, r), written in one pass (batched
    GEMMs on CPU copy strided operands anyway)."""
    n, r, c, w = xd.shape[0], geo.r_hat, geo.chunks, geo.width
    pad = w - xd.shape[1]
    if pad > 0 and (pad > xd.shape[1] or c == 1):  # tiny layer: let cyclic_pad handle it
        return _chunk_view(cyclic_pad(xd, w), c, r).transpose(0, 1).contiguous()
    xk = xd.new_empty(c, n, r)
    view = xk.transpose(0, 1)
    full = c - 1 if pad > 0 else c
    view[:, :full].copy_(_chunk_view(xd, full, r))
    if pad > 0:  # the last chunk wraps around to the input's first elements
        view[:, -1, : r - pad].copy_(xd[:, full * r :])
        view[:, -1, r - pad :].copy_(xd[:, :pad])
    return xk


def _from_chunks(src3: torch.Tensor, dst: torch.Tensor, r: int, add: bool) -> None:
    """dst (N, m) <- (or +=) the first m elements of src3[:, :, :r] read as (N, chunks * r)."""
    a, b = divmod(dst.shape[-1], r)
    if a:
        _write(_chunk_view(dst, a, r), src3[:, :a, :r], add)
    if b:
        _write(dst[:, a * r :], src3[:, a, :b], add)


def _into_chunks(src: torch.Tensor, dst3: torch.Tensor, r: int, add: bool) -> None:
    """The first m elements of dst3[:, :, :r] read as (N, chunks * r) <- (or +=) src (N, m)."""
    a, b = divmod(src.shape[-1], r)
    if a:
        _write(dst3[:, :a, :r], _chunk_view(src, a, r), add)
    if b:
        _write(dst3[:, a, :b], src[:, a * r :], add)


def _chunked_forward(xk, P, geo: _Geometry, out: torch.Tensor) -> None:
    """out += concat_k(P_k x_k), truncated or tiled to out_features; xk (chunks, N, r)."""
    c, _, r = xk.shape
    o3 = torch.bmm(xk, _pad_to(P, geo.r_pad(xk.dtype), r).transpose(1, 2)).transpose(0, 1)  # (N, chunks, r_pad)
    k, m = divmod(geo.out_features, geo.width)
    if k:  # whole periods of chunks * r
        out[:, : k * geo.width].unflatten(1, (k, c, r)).add_(o3[:, None, :, :r])
    if m:
        _from_chunks(o3, out[:, k * geo.width :], r, add=True)


def _chunked_backward(g, xk, P, geo: _Geometry, grad_xd: torch.Tensor | None) -> torch.Tensor:
    """Returns dL/dP (chunks, r, r); adds dL/dxd into grad_xd (skipped when None)."""
    c, n, r = xk.shape
    rp, w = geo.r_pad(g.dtype), geo.width
    go3 = g.new_empty(c, n, rp)
    view = go3.transpose(0, 1)  # (N, chunks, r_pad)
    if rp > r:
        view[:, :, r:].zero_()
    k = geo.out_features // w
    if k:  # the output tiles whole periods of chunks * r: fold them, then add the partial one
        if k == 1:
            view[:, :, :r].copy_(_chunk_view(g, c, r))
        else:
            _sum_periods(g[:, : k * w].unflatten(1, (k, c, r)), view[:, :, :r])
        _into_chunks(g[:, k * w :], view, r, add=True)
    else:  # truncated output: what was cut off gets zero gradient
        _into_chunks(g, view, r, add=False)
        a, b = divmod(geo.out_features, r)
        view[:, a : a + 1, b:r].zero_()
        view[:, a + 1 :, :r].zero_()
    grad_P = torch.bmm(xk.transpose(1, 2), go3)[:, :, :r].transpose(1, 2)  # aligned GEMM width
    if grad_xd is None:
        return grad_P
    gx3 = torch.bmm(go3, _pad_to(P, rp, rp)).transpose(0, 1)  # (N, chunks, r_pad)
    pad = w - geo.in_features
    if pad <= 0:
        _from_chunks(gx3, grad_xd[:, :w], r, add=True)
    elif c > 1 and pad <= geo.in_features:  # the last chunk wrapped around to the first columns
        _from_chunks(gx3, grad_xd, r, add=True)
        grad_xd[:, :pad] += gx3[:, -1, r - pad : r]
    else:  # tiny layer
        _fold_into(gx3[:, :, :r].reshape(n, w), grad_xd, add=True)
    return grad_P


def _chunk_kernel(M, cos, sin, geo: _Geometry, dtype) -> torch.Tensor:
    """The P_k of every chunk: M rotated per chunk (built in fp32), or M itself for decouple."""
    if geo.ops.rotate:
        return rotate_into(M, cos, sin).to(dtype)
    return M.to(dtype).expand(geo.chunks, -1, -1)


def _adapter_forward(xd, M, cos, sin, geo: _Geometry, out: torch.Tensor) -> torch.Tensor:
    """out += decompress(M compress(xd)); returns what the backward pass needs saved."""
    if not geo.ops.decoupled:
        return _shared_forward(xd, M.to(xd.dtype), geo, out)
    xk = _chunks_first(xd, geo)
    _chunked_forward(xk, _chunk_kernel(M, cos, sin, geo, xd.dtype), geo, out)
    return xd if geo.width > geo.in_features else xk  # keep the smaller; rebuild chunks if needed


# ---------------------------------------------------------------------------------------------
# The fused layer: y = x W^T (+ b) + decompress(M compress(dropout(x))). The hand-written backward
# saves only what the adapter needs (the compressed input for shared types: less than LoRA keeps),
# recomputes the rotated P_k, and adds the adapter's input gradient onto the base's in place.


class _MoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xd, M, cos, sin, weight, bias, geo: _Geometry):
        if geo.ops.decoupled:
            y = F.linear(x, weight, bias)
            saved = _adapter_forward(xd, M, cos, sin, geo, y)
        else:  # the adapter writes y, then the base GEMM accumulates onto it (as LoRA's addmm): no add pass
            y = x.new_empty(x.shape[0], geo.out_features)
            saved = _shared_forward(xd, M.to(xd.dtype), geo, y, add=False)
            y.addmm_(x, weight.t())
            if bias is not None:
                y += bias
        ctx.geo = geo
        ctx.same_input = xd is x
        ctx.save_for_backward(saved, M, cos, sin, weight, x if weight.requires_grad else None)
        return y

    @staticmethod
    def backward(ctx, g):
        saved, M, cos, sin, weight, x = ctx.saved_tensors
        geo = ctx.geo
        g = g.contiguous()
        if not geo.ops.decoupled:
            return _shared_backward_all(ctx, g, saved, M, weight, x)
        grad_x = g @ weight if ctx.needs_input_grad[0] else None
        grad_xd = None
        if ctx.needs_input_grad[0] and ctx.same_input:
            grad_xd = grad_x  # the adapter's input gradient is added onto the base's
        elif ctx.needs_input_grad[1]:
            grad_xd = g.new_zeros(g.shape[0], geo.in_features)
        P = _chunk_kernel(M, cos, sin, geo, g.dtype)  # recomputed: cheaper than keeping it
        xk = saved if saved.dim() == 3 else _chunks_first(saved, geo)
        grad_P = _chunked_backward(g, xk, P, geo, grad_xd)
        grad_M = rotate_back(grad_P, cos, sin) if geo.ops.rotate else grad_P.sum(0)
        if ctx.same_input:
            grad_xd = None
        grad_w = g.t() @ x if x is not None else None
        grad_b = g.sum(0) if ctx.needs_input_grad[6] else None
        return grad_x, grad_xd, grad_M.to(M.dtype), None, None, grad_w, grad_b, None


def _shared_backward_all(ctx, g, xc, M, weight, x):
    """The backward of the shared types: the adapter's input gradient is written first and the base
    GEMM's accumulated onto it (no zero-fill, no separate add pass)."""
    geo = ctx.geo
    grad_x = grad_xd = None
    if ctx.needs_input_grad[0] and ctx.same_input:
        grad_x = g.new_empty(g.shape[0], geo.in_features)
        grad_M = _shared_backward(g, xc, M.to(g.dtype), geo, grad_x, add=False)
        grad_x.addmm_(g, weight)
    else:
        if ctx.needs_input_grad[1]:
            grad_xd = g.new_empty(g.shape[0], geo.in_features)
        grad_M = _shared_backward(g, xc, M.to(g.dtype), geo, grad_xd, add=False)
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
    grad_w = g.t() @ x if x is not None else None
    grad_b = g.sum(0) if ctx.needs_input_grad[6] else None
    return grad_x, grad_xd, grad_M.to(M.dtype), None, None, grad_w, grad_b, None


class MoRALinear(AdapterLinear):
    """A frozen nn.Linear (`base`) plus MoRA's square matrix `M` (r_hat x r_hat, zero at start)."""

    kind, label, restart_label = "mora", "MoRA", "ReMoRA"
    colour, restart_colour = "#fb6a4a", "#a50f15"  # the MoRA family in reds
    high_rank = True
    param_init: ClassVar[dict[str, InitFn]] = {"M": zeros_init}

    def __init__(self, base: nn.Linear, r: int, mora_type: int | str = 1, dropout: float = 0.0,
                 r_hat_rule: str = "round"):
        super().__init__(base, dropout)
        self.r = r
        self.r_hat_rule = r_hat_rule
        self.mora_type = canonical_mora_type(mora_type)
        self.r_hat = mora_r_hat(base.in_features, base.out_features, r, r_hat_rule, self.mora_type)
        w = base.weight
        self.M = nn.Parameter(torch.zeros(self.r_hat, self.r_hat, device=w.device, dtype=w.dtype))
        self.register_buffer("rot_cos", None, persistent=False)
        self.register_buffer("rot_sin", None, persistent=False)
        self.init_buffers()

    @classmethod
    def from_config(cls, base: nn.Linear, cfg: AdapterConfig) -> MoRALinear:
        return cls(base, r=cfg.r, mora_type=cfg.mora_type, dropout=cfg.dropout, r_hat_rule=cfg.r_hat_rule)

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        a, r = cfg.adapter, cfg.restarts
        if r.every and mora_type_key(a.mora_type) != mora_type_key(r.mora_types[0]):
            raise ConfigError(f"adapter.mora_type={a.mora_type!r} must be the first type of "
                              f"restarts.mora_types={list(r.mora_types)}")

    @property
    def geometry(self) -> _Geometry:
        return _Geometry(self.in_features, self.out_features, self.r_hat, MORA_TYPES[self.mora_type])

    def init_buffers(self) -> None:
        """(Re)compute the fp32 rotation tables (non-persistent; also after to_empty / .to(dtype))."""
        geo = self.geometry
        if not geo.ops.rotate:
            self.rot_cos = self.rot_sin = None
            return
        self.rot_cos, self.rot_sin = rotation_tables(geo.chunks, self.r_hat, device=self.base.weight.device)

    def _apply(self, fn, recurse=True):
        # Keep the rotation tables fp32 and valid whatever .to(dtype) / to_empty did to them.
        super()._apply(fn, recurse)
        if self.rot_cos is not None and self.rot_cos.device.type != "meta":
            self.init_buffers()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        weight, bias = self.base.weight, self.base.bias
        if torch.is_autocast_enabled(x.device.type):
            # The fused Function computes in one dtype: cast its inputs as autocast would cast a
            # linear's (what torch.amp.custom_fwd(cast_inputs=...) does); M stays fp32 and is cast inside.
            dtype = torch.get_autocast_dtype(x.device.type)
            x2, weight = x2.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        xd = self.dropout(x2)
        y = _MoRAFunction.apply(x2, xd, self.M, self.rot_cos, self.rot_sin, weight, bias, self.geometry)
        return y.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    @exact_fp32_matmuls()
    def delta_weight(self) -> torch.Tensor:
        """The exact (out, in) fp32 dW of the current adapter: the adapter path applied to the
        identity (the forward's own operators, so a merge is exact by construction; cost about
        one forward over `in` tokens). With a sharded M every rank must call this (a gather)."""
        M = full_tensor(self.M).float()
        eye = torch.eye(self.in_features, device=M.device, dtype=torch.float32)
        out = eye.new_zeros(self.in_features, self.out_features)
        _adapter_forward(eye, M, self.rot_cos, self.rot_sin, self.geometry, out)
        return out.t().contiguous()

    def set_type(self, mora_type: int | str) -> None:
        """Switch the operator type in place (no merge). r_hat must stay the same: M's shape is
        fixed once the model is sharded and the optimizer holds it."""
        self.mora_type = self._check_switch(mora_type)
        self.init_buffers()

    def _check_switch(self, mora_type: int | str) -> str:
        new = canonical_mora_type(mora_type)
        r_hat = mora_r_hat(self.in_features, self.out_features, self.r, self.r_hat_rule, new)
        if r_hat != self.r_hat:
            raise ValueError(f"cannot switch MoRA type {self.mora_type} -> {new} in place: r_hat would change "
                             f"{self.r_hat} -> {r_hat} (rotation and decouple round r_hat down to even)")
        return new

    @torch.no_grad()
    def merge_and_reinit(self, next_type: int | str | None = None, seed: int = 0, key: str = "",
                         restart: int = 1, restarts: RestartConfig | None = None) -> None:
        """Fold the exact dW into the frozen base weight, zero M and (optionally) switch type: `next_type`,
        or with `restarts` the type restart number `restart` moves to in its cycle (ReMoRA).
        Works on sharded parameters (any engine) outside forward; every rank must call it. A switch that
        would change r_hat (to or from rotation / decouple when the rounded r_hat is odd) raises a
        ValueError before anything changes; the ReMoRA cycle 1-2-3-4 never changes it. `seed` and
        `key` are accepted for symmetry with LoRALinear (M restarts at zero, nothing is drawn)."""
        if restarts is not None:
            next_type = type_after(restarts, restart)
        if next_type is not None:  # validate before touching any weight
            self._check_switch(next_type)
        add_full_(self.base.weight, self.delta_weight())
        set_full_(self.M, torch.zeros(self.r_hat, self.r_hat))
        if next_type is not None:
            self.set_type(next_type)

    def restore_restarts(self, restarts_done: int, restarts: RestartConfig) -> None:
        self.set_type(type_after(restarts, restarts_done))

    def restart_event(self, restarts: RestartConfig, restart: int) -> dict:
        return {"mora_type": type_after(restarts, restart)}

    def check_restarts(self, restarts: RestartConfig, name: str) -> None:
        n_in, n_out = self.in_features, self.out_features
        for t in restarts.mora_types:
            r_hat = mora_r_hat(n_in, n_out, self.r, self.r_hat_rule, t)
            if r_hat != self.r_hat:
                raise ValueError(
                    f"restarts.mora_types={list(restarts.mora_types)}: type {t} has r_hat {r_hat} on {name} "
                    f"({n_in} -> {n_out}), adapter.mora_type={self.mora_type} has {self.r_hat}; a restart cannot "
                    "change r_hat (rotation and decouple round it down to even): pick another adapter.r or cycle")

    def describe(self) -> dict:
        return {"r_hat": self.r_hat, "type": self.mora_type}

    def flops_per_token(self, input_grad: bool, tokens: int) -> int:
        # M (r_hat x r_hat) on each of `chunks` compressed vectors (1 if shared): forward, grad of M, of x
        return 2 * self.geometry.chunks * self.r_hat**2 * (2 + input_grad)

    def size_description(self) -> str:
        return f"MoRA's M ({self.r_hat} x {self.r_hat})"

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, r_hat={self.r_hat}, "
                f"type={self.mora_type} ({MORA_TYPES[self.mora_type].name})")

"""Output layer + cross-entropy in chunks of tokens, never holding the whole (tokens, vocab) logits.

With a 32k vocabulary the logits of a 20m model are 3x the size of all its activations, and the
unfused path passes over them about eight times (logits, fp32 copy, log-softmax, its gradient, the
one-hot scatter, ...). Here each chunk of `chunk_size` tokens goes logits -> exp(logits - max) in
place (the loss from its sum), and straight into both GEMMs of the backward, the softmax's 1/sum
and the one-hot applied to their small operands (_grads_from_exps); the gradients of the hidden
states and of the head weight are kept for the backward pass (as Liger-Kernel's fused linear
cross-entropy does). Same GEMMs, same FLOPs; the loss and the softmax run in fp32 whatever the
compute dtype, as `F.cross_entropy(logits.float(), ...)` does.

A chunk's logits are held vocabulary-major, (vocab, tokens) = weight @ hidden.T: with K = dim as
small as 256, MKL runs that GEMM 1.3-1.6x faster than the token-major hidden @ weight.T (20m shapes,
2 threads; benchmarks/bench_loss.py), and the two backward GEMMs take either layout as a transposed
operand for free. The softmax then runs over dim 0.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F


# On CPU a fresh (vocab, chunk) buffer is a page fault per 4 KiB on every step, ~29 ms of an 850 ms
# 20m step (benchmarks/bench_loss.py); so each thread keeps its scratch buffers (one per dtype) for the next call. They are
# scratch only: nothing returned by a call points into them. CUDA's caching allocator does this itself.
_cpu_scratch = threading.local()


def _scratch(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    buffers = _cpu_scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < rows * cols:
        buffer = buffers[dtype] = torch.empty(rows * cols, dtype=dtype)
    return _prefix(buffer, rows, cols)


def _prefix(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous (rows, cols) view of the start of `buffer` (the last chunk may be short)."""
    return buffer.view(-1)[: rows * cols].view(rows, cols)


def _exp_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, cols: torch.Tensor, shift: bool = True):
    """fp32 (vocab, tokens) logits -> exp(logits - max) in place, over dim 0; return the sums of
    those exps (the softmax's denominators) and the summed cross-entropy. shift=False skips the
    max (two passes) for logits known to be too small for exp and its sum to overflow.

    Written out as whole-tensor passes: torch's log_softmax over a non-last dim walks the vocabulary
    one page-strided row at a time and is 1.7x slower here (benchmarks/bench_loss.py), and exp-ing
    its output exps twice."""
    if shift:
        logits.sub_(logits.amax(dim=0))
    shifted_target = logits[targets, cols]
    logits.exp_()
    sums = logits.sum(dim=0)
    return sums, (sums.log() - shifted_target).sum()


def _unshifted_exp_test(weight: torch.Tensor) -> Callable[[torch.Tensor], bool]:
    """On CPU: a test of whether a chunk's logits are all small enough to exp without the max shift.
    |w . h| <= |w| |h| (Cauchy-Schwarz); exp overflows fp32 at 88.7 and the sum of `vocab` exps
    adds log(vocab), so a bound under 80 - log(vocab) is safe with margin (bf16 rounding included).
    On CUDA reading the bound would synchronise, so there the max is always taken."""
    if weight.device.type != "cpu":
        return lambda h: False
    limit = 80.0 - math.log(weight.shape[0])
    w_norm = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).max().item()
    return lambda h: w_norm * torch.linalg.vector_norm(h, dim=1, dtype=torch.float32).max().item() < limit


def _grads_from_exps(exps, sums, targets, cols, h, weight, grad_hidden, grad_weight, first: bool) -> None:
    """Write (or add) both gradients of the summed cross-entropy from exps = exp(logits - shift).

    In fp32, softmax - onehot is never formed: dividing by the sums scales rows of the small
    operands (h, the grad_hidden rows) and the one-hot is a gather / scatter of rows, which saves a
    pass over the (vocab, tokens) block. In bf16 / fp16 the GEMM operand is rounded anyway, so the
    difference softmax - onehot is formed in fp32 first (it is small where p_target ~ 1)."""
    if h.dtype != torch.float32:
        exps.div_(sums)
        exps[targets, cols] -= 1.0
        dlogits = exps.to(h.dtype)
        if grad_hidden is not None:
            torch.mm(dlogits.t(), weight, out=grad_hidden)
        if grad_weight is not None:
            part = dlogits @ h
            grad_weight.copy_(part) if first else grad_weight.add_(part)
        return
    inv = sums.reciprocal_().unsqueeze(1)
    if grad_hidden is not None:
        torch.mm(exps.t(), weight, out=grad_hidden)
        grad_hidden.mul_(inv).sub_(weight[targets])
    if grad_weight is not None:
        if first:
            torch.mm(exps, h * inv, out=grad_weight)
        else:
            grad_weight.addmm_(exps, h * inv)
        grad_weight.index_add_(0, targets, h, alpha=-1.0)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of cross_entropy(hidden @ weight.T, targets); both gradients computed in
    forward, `chunk_size` tokens at a time, and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = min(chunk_size, n)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # (vocab, tokens) fp32: the logits, then in place their exps
        exps = _scratch(vocab, chunk, torch.float32, hidden.device)
        low_precision = hidden.dtype != torch.float32
        logits = _scratch(vocab, chunk, hidden.dtype, hidden.device) if low_precision else exps
        cols = torch.arange(chunk, device=hidden.device)
        exp_is_safe = _unshifted_exp_test(weight)
        for start in range(0, n, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            rows = h.shape[0]
            lt, et, c = _prefix(logits, vocab, rows), _prefix(exps, vocab, rows), cols[:rows]
            torch.mm(weight, h.t(), out=lt)
            if low_precision:
                et.copy_(lt)
            sums, loss = _exp_cross_entropy_(et, t, c, shift=not exp_is_safe(h))
            total += loss
            _grads_from_exps(et, sums, t, c, h, weight,
                             grad_hidden[start : start + rows] if need_hidden else None,
                             grad_weight if need_weight else None, first=start == 0)
        ctx.weight_dtype = weight.dtype
        ctx.used = False
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        # The saved gradients are scaled in place (no second 33 MB buffer at 20m shapes), so they
        # serve one backward only.
        if ctx.used:
            raise RuntimeError("linear_cross_entropy does not support a second backward (retain_graph=True)")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden.mul_(grad_total.to(grad_hidden.dtype)) if grad_hidden is not None else None
        gw = grad_weight.mul_(grad_total).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                         reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(hidden @ weight.T, targets) for hidden (N, d), weight (V, d), targets (N,), fp32.

    chunk_size 0: the plain path (full logits, F.cross_entropy). Under autocast the GEMMs run in the
    autocast dtype, like nn.Linear's."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r} is not one of ['mean', 'sum']")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if chunk_size <= 0:
        logits = F.linear(hidden, weight).float()
        return F.cross_entropy(logits, targets, reduction=reduction)
    with torch.autocast(device_type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            total = _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
        else:
            total = _sum_without_grad(hidden, weight, targets, chunk_size)
    return total / targets.numel() if reduction == "mean" else total


@torch.no_grad()
def _sum_without_grad(hidden, weight, targets, chunk_size: int) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = (hidden[start : start + chunk_size] @ weight.t()).float()
        total += F.cross_entropy(logits, targets[start : start + chunk_size], reduction="sum")
    return total

"""Output layer + cross-entropy in chunks of tokens, never holding the whole (tokens, vocab) logits.

With a 32k vocabulary the logits of a 20m model are 3x the size of all its activations, and the
unfused path passes over them about eight times (logits, fp32 copy, log-softmax, its gradient, the
one-hot scatter, ...). Here each chunk of `chunk_size` tokens goes logits -> log_softmax -> softmax
minus one-hot, in place, and straight into both GEMMs of the backward; the gradients of the hidden
states and of the head weight are kept for the backward pass (as Liger-Kernel's fused linear
cross-entropy does). Same GEMMs, same FLOPs; the loss and the softmax run in fp32 whatever the
compute dtype, as `F.cross_entropy(logits.float(), ...)` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# On CPU the logits are made a few rows at a time, so that a block (16 MiB in fp32) stays in the
# last-level cache between its GEMM and its softmax: the GEMM runs 1.35x faster when its output is
# not streamed to memory (20m shapes), and log_softmax reads it back from cache.
CPU_BLOCK_ELEMENTS = 1 << 22


def _softmax_minus_onehot_(logits: torch.Tensor, targets: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write softmax(logits) - onehot(targets) into `out` (fp32); return the summed cross-entropy."""
    torch.log_softmax(logits, dim=1, out=out)  # row by row, the row in cache
    rows = torch.arange(targets.shape[0], device=targets.device)
    loss = -out[rows, targets].sum()
    out.exp_()
    out[rows, targets] -= 1.0
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of cross_entropy(hidden @ weight.T, targets); gradients computed in forward,
    `chunk_size` tokens at a time (the backward GEMMs), their logits in cache-sized blocks on CPU."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = min(chunk_size, n)
        block = chunk if hidden.device.type != "cpu" else max(1, min(chunk, CPU_BLOCK_ELEMENTS // vocab))
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        probs = torch.empty(chunk, vocab, dtype=torch.float32, device=hidden.device)  # softmax - onehot
        logits = torch.empty(block, vocab, dtype=hidden.dtype, device=hidden.device) if block < chunk else None
        for start in range(0, n, chunk):
            h, rows = hidden[start : start + chunk], min(chunk, n - start)
            for b in range(0, rows, block):
                hb = h[b : b + block]
                lb = torch.mm(hb, weight.t(), out=logits[: hb.shape[0]]) if logits is not None else hb @ weight.t()
                total += _softmax_minus_onehot_(lb.float(), targets[start + b : start + b + hb.shape[0]],
                                                probs[b : b + hb.shape[0]])
            dlogits = probs[:rows].to(hidden.dtype)
            if need_hidden:
                torch.mm(dlogits, weight, out=grad_hidden[start : start + rows])
            if need_weight and h.dtype == torch.float32:
                grad_weight.addmm_(dlogits.t(), h)
            elif need_weight:  # bf16 / fp16 GEMM, summed over chunks in fp32
                grad_weight += dlogits.t() @ h
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_total.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None
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

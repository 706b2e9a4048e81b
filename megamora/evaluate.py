"""Perplexity: exp of the token-weighted mean cross-entropy, summed over all ranks before dividing."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megamora.distributed import all_reduce_sum, process_group_active


@torch.no_grad()
def evaluate_loss(model: nn.Module, sequences: torch.Tensor, micro_batch_size: int,
                  device: torch.device) -> tuple[float, int]:
    """Mean next-token cross-entropy and the number of target tokens over every rank's `sequences`
    (n, seq_len + 1): this rank's share (megamora.data.validation_share). Collective under a process
    group: every rank runs as many forward passes as the rank with the most batches (FSDP gathers
    are collective), a rank that has run out forwarding a dummy batch whose loss is not counted."""
    rounds = _most_over_ranks(-(-sequences.shape[0] // micro_batch_size), device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: one read at the end
    count = 0
    for i in range(rounds):
        batch = sequences[i * micro_batch_size : (i + 1) * micro_batch_size].to(device)
        if batch.shape[0] == 0:  # nothing left here; keep in step with the other ranks
            model(torch.zeros(1, sequences.shape[1] - 1, dtype=torch.long, device=device))
            continue
        loss_sum += model(batch[:, :-1], targets=batch[:, 1:], reduction="sum").double()
        count += batch[:, 1:].numel()
    model.train(was_training)
    loss_sum, count = all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(count)]), device)
    if count == 0:
        raise ValueError("no validation sequence to evaluate")
    return loss_sum / count, int(count)


def _most_over_ranks(value: int, device: torch.device) -> int:
    if not process_group_active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss)

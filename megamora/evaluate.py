"""Perplexity: exp of the token-weighted mean cross-entropy, summed over all ranks before dividing."""

from __future__ import annotations

import math

import torch
from torch import nn

from megamora.distributed import all_reduce_sum


@torch.no_grad()
def evaluate_loss(model: nn.Module, sequences: torch.Tensor, micro_batch_size: int, rank: int, world_size: int,
                  device: torch.device) -> tuple[float, int]:
    """Mean next-token cross-entropy over `sequences` (n, seq_len + 1) and the number of target tokens.

    Rank r takes sequences r, r + world, ...; every rank runs the same number of forward passes (FSDP
    gathers are collective), padding its last batch with weight-0 rows."""
    n = sequences.shape[0]
    per_rank = -(-n // world_size)
    rounds = -(-per_rank // micro_batch_size)
    mine = sequences[rank::world_size]
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for i in range(rounds):
        batch = mine[i * micro_batch_size : (i + 1) * micro_batch_size]
        if batch.shape[0] == 0:  # nothing left here; keep in step with the other ranks
            model(sequences[:1, :-1].to(device))
            continue
        batch = batch.to(device)
        loss_sum += model(batch[:, :-1], targets=batch[:, 1:], reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    loss_sum, count = all_reduce_sum([loss_sum, float(count)], device)
    return loss_sum / count, int(count)


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss)

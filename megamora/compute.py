"""How the model computes, not what: activation checkpointing, regional compilation and the chunked
output layer, set from `parallel.*` on the model before it is sharded. None of them changes a
parameter name, so checkpoints, adapters and the Hugging Face export do not see them."""

from __future__ import annotations

from torch import nn

from megamora.config import ParallelConfig

# Distinct graphs one block may need: ReMoRA's four operator types x train / eval x grad / no grad.
# Past torch's default of 8 it would silently fall back to eager.
RECOMPILE_LIMIT = 64


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    for block in model.layers:
        block.activation_checkpointing = enabled


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each transformer block in place (names unchanged, unlike torch.compile(model)):
    one small graph compiled once and reused by every block of the same structure, as torchtitan
    does. A ReMoRA switch of operator type changes an attribute the graph is guarded on, so the
    next forward recompiles instead of running a stale graph."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in model.layers:
        block.compile()


def configure_compute(model: nn.Module, cfg: ParallelConfig) -> None:
    set_activation_checkpointing(model, cfg.activation_checkpointing)
    model.lm_head.chunk_size = cfg.loss_chunk_size
    if cfg.compile:
        compile_blocks(model)

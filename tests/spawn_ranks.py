"""Run a test's worker on N local ranks with torch.multiprocessing, as torchrun would."""

from __future__ import annotations

from typing import Callable

import torch.multiprocessing as mp

from megamora.distributed import exit_process


def _run_then_exit(rank: int, worker: Callable, *args) -> None:
    worker(rank, *args)
    exit_process(0)  # a finished rank must not die in gloo's teardown (SIGABRT under load)


def spawn_ranks(worker: Callable, *args, nprocs: int = 2) -> None:
    """`worker(rank, *args)` on `nprocs` processes; an exception on any rank fails the caller."""
    mp.spawn(_run_then_exit, args=(worker, *args), nprocs=nprocs, join=True)

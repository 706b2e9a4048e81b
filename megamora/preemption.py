"""Stopping a run cleanly on SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 (SLURM's early warning, `--signal`).

The handler only records the signal. Every `stop_check_every` optimizer steps the Trainer asks
`requested()`, a MAX all-reduce of the recorded signal over the ranks, so every rank stops after the
same step (a signal may reach the ranks at different moments, or only some of them); then it saves
and raises Preempted. Asking is a host sync (the answer decides what the host does next), which is
why it is not done after every step."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from megamora.distributed import process_group_active

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, signame: str, step: int, checkpoint):
        super().__init__(f"stopped by {signame} at step {step}; checkpoint saved: {checkpoint}")
        self.signame, self.step, self.checkpoint = signame, step, checkpoint


class StopSignals:
    """While entered, the stop signals set a flag instead of killing the process (or raising
    KeyboardInterrupt); the previous handlers come back on exit."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._record)
            except ValueError:  # not the main thread: signals keep their handlers
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        self.signum = self.signum or signum  # repeats (torchrun forwards what SLURM also sends) change nothing

    def requested(self, device: torch.device) -> str | None:
        """Collective: the name of the signal any rank got, or None."""
        signum = self.signum
        if process_group_active():
            flag = torch.tensor([signum], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signal.Signals(signum).name if signum else None

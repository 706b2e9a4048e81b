"""The training loop never waits for the device between log steps: losses and grad norms stay there,
the stop signal is asked every stop_check_every steps, and timing synchronises only where the loop
reads values anyway (issue 16, item 4).

A CUDA run would show the waits with torch.cuda.set_sync_debug_mode; on CPU every read of a tensor
into Python is counted instead (item, float, int, bool, tolist, cpu, numpy), on the training thread."""

import threading
import traceback
from pathlib import Path

import pytest
import torch

from megamora.config import load_config
from test_train import tiny_overrides

READS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")


class SyncRecorder:
    """Every tensor read on the main thread, with the step the loop is at and whether it happened
    inside Trainer.train_step."""

    def __init__(self, monkeypatch):
        from megamora.train import Trainer

        self.reads: list[tuple[int, bool, str]] = []
        self.step, self.in_step = 0, False
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._recording(getattr(torch.Tensor, name)))
        train_step = Trainer.train_step

        def recorded_train_step(trainer):
            self.step, self.in_step = trainer.step + 1, True
            try:
                return train_step(trainer)
            finally:
                self.in_step = False

        monkeypatch.setattr(Trainer, "train_step", recorded_train_step)

    def _recording(self, read):
        def recorded(tensor, *args, **kwargs):
            if threading.current_thread() is threading.main_thread():
                caller = traceback.extract_stack(limit=2)[0]
                self.reads.append((self.step, self.in_step, f"{Path(caller.filename).name}:{caller.lineno}"))
            return read(tensor, *args, **kwargs)

        return recorded


def test_no_host_sync_between_log_steps(shared_data, tmp_path, monkeypatch):
    from megamora import loss
    from megamora.run import pretrain

    # The chunked loss reads a logit bound on CPU only (it skips a pass there); on CUDA it never
    # reads it (loss._unshifted_exp_test): take the CUDA behaviour, the path under test.
    monkeypatch.setattr(loss, "_unshifted_exp_test", lambda weight: (lambda hidden: False))
    cfg = load_config(None, tiny_overrides(shared_data, tmp_path / "run", "steps=8", "logging.log_every=4",
                                           "eval_every=0", "save_every=0"))
    recorder = SyncRecorder(monkeypatch)
    result = pretrain(cfg)
    assert len(result.losses) == 8  # every step's loss, read on the log steps

    in_steps = [r for r in recorder.reads if r[1]]
    assert not in_steps, f"reads inside train_step: {in_steps}"
    between = [r for r in recorder.reads if r[0] not in (0, 4, 8)]  # 0: set-up, before the first step
    assert not between, f"reads after non-log steps: {between}"
    assert any(step == 4 for step, _, _ in recorder.reads)  # the recorder sees the log step's read


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (part of the GPU check)")
def test_no_cuda_sync_between_log_steps(shared_data, tmp_path, monkeypatch):
    """The same on CUDA, by CUDA itself: synchronising calls raise from the start of a step to the
    end of the next log step's train_step (then the log step reads, synchronised by design)."""
    from megamora.run import pretrain
    from megamora.train import Trainer

    log_every, steps = 4, 8
    train_step = Trainer.train_step

    def guarded_train_step(trainer):
        torch.cuda.set_sync_debug_mode("error")
        out = train_step(trainer)
        if (trainer.step + 1) % log_every == 0 or trainer.step + 1 == steps:
            torch.cuda.set_sync_debug_mode("default")
        return out

    monkeypatch.setattr(Trainer, "train_step", guarded_train_step)
    cfg = load_config(None, tiny_overrides(shared_data, tmp_path / "run", f"steps={steps}", "parallel.device=cuda",
                                           f"logging.log_every={log_every}", "eval_every=0", "save_every=0"))
    try:
        assert len(pretrain(cfg).losses) == steps
    finally:
        torch.cuda.set_sync_debug_mode("default")


class CountingStop:
    """A StopSignals stand-in: records the steps at which the Trainer asks."""

    def __init__(self, trainer, stop_at: int | None = None):
        self.trainer, self.stop_at, self.asked = trainer, stop_at, []

    def requested(self, device):
        self.asked.append(self.trainer.step)
        return "SIGTERM" if self.stop_at is not None and self.trainer.step >= self.stop_at else None


def test_stop_signal_is_asked_every_stop_check_every_steps(shared_data, tmp_path):
    from megamora.distributed import init_distributed
    from megamora.preemption import Preempted
    from megamora.run import build_trainer

    cfg = load_config(None, tiny_overrides(shared_data, tmp_path / "run", "steps=7", "stop_check_every=3",
                                           "logging.log_every=5", "eval_every=0", "save_every=0"))
    trainer, _ = build_trainer(cfg, init_distributed(cfg.parallel))
    stop = CountingStop(trainer)
    trainer.fit(stop=stop)
    assert stop.asked == [3, 6]  # never after the last step (7)

    # a signal that arrives at step 4 stops the run at step 6, the next step the ranks ask at
    cfg = load_config(None, tiny_overrides(shared_data, tmp_path / "stopped", "steps=7", "stop_check_every=3",
                                           "logging.log_every=5", "eval_every=0", "save_every=0"))
    trainer, _ = build_trainer(cfg, init_distributed(cfg.parallel))
    stop = CountingStop(trainer, stop_at=4)
    with pytest.raises(Preempted) as stopped:
        trainer.fit(stop=stop)
    assert stopped.value.step == 6 and stop.asked == [3, 6]
    assert len(trainer.losses) == 6  # the stop step is logged: nothing left on the device unread
    assert stopped.value.checkpoint.name == "step_00000006"

"""launch/pretrain.py with test-only faults, set through the environment (works under torchrun):

    MEGAMORA_TEST_STEP_SLEEP=S      sleep S seconds after every optimizer step (time to signal mid-run)
    MEGAMORA_TEST_ENOSPC=STEP[:RANK[:data]]  the checkpoint of STEP fails with ENOSPC on RANK (default:
        every rank) after writing part of a file: a DCP shard (inside DCP, as a full disk would), or
        with `data`, the rank's data-state file (outside DCP: only the trainer's own collective tells
        the other ranks)
    MEGAMORA_TEST_RANK_DIR=DIR      each rank writes DIR/rank<R>.pid at start and DIR/rank<R>.rc (its
        exit code) at the end: what torchrun's own exit code (1 for any failure) does not say
"""

import contextlib
import errno
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))


def slow_steps(seconds: float) -> None:
    from megamora.train import Trainer

    train_step = Trainer.train_step

    def slow(self):
        out = train_step(self)
        time.sleep(seconds)
        return out

    Trainer.train_step = slow


def disk_full_at(step: int, rank: int | None, where: str) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystem

    from megamora import checkpoint

    doomed = f".tmp-step_{step:08d}"
    mine = rank is None or rank == int(os.environ.get("RANK", 0))

    def fail(path, stream) -> None:
        stream.write(b"\0" * 64)  # part of the file, as a full disk leaves it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    create_stream, write_json = FileSystem.create_stream, checkpoint._write_json

    @contextlib.contextmanager
    def failing_shard(self, path, mode):
        with create_stream(self, path, mode) as stream:
            if mine and doomed in str(path) and "w" in mode:
                fail(path, stream)
            yield stream

    def failing_json(path, obj):
        if mine and doomed in str(path) and path.parent.name == "data":
            with open(path, "wb") as stream:
                fail(path, stream)
        write_json(path, obj)

    if where == "data":
        checkpoint._write_json = failing_json
    else:
        FileSystem.create_stream = failing_shard


def rank_file(suffix: str) -> Path | None:
    folder = os.environ.get("MEGAMORA_TEST_RANK_DIR")
    return Path(folder, f"rank{os.environ.get('RANK', 0)}.{suffix}") if folder else None


if __name__ == "__main__":
    if pid_file := rank_file("pid"):
        pid_file.write_text(str(os.getpid()))
    if os.environ.get("MEGAMORA_TEST_STEP_SLEEP"):
        slow_steps(float(os.environ["MEGAMORA_TEST_STEP_SLEEP"]))
    if os.environ.get("MEGAMORA_TEST_ENOSPC"):
        step, rank, where = (os.environ["MEGAMORA_TEST_ENOSPC"].split(":") + ["", ""])[:3]
        disk_full_at(int(step), int(rank) if rank else None, where)
    from pretrain import main

    from megamora.distributed import exit_process

    rc = main()
    if rc_file := rank_file("rc"):
        rc_file.write_text(str(rc))
    exit_process(rc)

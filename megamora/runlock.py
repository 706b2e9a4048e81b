"""One writer per run directory: rank 0 holds an exclusive flock on `run_dir/.lock` for the run's
lifetime, taken before anything is written. A second run on the same directory is refused on every
rank. The kernel drops the lock when its process dies (SIGKILL included), so a stale `.lock` file never
blocks a resume; the file stays (unlinking a lock file races with the next opener).

flock is as good as the filesystem: local disks always; NFS and Lustre only across nodes when mounted
with coherent locking (see README, "Checkpoints, stopping and resuming")."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from megamora.distributed import DistInfo, process_group_active

log = logging.getLogger("megamora")

LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # run_dir -> locked fd, for the life of this process's run


class RunDirLocked(Exception):
    """Another live process holds the run directory."""


def lock_run_dir(run_dir: str | Path, dist_info: DistInfo) -> None:
    """Collective: rank 0 creates `run_dir` and takes its lock (once per process); every rank raises
    RunDirLocked if another process holds it."""
    run_dir = Path(run_dir).resolve()
    holder = None
    if dist_info.is_main and run_dir not in _held:
        run_dir.mkdir(parents=True, exist_ok=True)
        holder = _acquire(run_dir)
    holder = _broadcast(holder)
    if holder is not None:
        raise RunDirLocked(f"run directory {run_dir} is in use by {holder} (lock {run_dir / LOCK_NAME}); "
                           "stop that run first or pick another run_dir")


def unlock_run_dir(run_dir: str | Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


def _acquire(run_dir: Path) -> str | None:
    """Lock `run_dir` for this process; None, or 'pid P on host H' of the process holding it."""
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        return holder
    except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS: a filesystem without (this kind of) locking
        os.close(fd)
        log.warning("run directory %s cannot be locked (%s): nothing stops a second run from writing into it",
                    run_dir, os.strerror(e.errno or errno.ENOLCK))
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
    os.fsync(fd)
    _held[run_dir] = fd
    return None


def _read_holder(fd: int) -> str:
    for _ in range(20):  # the holder writes its name right after locking: give it a moment
        text = os.pread(fd, 512, 0).decode(errors="replace").split()
        if len(text) == 2:
            return f"pid {text[1]} on host {text[0]}"
        time.sleep(0.05)
    return "another process (no holder recorded)"


def _broadcast(holder: str | None) -> str | None:
    if not process_group_active():
        return holder
    box = [holder]
    dist.broadcast_object_list(box, src=0)
    return box[0]

"""One owner per run folder, and decisions about it taken once, by the main process.

The lock is ``fcntl.flock`` on ``<run>/.lock``: the kernel drops it when the process dies in any
way, so a killed run never leaves a stale lock, and the next run needs no clean-up. The file also
holds the owner's PID and host, which the refusal names.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from accelerate.utils import broadcast_object_list

from diffdistill.config import ConfigError

LOCK = ".lock"


class RunFolderLock:
    """An exclusive lock on a run folder for as long as this object holds it (or the process lives)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.fd = Path(run_dir), None

    def acquire(self) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"out={self.run_dir} is a file, not a folder; choose another out=")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 200).decode(errors="replace").split() or ["?", "?"]
            os.close(fd)
            raise ConfigError(f"{self.run_dir} is locked by process {owner[0]} on {owner[-1]}: "
                              "another training is using it; wait for it to end or choose another out=") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def main_decides(accelerator, decide):
    """Runs ``decide()`` on the main process alone and returns its (picklable) result on every
    process; a ConfigError there is raised on every process, so none waits at a barrier for it."""
    outcome = [None, None]
    if accelerator.is_main_process:
        try:
            outcome = [decide(), None]
        except ConfigError as e:
            outcome = [None, str(e)]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise ConfigError(outcome[1])
    return outcome[0]


def move_old_run_aside(run_dir: Path) -> list[Path]:
    """``resume=false`` in a folder holding a run: its checkpoints and metrics move to
    ``*.old-<time>`` names (kept, not mixed with the new run's); returns where they went."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for name, aside in (("checkpoints", f"checkpoints.old-{stamp}"), ("metrics.jsonl", f"metrics.old-{stamp}.jsonl")):
        path = Path(run_dir) / name
        if path.exists() and (path.is_file() or any(path.iterdir())):
            path.rename(path.with_name(aside))
            moved.append(path.with_name(aside))
    return moved


__all__ = ["LOCK", "RunFolderLock", "main_decides", "move_old_run_aside"]

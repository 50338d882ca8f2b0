"""One trainer per workdir: an exclusive `flock` on WORKDIR/train.lock, held by process 0 while `train` runs.

The file records `pid host` of the holder for the error a second trainer gets; only the kernel lock counts, so a
trainer killed by SIGKILL (or a crashed node, for NFS's lock leases) never leaves a stale lock behind. The file
itself stays (emptied on release): removing it could let two trainers lock two different files of the same name.
Cloud workdirs (gs://...) have no file locks: there the check is skipped.
"""

from __future__ import annotations

import fcntl
import os
import socket

from dlm_jax import fileio
from dlm_jax.errors import UserError

LOCK_NAME = "train.lock"


class WorkdirLock:
    """The exclusive train lock of one local workdir; `acquire` is idempotent, `release` gives it back."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir = workdir
        self.path = fileio.join(workdir, LOCK_NAME)
        # cloud object stores have no advisory locks: two trainers there are not detected
        self.enabled = enabled and not fileio.is_cloud(workdir)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, create: bool = True) -> None:
        """Takes the lock, or raises a one-line UserError naming the trainer that holds it. Without `create`, a
        workdir that does not exist yet is left alone (nothing is written; the lock is taken once it is made)."""
        if not self.enabled or self.held:
            return
        directory = fileio.expand(self.workdir)
        if not os.path.isdir(directory):
            if not create:
                return
            os.makedirs(directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no truncation: the holder's record stays
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", errors="replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "a process that just started"
            raise UserError(f"workdir {self.workdir!r} is in use by another trainer ({who}; lock {self.path}); wait "
                            "for it to finish or stop it, or use another --workdir") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Empties the record and unlocks (the kernel also unlocks when the process dies)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the only descriptor of the open file releases the flock

    def __enter__(self) -> WorkdirLock:
        self.acquire(create=False)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

"""Advisory file locks (fcntl.flock) that keep two processes from writing the same run folder or building
the same target bank at once. The kernel drops a lock when its holder dies, however it dies (SIGKILL
included), so a lock never outlives its run; a lock released normally also removes its file (a killed
holder's file stays, unlocked, and is taken over by the next run).

A mount without locks (NFS mounted with nolock, some FUSE and Lustre set-ups) refuses flock with ENOLCK,
ENOSYS or EOPNOTSUPP: the lock then warns once, naming the path, and lets its holder go on unlocked (a
traceback before training would stop every run on such a mount, while an unlocked one only loses the guard
against a second run on the same folder)."""
from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path
from typing import Callable

from rela.errors import RelaError
from rela.utils import distributed as dist_utils


NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


def _warn_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class FileLock:
    """An exclusive flock on `path` (created if missing), which records the holder's pid for messages.
    Works on local file systems and on NFS v4 (flock is emulated with POSIX locks there). Where the mount has
    no locks, `warn(message)` is called and every acquire succeeds unlocked (`unlocked` is then True)."""

    def __init__(self, path: Path, warn: Callable[[str], None] = _warn_to_stderr):
        self.path = Path(path)
        self.warn = warn
        self.unlocked = False
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        return self._lock(fcntl.LOCK_EX | fcntl.LOCK_NB)

    def acquire(self) -> None:
        self._lock(fcntl.LOCK_EX)

    def holder(self) -> str:
        """The pid recorded by the process that holds (or last held) the lock, or '?'."""
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def release(self) -> None:
        """Removes the file, then unlocks: a finished run leaves nothing behind (`_lock` retries on a file
        that was removed while it waited, so two holders can never lock two different files)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            if not self.unlocked:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _lock(self, flags: int) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as err:
                if err.errno not in NO_LOCKS:
                    os.close(fd)
                    raise
                self.warn(f"warning: cannot lock {self.path}: {err.strerror} (errno {err.errno}; the mount has no "
                          "file locks): going on without the lock, so nothing stops a second run from using "
                          f"{self.path.parent} at the same time")
                self.unlocked = True
                break
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:  # the file we locked is still the one at the path
                break
            os.close(fd)  # its holder removed it while we waited: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


RUN_LOCK_NAME = ".lock"


def lock_run_folder(run_dir: Path, dist: dist_utils.DistInfo) -> FileLock | None:
    """Rank 0 takes the run folder's lock for the run's life; RelaError on every rank if another process
    holds it (a second run on the same --out would interleave checkpoints and metrics with the first)."""
    lock, error = None, None
    if dist.is_main:
        lock = FileLock(Path(run_dir) / RUN_LOCK_NAME)
        if not lock.try_acquire():
            error = (f"{run_dir} is in use by another run (pid {lock.holder()} holds {lock.path}); wait for it "
                     "to end, or pass another --out")
            lock = None
    error = dist_utils.gather_objects(error, dist)[0]
    if error is not None:
        raise RelaError(error)
    return lock

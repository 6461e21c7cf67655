"""One writer per output folder: the long commands (vigface-train-fr, -train-diffusion, -gen and
`vigface demo`) lock their folder, and a second process that would write into it is refused.

Why: a run resumed while it is still running (a second shell, a scheduler's retry) would
interleave its checkpoints with the first one's, and a second vigface-gen deleted the first's
half-written shard as a killed run's leftover, so the first died with an unrelated "No such file"
error (seen by hand). The lock is `fcntl.flock` on `<folder>/.lock` (`.lock-rank<r>` for the
other ranks of a multi-GPU run, which share the folder): the kernel drops it when its process
ends, SIGKILL included, so a killed run never leaves behind a lock that blocks its resume. A run
that ends (or is refused) removes its lock file; one killed leaves an unlocked file, reused.

    with FolderLock(out) as lock:
        ...                     # checks that may refuse the run: nothing is created yet
        lock.acquire(rank)      # once the folder exists; raises VigfaceError if another holds it
        ...
"""

from __future__ import annotations

import os
from pathlib import Path

from vigface.errors import VigfaceError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): folders go unlocked, as before this module existed
    fcntl = None


class FolderLock:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._file, self._path = None, None

    def lock_path(self, rank: int = 0) -> Path:
        return self.folder / (".lock" if rank == 0 else f".lock-rank{rank}")

    def acquire(self, rank: int = 0) -> None:
        """Lock the folder (which must exist) for this process, or raise naming the holder's pid."""
        if self._file is not None or fcntl is None:
            return
        path = self.lock_path(rank)
        while True:
            # "a+": create it if missing without truncating the holder's pid before we hold the lock
            lock_file = open(path, "a+")
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock_file.seek(0)
                holder = lock_file.read().strip() or "unknown"
                lock_file.close()
                raise VigfaceError(
                    f"another process (pid {holder}) is writing into {self.folder}; "
                    "wait for it to finish (or stop it), then rerun, or choose another output folder"
                ) from None
            # The holder may have removed the file between our open and our flock (release below):
            # a lock on that orphan would not exclude anyone, so take the file now at the path.
            try:
                current = os.stat(path).st_ino == os.fstat(lock_file.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            lock_file.close()
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        self._file, self._path = lock_file, path

    def release(self) -> None:
        if self._file is not None:
            self._path.unlink(missing_ok=True)  # while still locked: see acquire
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

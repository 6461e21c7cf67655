"""FolderLock: one writer per output folder, released by the kernel when its holder dies."""

import os
import signal
import subprocess
import sys

import pytest

from vigface.errors import VigfaceError
from vigface.run_lock import FolderLock

HOLD = """
import sys
from vigface.run_lock import FolderLock
lock = FolderLock(sys.argv[1])
lock.acquire(int(sys.argv[2]))
print("held", flush=True)
sys.stdin.read()  # hold until the test closes stdin or kills us
lock.release()
"""


def hold_in_child(folder, rank=0) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), str(rank)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    child = hold_in_child(tmp_path)
    try:
        refused = rf"another process \(pid {child.pid}\) is writing into {tmp_path}"
        with pytest.raises(VigfaceError, match=refused):
            FolderLock(tmp_path).acquire()
        with FolderLock(tmp_path) as other_rank:
            other_rank.acquire(rank=1)  # another rank's lock is its own
            assert (tmp_path / ".lock-rank1").read_text() == f"{os.getpid()}\n"
        assert not (tmp_path / ".lock-rank1").exists()
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert child.returncode == 0
    assert not (tmp_path / ".lock").exists()  # a run that ends removes its lock file
    with FolderLock(tmp_path) as lock:
        lock.acquire()
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / ".lock").exists()


def test_a_killed_holder_does_not_block_the_rerun(tmp_path):
    child = hold_in_child(tmp_path)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert (tmp_path / ".lock").exists()  # left behind, but no longer locked
    with FolderLock(tmp_path) as lock:
        lock.acquire()
        # and it now excludes others again
        with pytest.raises(VigfaceError, match="another process"):
            FolderLock(tmp_path).acquire()


def test_without_fcntl_the_folder_goes_unlocked(tmp_path, monkeypatch):
    """On a system without fcntl (Windows) the commands run as they did before the lock existed."""
    import vigface.run_lock as run_lock

    monkeypatch.setattr(run_lock, "fcntl", None)
    with FolderLock(tmp_path) as first, FolderLock(tmp_path) as second:
        first.acquire()
        second.acquire()  # no error: nothing is locked
    assert list(tmp_path.iterdir()) == []

"""One live run per folder: an advisory lock that the kernel drops when its process dies.

``fcntl.flock`` on ``<run folder>/.lock``: a second run, or a resume, into a folder that a
live run holds stops with one line naming the holder. A lock left by a killed run is free
again (the kernel released it with the process), so the next run simply takes it over, and
first removes what a write killed mid-way left behind. The file names its holder (pid, host,
start) for that message and is removed when the run ends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from mnistlab.core.errors import UserError
from mnistlab.core.files import remove_temporaries

LOCK = ".lock"


class FolderInUse(UserError):
    """Another live process holds the run folder."""


@contextlib.contextmanager
def hold(folder: Path) -> Iterator[None]:
    """Hold ``folder`` for this process while the block runs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = _acquire(path)
    try:
        since = dt.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode())
        for place in (folder, folder / "checkpoints"):  # a killed run's half-written files
            remove_temporaries(place)
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: a waiter re-checks the inode
        os.close(fd)


def _acquire(path: Path) -> int:
    """An open, locked descriptor of ``path``; the file it locked is still ``path`` (a run
    that ended may have removed the file between our open and our lock: then try again)."""
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderInUse(
                f"hydra.run.dir={path.parent} is in use by a live run ({holder}); wait for it "
                "to end or stop it, or choose another folder"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        os.close(fd)
    raise FolderInUse(f"hydra.run.dir={path.parent}: could not take its lock {path}")

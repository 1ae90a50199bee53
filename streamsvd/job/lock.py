"""One job per OUT_DIR, per work directory and per PROFILE_DIR: an OS-level lock held for the life of the process.

`fcntl.flock` on a lock file: the kernel drops the lock when the process dies, however it dies
(SIGKILL included), so a killed job never leaves a stale lock behind. The file records who holds
it (pid, host, command line, start time), so a second `run` exits at once with one `error:` line
naming the other process. The file is removed when the lock is released; a lock file left by a
killed process is just a file: the next job takes the lock on it and overwrites its record.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import StreamSVDError

LOCK_NAME = ".streamsvd.lock"


class JobLocked(StreamSVDError):
    pass


def _owner_record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()) + " UTC",
    }


def _describe(record: dict | None) -> str:
    if not record:
        return "another process"
    return f"process {record.get('pid')} on {record.get('host')} ({record.get('command') or 'unknown command'}, since {record.get('started')})"


def read_owner(lock_path: Path) -> dict | None:
    try:
        data = json.loads(Path(lock_path).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


class DirLock:
    """An exclusive, non-blocking flock on DIR/.streamsvd.lock; `what` names DIR in messages."""

    def __init__(self, directory: Path, what: str):
        self.dir, self.what = Path(directory), what
        self.path = self.dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "DirLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise JobLocked(
                    f"{self.what} {self.dir} is in use by another streamsvd job: {_describe(read_owner(self.path))}",
                    f"wait for that job to finish (or stop it), or choose another {self.what}",
                ) from None
            # The holder before us may have removed the file after we opened it: then our lock is on
            # an unlinked inode that nobody else can see; take it again on the file now at the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        data = (json.dumps(_owner_record()) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it, so nobody locks a file we remove
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None


class JobLocks:
    """The locks of one job (OUT_DIR first, then its work directory), released together."""

    def __init__(self):
        self.locks: list[DirLock] = []

    def take(self, directory: Path, what: str) -> None:
        if any(lock.dir == Path(directory) for lock in self.locks):
            return
        self.locks.append(DirLock(directory, what).acquire())

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()

"""One job per OUT_DIR, per work directory and per PROFILE_DIR: an OS-level lock held for the life of the process.

`fcntl.flock` on a lock file: the kernel drops the lock when the process dies, however it dies
(SIGKILL included), so a killed job never leaves a stale lock behind. The file records who holds
it (pid, host, command line, start time), so a second `run` exits at once with one `error:` line
naming the other process. The file is removed when the lock is released; a lock file left by a
killed process is just a file: the next job takes the lock on it and overwrites its record.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import StreamSVDError
from ..io.fsutil import describe_process, flock_folder, flock_holders

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
    """The locks of one job (OUT_DIR first, then its work directory), released together.

    OUT_DIR's own folder is also flocked exclusively (`take_folder`): the commands that read a finished output
    (quantize, export, eval, verify, streamsvd.load) hold it shared while they read (`reading_output`), so a `run`
    that would rewrite it (--restart, another job's resume) and a reader never overlap. They did: an export or
    quantize during `run --restart` wrote a silent mix of the two jobs' shards, and eval gave a mixed model's figure.
    """

    def __init__(self):
        self.locks: list[DirLock] = []
        self.folders: list[int] = []
        self.made: list[Path] = []  # folders `take` made: removed on release where they are still empty

    def take(self, directory: Path, what: str, make: bool = False) -> None:
        """Lock `directory` (DirLock); `make`: make it first (and its missing parents), and remove what this made
        if it is empty when the locks are released: a job refused, here or on another rank, leaves no empty folder."""
        directory = Path(directory)
        if make:
            self.made = _make_folders(directory) + self.made
        if any(lock.dir == directory for lock in self.locks):
            return
        self.locks.append(DirLock(directory, what).acquire())

    def take_folder(self, directory: Path, what: str) -> None:
        try:
            fd = flock_folder(Path(directory))
        except BlockingIOError:
            readers = ", ".join(describe_process(pid) for pid in flock_holders(Path(directory)))
            raise JobLocked(f"{what} {directory} is being read by another streamsvd command (quantize, export, eval, "
                            "verify or streamsvd.load)" + (f": {readers}" if readers else ""),
                            "wait for it to finish (or stop it), then run this again") from None
        if fd is not None:
            self.folders.append(fd)

    def release(self) -> None:
        for fd in reversed(self.folders):
            os.close(fd)
        self.folders.clear()
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()
        for folder in self.made:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.made.clear()


def _make_folders(directory: Path) -> list[Path]:
    """Make `directory` and its missing parents; the folders this call made (another process may make some of them
    at the same moment: those are its), deepest first."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    made = []
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            continue
        made.append(folder)
    return made[::-1]


@contextlib.contextmanager
def reading_output(folder: Path):
    """Held while a command reads the output `folder`: a shared flock on the folder, which the `run` writing it holds
    exclusively (JobLocks.take_folder). Refused at once while a run writes there; a run started meanwhile is refused."""
    folder = Path(folder)
    try:
        fd = flock_folder(folder, shared=True) if folder.is_dir() else None
    except BlockingIOError:
        raise JobLocked(f"{folder} is being written by a streamsvd job: {_describe(read_owner(folder / LOCK_NAME))}",
                        "wait for that job to finish (or stop it), then run this again") from None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def holder_of(folder: Path) -> str | None:
    """Who holds `folder`'s lock file now (another process's description), without taking or making it; None where
    nobody does (or this file system cannot tell)."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: nobody holds it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(read_owner(path))
    except OSError:  # a file system without flock: nothing to tell
        return None
    finally:
        os.close(fd)
    return None


def refuse_while_made(folder: Path, what: str) -> None:
    """Refuse to read `folder` (a PROFILE_DIR) while the command making it holds its lock: read meanwhile, a profile
    half rewritten was refused as damaged, with the fix to make it again (the command already running)."""
    holder = holder_of(folder)
    if holder is not None:
        raise JobLocked(f"{what} {folder} is being made by another streamsvd command: {holder}",
                        "wait for it to finish, then run this again")


def entries_besides_lock(folder: Path) -> list[Path]:
    """What `folder` holds other than the lock file (a held one, or one a killed process left)."""
    return [p for p in sorted(Path(folder).iterdir()) if p.name != LOCK_NAME] if Path(folder).is_dir() else []


@contextlib.contextmanager
def destination_lock(dest: Path, what: str):
    """One writer per destination folder (quantize's NEW_DIR, an export's DIR), held while the command checks and
    writes it: two at once took each other's partial files for a stopped run's, removed them, or mixed them.

    The folder is made to hold the lock; folders made for it and left empty (a refusal) are removed at the end.
    Where a file is in the way nothing is locked and the command's own checks speak; a folder that cannot be made
    (a parent that cannot hold one: /proc, a read-only file system) is refused here, before any work (it was a
    traceback, after the whole trace and export for `export onnx`).
    """
    from ..io.diskspace import is_disk_full
    from ..io.fsutil import file_in_the_way

    dest = Path(dest)
    lock = None
    made = [p for p in (dest, *dest.parents) if not p.exists() and not p.is_symlink()]
    if file_in_the_way(dest) is None and not (dest.exists() and not dest.is_dir()):
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if is_disk_full(e) or isinstance(e, PermissionError):  # worded by the command line's own handlers
                raise
            raise StreamSVDError(f"{what} {dest} cannot be made ({e.strerror or e})",
                                 f"give a {what} on a file system this process can write") from e
        else:
            try:
                lock = DirLock(dest, what).acquire()
            except OSError:  # a folder we may not write: the command's own write says so, as before
                lock = None
            except BaseException:
                _remove_empty(made)
                raise
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
        _remove_empty(made)


def _remove_empty(made: list[Path]) -> None:
    for folder in made:  # deepest first; the first that holds something keeps its parents
        try:
            folder.rmdir()
        except OSError:
            break

"""Atomic file writes, so a killed job never leaves a file that looks finished but is not."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
from pathlib import Path

from .diskspace import disk_full_error, is_disk_full


def within(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it, after links and `..` are resolved (neither need exist)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def file_in_the_way(path: Path) -> Path | None:
    """The file or dangling link (not a directory) at or above the directory `path` that keeps it from being made,
    if any: mkdir there was an OSError traceback after the checks had passed."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
        if p.is_symlink():
            return p
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a written file's bytes to disk (before it is renamed into place)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def flock_folder(folder: Path, shared: bool = False) -> int | None:
    """An open descriptor of `folder` itself holding its flock (exclusive, or `shared`), taken without blocking;
    None where the folder cannot be opened or locked (not a folder, a file system without flock): nothing is held
    then. BlockingIOError: another process holds it. Close the descriptor to release it."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        return None
    return fd


def flock_holders(path: Path) -> list[int]:
    """The processes holding a flock on `path` on this machine (Linux's /proc/locks; [] where it cannot tell)."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:  # "3: FLOCK  ADVISORY  READ 20878 fe:00:2171827 0 EOF"; a waiter's line has "->"
        fields = line.split()
        if len(fields) >= 6 and "->" not in fields and fields[1] == "FLOCK" and fields[5] == key and fields[4].isdigit():
            pids.append(int(fields[4]))
    return sorted(set(pids))


def describe_process(pid: int) -> str:
    """'process PID (its command line)', the command where /proc shows it."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    return f"process {pid} ({command})" if command else f"process {pid}"


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success fsync it and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as e:
        _remove_quietly(tmp)
        if is_disk_full(e):
            raise disk_full_error(path) from e
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise


# safetensors' save_file (0.6 on) writes the bytes to a file of its own beside the path it is given, `.tmp` and six
# letters or digits (Rust's tempfile), and renames that onto the path; a process killed inside save_file leaves it,
# the whole size of the shard, in the folder for good: as much a temporary of streamsvd's as `.NAME.tmp-PID`.
_SERIALIZER_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def is_serializer_temporary(path: Path) -> bool:
    """Whether `path` is a file safetensors' save_file left when killed (`.tmpXXXXXX`)."""
    path = Path(path)
    return bool(_SERIALIZER_TEMPORARY.fullmatch(path.name)) and path.is_file() and not path.is_symlink()


def remove_temporaries(folder: Path, names=None) -> list[Path]:
    """Remove the temporaries killed processes left in `folder`, never renamed into place; the removed paths.

    atomic_path's `.NAME.tmp-PID` for each of `names` (None: for every name), and safetensors' `.tmpXXXXXX`
    (is_serializer_temporary). Regular files only; nothing else in `folder` is touched. Every caller runs where no
    write of its own is under way, so a temporary of this process's PID goes too (a reused PID's leftover).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in sorted(folder.glob(".tmp*")) if is_serializer_temporary(p)]
    patterns = [".*.tmp-*"] if names is None else [f".{glob.escape(name)}.tmp-*" for name in names]
    found += [p for pattern in patterns for p in sorted(folder.glob(pattern)) if p.is_file() and not p.is_symlink()]
    removed = []
    for p in dict.fromkeys(found):
        _remove_quietly(p)
        removed.append(p)
    return removed


# In every folder new_held_folder makes: only a folder holding it is ever swept (a user's own `streamsvd-eval-notes`
# folder was removed with its contents). A build folder renamed into place drops it first (drop_held_marker).
HELD_MARKER = ".streamsvd-held"


def new_held_folder(parent: Path, prefix: str) -> tuple[Path, int | None]:
    """A new folder `parent/PREFIX<random>` for a process's scratch or build files, marked as streamsvd's
    (HELD_MARKER), and an open descriptor of it that holds its flock: while that is open (the process lives),
    remove_abandoned_folders leaves the folder alone.

    Made, marked and locked under another name, then renamed, so no other process's sweep sees it unlocked. The
    descriptor is None where the file system has no flock (the folder is then never swept). Close it when done.
    """
    import tempfile

    staging = f".new-{prefix}"
    made = Path(tempfile.mkdtemp(prefix=staging, dir=parent))
    (made / HELD_MARKER).write_bytes(b"")
    fd = flock_folder(made)  # a new folder no one else knows of: never BlockingIOError
    folder = Path(parent) / f"{prefix}{made.name[len(staging):]}"
    os.rename(made, folder)
    return folder, fd


def drop_held_marker(folder: Path) -> None:
    """Remove HELD_MARKER from a held folder about to become something else (a build folder renamed into place)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(Path(folder) / HELD_MARKER)


def remove_abandoned_folders(parent: Path, prefix: str) -> list[Path]:
    """Remove the folders `parent/PREFIX*` made by new_held_folder (holding HELD_MARKER; any other is left alone,
    whatever its name) whose process is gone: a kill left them and
    nothing else removes them. Liveness is the folder's flock, which the kernel drops with its process: a PID said
    nothing across PID namespaces (containers with one hostname and one temporary folder) or hosts (NFS), and a live
    eval's or import's files were removed under it. Anything not a plain folder, or not lockable, is left alone."""
    removed = []
    for folder in sorted(Path(parent).glob(f"{glob.escape(prefix)}*")):
        if not folder.is_dir() or folder.is_symlink() or not (folder / HELD_MARKER).is_file():
            continue
        try:
            fd = flock_folder(folder)
        except BlockingIOError:  # held: its process works there
            continue
        if fd is None:  # not lockable here: never swept
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


def holds_only_temporaries_of(folder: Path, names) -> bool:
    """Whether the non-empty directory `folder` holds nothing but temporaries of `names` (`.NAME.tmp-PID`): what a
    process killed during its first write into a new directory leaves, which is as good as empty. The lock file
    (job/lock.py: held by this command, or left by a killed one) does not count."""
    from ..job.lock import entries_besides_lock

    entries = entries_besides_lock(folder)
    prefixes = tuple(f".{name}.tmp-" for name in names)
    return bool(entries) and all(e.name.startswith(prefixes) and e.is_file() and not e.is_symlink() for e in entries)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)

"""Disk space: checked before a job starts, and a full disk mid-job turned into one clear error.

A full disk must never kill the process with a signal: numpy memmaps of sparse files die of SIGBUS
when the disk fills under them, so activation files are allocated up front (`allocate`), and
writes that fail for lack of space anywhere (Python, numpy, safetensors' Rust writer) are
recognised by `is_disk_full` and reported with the fix.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ..errors import StreamSVDError
from ..job.memory import format_size

# Room left beside the planned files: temporary names during atomic renames, the state file,
# filesystem overhead.
MARGIN_BYTES = 64 << 20
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    text = str(exc)
    # safetensors raises its own error type whose message carries the OS error.
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


RUN_FIX = ("free space on that disk (or give --work-dir on another disk for the activations) and run the same command "
           "again: finished blocks are kept and the job resumes")


class DiskFull(StreamSVDError):
    """The disk filled while `path` was written. The fix is `run`'s; the CLI words it for its command (cli.main)."""

    def __init__(self, path, fix: str = RUN_FIX):
        super().__init__(f"the disk is full while writing {path}", fix)
        self.path = path


def disk_full_error(path: Path) -> StreamSVDError:
    return DiskFull(path)


def existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_ancestor(path)).free


def device_of(path: Path) -> int:
    return existing_ancestor(path).stat().st_dev


def check_free_space(needs: dict[Path, int]) -> None:
    """Refuse to start when the files still to be written (bytes per target directory) do not fit.

    Directories on one filesystem are added up, so the output and the work files are checked
    together when they share a disk.
    """
    by_device: dict[int, tuple[list[Path], int]] = {}
    for path, need in needs.items():
        dev = device_of(path)
        paths, total = by_device.get(dev, ([], 0))
        by_device[dev] = (paths + [Path(path)], total + need)
    for paths, need in by_device.values():
        free = free_bytes(paths[0])
        if need + MARGIN_BYTES > free:
            where = " and ".join(str(p) for p in paths)
            raise StreamSVDError(
                f"not enough disk space: the job still has to write about {format_size(need)} to {where}, "
                f"and that disk has {format_size(free)} free (it keeps {format_size(MARGIN_BYTES)} spare on top)",
                "free space there, choose an OUT_DIR on a larger disk, put the activations elsewhere with "
                "--work-dir, or halve them with --act-dtype bfloat16",
            )


def allocate(path: Path, nbytes: int) -> None:
    """Create `path` with `nbytes` really reserved on disk (not a sparse file), or fail with ENOSPC now."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size > nbytes:
            os.ftruncate(fd, nbytes)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                raise
            # Filesystems without fallocate (some network mounts): write zeros so blocks exist.
            os.ftruncate(fd, 0)
            chunk = bytes(1 << 20)
            left = nbytes
            while left > 0:
                left -= os.write(fd, chunk[: min(left, len(chunk))])
    finally:
        os.close(fd)

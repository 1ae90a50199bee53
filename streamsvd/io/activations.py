"""Hidden states at a block boundary, kept on disk so RAM holds one batch, not the calibration set.

Files are allocated in full when created: a sparse file whose disk fills up fails mid-job (a
memmap of one dies of SIGBUS), while an allocation fails at once with a clear error. Batches are
read and written with pread/pwrite, not through a memory map: mapped pages that were touched count
in the process's RSS until unmapped, which would put both whole files into the memory budget.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..timing import charged
from .diskspace import allocate, disk_full_error, is_disk_full

DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16), "bfloat16": (np.uint16, torch.bfloat16)}


class ActivationFile:
    """A (samples, seqlen, hidden) array on disk; bfloat16 is stored as its raw 16-bit pattern."""

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: str, create: bool):
        if dtype not in DTYPES:
            raise ValueError(f"activation dtype must be one of {sorted(DTYPES)}")
        self.path, self.shape, self.dtype = Path(path), tuple(shape), dtype
        np_dtype, self.torch_dtype = DTYPES[dtype]
        if create:
            try:
                allocate(self.path, activation_bytes(self.shape, dtype))
            except OSError as e:
                if is_disk_full(e):
                    self.path.unlink(missing_ok=True)
                    raise disk_full_error(self.path) from e
                raise
        self.np_dtype = np.dtype(np_dtype)
        self.sample_bytes = int(np.prod(self.shape[1:])) * self.np_dtype.itemsize
        if self.path.stat().st_size != activation_bytes(self.shape, dtype):
            raise ValueError(f"{self.path} does not have the size of a {self.shape} {dtype} activation file")

    def write(self, start: int, hidden: torch.Tensor) -> None:
        with charged("activation io"):
            self._write(start, hidden)

    def _write(self, start: int, hidden: torch.Tensor) -> None:
        data = hidden.detach().to(device="cpu", dtype=self.torch_dtype).contiguous()  # from a GPU too (run --device)
        if self.dtype == "bfloat16":
            data = data.view(torch.int16)
        if start < 0 or start + data.shape[0] > self.shape[0] or tuple(data.shape[1:]) != self.shape[1:]:
            raise ValueError(f"cannot write {tuple(data.shape)} at sample {start} of {self.shape}")
        buf = memoryview(data.numpy()).cast("B")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            offset, done = start * self.sample_bytes, 0
            while done < len(buf):
                try:
                    done += os.pwrite(fd, buf[done:], offset + done)
                except OSError as e:
                    if is_disk_full(e):
                        raise disk_full_error(self.path) from e
                    raise
        finally:
            os.close(fd)

    def read(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        with charged("activation io"):
            return self._read(start, stop, dtype)

    def _read(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        stop = min(stop, self.shape[0])
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.np_dtype)
        buf = memoryview(out).cast("B")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            offset, done = start * self.sample_bytes, 0
            while done < len(buf):
                n = os.preadv(fd, [buf[done:]], offset + done)
                if n == 0:
                    raise OSError(f"{self.path} ended early")
                done += n
        finally:
            os.close(fd)
        raw = torch.from_numpy(out)
        if self.dtype == "bfloat16":
            raw = raw.view(torch.bfloat16)
        return raw.to(dtype)

    def sync(self) -> None:
        """Flush to disk before the job state says this file is complete."""
        with charged("activation io"):
            self._sync()

    def _sync(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def nbytes(self) -> int:
        return activation_bytes(self.shape, self.dtype)


def activation_bytes(shape: tuple[int, int, int], dtype: str) -> int:
    return int(np.prod(shape)) * np.dtype(DTYPES[dtype][0]).itemsize

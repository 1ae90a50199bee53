"""Hidden states at a block boundary, kept on disk so RAM holds one batch, not the calibration set.

Files are allocated in full when created: a sparse memmap whose disk fills up kills the process
with SIGBUS mid-write, while an allocation fails at once with a clear error.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

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
        self.array = np.memmap(self.path, dtype=np_dtype, mode="r+", shape=self.shape)

    def write(self, start: int, hidden: torch.Tensor) -> None:
        data = hidden.detach().to(self.torch_dtype).contiguous()
        if self.dtype == "bfloat16":
            data = data.view(torch.int16)
        self.array[start : start + data.shape[0]] = data.numpy().view(self.array.dtype)

    def read(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raw = torch.from_numpy(np.array(self.array[start:stop]))
        if self.dtype == "bfloat16":
            raw = raw.view(torch.bfloat16)
        return raw.to(dtype)

    def sync(self) -> None:
        """Flush to disk before the job state says this file is complete."""
        self.array.flush()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def nbytes(self) -> int:
        return activation_bytes(self.shape, self.dtype)


def activation_bytes(shape: tuple[int, int, int], dtype: str) -> int:
    return int(np.prod(shape)) * np.dtype(DTYPES[dtype][0]).itemsize

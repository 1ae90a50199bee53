"""Copy tensors from checkpoint shards into a new safetensors file without holding them in memory.

`safetensors.torch.save_file` needs every tensor in memory and makes a bytes copy of each before
writing, so copying the embeddings and head (4.2 GB at 70B in bf16) would cost twice that in RSS.
The stored bytes do not change, so they are copied from file to file with one small buffer.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path


from .checkpoint import TORCH_DTYPES, Checkpoint

BUFFER_BYTES = 16 << 20
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _data_start(path: Path) -> int:
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return 8 + header_len


def _primed_digest(ckpt: Checkpoint, name: str):
    """A sha256 primed exactly as io/checksums.tensor_sha256 primes it."""
    return hashlib.sha256(f"{TORCH_DTYPES[ckpt.dtype_name(name)]}:{tuple(ckpt.shape(name))}:".encode())


def _stored_chunks(ckpt: Checkpoint, name: str, data_start: int | None = None):
    """The stored bytes of tensor `name`, BUFFER_BYTES at a time from its shard (never all in memory); the pages read
    are dropped from the page cache at the end (not needed again). `data_start`: the shard's, where known."""
    shard = ckpt.dir / ckpt.weight_map[name]
    begin, end = ckpt.headers[ckpt.weight_map[name]][name]["data_offsets"]
    start = (_data_start(shard) if data_start is None else data_start) + begin
    fd = os.open(shard, os.O_RDONLY)
    try:
        pos, left = start, end - begin
        while left > 0:
            chunk = os.pread(fd, min(BUFFER_BYTES, left), pos)
            if not chunk:
                raise OSError(f"{shard} ended early")
            yield chunk
            pos += len(chunk)
            left -= len(chunk)
        os.posix_fadvise(fd, start, end - begin, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def stored_sha256(ckpt: Checkpoint, name: str) -> str:
    """io/checksums.tensor_sha256 of a stored tensor, read from its file with one small buffer (never all in memory):
    what copy_tensors records for it."""
    digest = _primed_digest(ckpt, name)
    for chunk in _stored_chunks(ckpt, name):
        digest.update(chunk)
    return digest.hexdigest()


def copy_tensors(ckpt: Checkpoint, names: list[str], dst: Path, metadata: dict | None = None) -> None:
    """Write `names` (stored dtype and bytes unchanged) as one safetensors file at `dst`.

    Tensors are laid out as safetensors' own writer does (larger items first, then by name), so
    every tensor starts aligned to its item size.
    """
    order = sorted(names, key=lambda k: (-_ITEMSIZE.get(ckpt.dtype_name(k), 1), k))
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name in order:
        size = ckpt.nbytes(name)
        header[name] = {"dtype": ckpt.dtype_name(name), "shape": ckpt.shape(name), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    starts: dict[str, int] = {}
    with open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for name in order:
            shard = ckpt.dir / ckpt.weight_map[name]
            if shard not in starts:
                starts[shard] = _data_start(shard)
            # the job records what it read (identity by content), as Checkpoint.get does
            digest = _primed_digest(ckpt, name) if ckpt.read_digests is not None else None
            for chunk in _stored_chunks(ckpt, name, starts[shard]):
                out.write(chunk)
                if digest is not None:
                    digest.update(chunk)
            if digest is not None:
                ckpt.read_digests[name] = digest.hexdigest()

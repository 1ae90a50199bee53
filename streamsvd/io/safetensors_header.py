"""A safetensors file's header, read and checked without torch (`streamsvd verify` imports no torch: 0.2 s
instead of 2 s); io/checkpoint.py re-exports these for every other reader."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_safetensors_header(path: Path) -> dict:
    """Parse a safetensors header and check that the file holds every byte it promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file is shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(f.read(header_len))
            if not isinstance(header, dict) or not all(
                k == "__metadata__" or (isinstance(v, dict) and len(v.get("data_offsets", ())) == 2)
                for k, v in header.items()
            ):
                raise ValueError("the header is not a safetensors tensor table")
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e})",
            "re-download or re-export that shard; the checkpoint is corrupt or truncated",
        ) from e
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{path} is truncated: it has {size} bytes but its header needs {8 + header_len + data_end}",
            "re-download or re-export that shard (an interrupted copy or download leaves this)",
        )
    if 8 + header_len + data_end < size:  # safetensors itself refuses it at the first read ("not fully covered")
        raise CheckpointError(
            f"{path} has {size - 8 - header_len - data_end} bytes beyond the {8 + header_len + data_end} its header "
            "describes",
            "re-download or re-export that shard (something was appended to it, or it is another file's copy)",
        )
    return header

"""Embedding rows read from the checkpoint file on demand, so the embedding matrix is never resident.

A job needs the embeddings only to embed its calibration windows: a few thousand distinct rows.
Holding the whole matrix in float32 costs 2.1 GB at 70B (671 MB for Gemma 3 270M's 262k vocabulary);
an mmap of it keeps every page it touched in RSS. Here each lookup reads the distinct rows it needs
with `os.pread` and converts them to the compute dtype, which gives exactly the values that
indexing the converted matrix gives.
"""

from __future__ import annotations

import json
import os
import struct
import types

import numpy as np

from ..errors import CheckpointError
import torch
from torch import nn

from ..io.checkpoint import Checkpoint

_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class RowReader:
    """Rows of a 2-D tensor of a safetensors shard, by index, straight from the file."""

    def __init__(self, ckpt: Checkpoint, name: str):
        self.path = ckpt.dir / ckpt.weight_map[name]
        self.dtype_name = ckpt.dtype_name(name)
        if self.dtype_name not in _NP:
            raise ValueError(f"cannot read rows of {name}: dtype {self.dtype_name}")
        self.rows, self.cols = ckpt.shape(name)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
        start = json.loads(_read_at(self.path, 8, header_len))[name]["data_offsets"][0]
        self.data_start = 8 + header_len + start
        self.row_bytes = self.cols * np.dtype(_NP[self.dtype_name]).itemsize

    def read(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64)
        unique, inverse = torch.unique(flat, return_inverse=True)
        out = np.empty((len(unique), self.cols), dtype=_NP[self.dtype_name])
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, row in enumerate(unique.tolist()):
                if not 0 <= row < self.rows:
                    raise CheckpointError(f"the tokenizer gives token id {row}, outside the embedding's {self.rows} rows",
                                          "the tokenizer and the weights are from different models: restore the "
                                          "checkpoint's own tokenizer files")
                out[i] = np.frombuffer(os.pread(fd, self.row_bytes, self.data_start + row * self.row_bytes), dtype=out.dtype)
        finally:
            os.close(fd)
        rows = torch.from_numpy(out)
        if self.dtype_name == "BF16":
            rows = rows.view(torch.bfloat16)
        return rows.to(dtype)[inverse].reshape(*ids.shape, self.cols)


def _read_at(path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def map_embedding(module: nn.Embedding, ckpt: Checkpoint, name: str, dtype: torch.dtype) -> None:
    """Make `module` (an nn.Embedding whose weight stays on the meta device) read its rows from the file.

    Subclasses that scale the looked-up rows (Gemma's `embed_scale`, a buffer) keep doing so, in
    the same dtype as transformers does it.
    """
    reader = RowReader(ckpt, name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = reader.read(input_ids, dtype)
        scale = getattr(self, "embed_scale", None)
        if isinstance(scale, torch.Tensor):
            rows = rows * scale.to(dtype)
        return rows

    module.forward = types.MethodType(forward, module)


def materialize_base_mapped(model: nn.Module, ckpt: Checkpoint, dtype: torch.dtype) -> None:
    """architecture.materialize_base, except the input embedding, which reads its rows from the file."""
    from accelerate.utils import set_module_tensor_to_device

    from .architecture import SUPPORTED

    embedding = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embedding) + ".weight"
    layers_path = SUPPORTED[model.config.model_type]
    for name, _ in list(model.named_parameters()):
        if name == embed_name or not name.startswith("model.") or name.startswith(layers_path + "."):
            continue
        if name in ckpt:
            set_module_tensor_to_device(model, name, "cpu", value=ckpt.get(name).to(dtype))
    if isinstance(embedding, nn.Embedding) and embed_name in ckpt and ckpt.dtype_name(embed_name) in _NP:
        map_embedding(embedding, ckpt, embed_name, dtype)
    else:
        set_module_tensor_to_device(model, embed_name, "cpu", value=ckpt.get(embed_name).to(dtype))

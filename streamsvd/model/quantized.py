"""Quantised factors on disk: compressed-tensors' "pack-quantized" layout, and its dequantisation.

The reading side (unpacking, dequantisation, the dequantising tensor getter) lives in
model/remote/modeling_streamsvd.py, the remote code every OUT_DIR ships, so that a quantised OUT_DIR
loads without streamsvd too; it is imported from there, one copy of the format's reader.

A quantised 2-D tensor `NAME.T` (T = out_factor, in_rest, in_factor or weight; rows are outputs,
columns inputs) is stored as compressed-tensors stores a quantised `weight`, with T in place of
`weight`:

- `NAME.T_packed`: int32, the integers of each row packed along the columns, 32 / bits per word
  (8 int4 or 4 int8 per int32), element j of a row at bits (j % per_word) * bits of word j // per_word,
  each stored as q + 2^(bits - 1) (unsigned); the row padded with zeros to whole words;
- `NAME.T_scale`: (rows, ceil(cols / G)) in the factor's dtype, one scale per group of G columns
  (the last group may be shorter);
- `NAME.T_zero_point` (asymmetric only): int32, (ceil(rows * bits / 32), groups), the int8 zero
  points packed the same way along the rows (compressed-tensors' packed_dim=0);
- `NAME.T_shape`: int64 [rows, cols].

The value is (q - zero_point) * scale, q and zero_point in [-2^(bits-1), 2^(bits-1) - 1].
"""

from __future__ import annotations

import torch

from .remote.modeling_streamsvd import (  # noqa: F401 - the reader, shipped in every OUT_DIR
    QUANT_PARTS, dequantize, dequantizing_getter, logical_keys, quantized_bases, unpack_int32)


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack int8 values (in [-2^(bits-1), 2^(bits-1))) along `dim` of a 2-D tensor into int32 words."""
    if bits not in (2, 4, 8):
        raise ValueError(f"packing supports 2, 4 or 8 bits, not {bits}")
    value = (q.to(torch.int64) + (1 << (bits - 1)))
    if dim == 0:
        value = value.t()
    rows, cols = value.shape
    per_word = 32 // bits
    words = -(-cols // per_word)
    value = torch.nn.functional.pad(value, (0, words * per_word - cols)).reshape(rows, words, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    packed = (value << shifts).sum(dim=-1)  # disjoint bit fields: the sum is their OR
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return (packed.t() if dim == 0 else packed).contiguous()

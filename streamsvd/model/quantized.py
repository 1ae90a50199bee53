"""Quantised factors on disk: compressed-tensors' "pack-quantized" layout, and its dequantisation.

Self-contained on purpose (torch only, no streamsvd imports), so a loader that runs without
streamsvd installed (the `trust_remote_code` modeling file) can ship this file as it is.

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

QUANT_PARTS = ("_packed", "_scale", "_zero_point", "_shape")


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


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """The int8 values `pack_int32` packed: `length` of them along `dim`."""
    value = packed.to(torch.int64)
    if dim == 0:
        value = value.t()
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    fields = (value.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    out = (fields.reshape(value.shape[0], -1)[:, :length] - (1 << (bits - 1))).to(torch.int8)
    return (out.t() if dim == 0 else out).contiguous()


def dequantize(packed: torch.Tensor, scale: torch.Tensor, shape, bits: int, group_size: int,
               zero_point: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The rows x cols tensor a packed one stands for, in `dtype` (default: the scale's)."""
    rows, cols = (int(s) for s in shape)
    q = unpack_int32(packed, bits, cols).to(torch.float32)
    if scale.shape != (rows, -(-cols // group_size)):
        raise ValueError(f"a scale of shape {tuple(scale.shape)} does not fit {rows} x {cols} in groups of {group_size}")
    index = torch.arange(cols) // group_size  # column j belongs to group j // G
    s = scale.to(torch.float32)[:, index]
    if zero_point is not None:
        zp = unpack_int32(zero_point, bits, rows, dim=0).to(torch.float32)[:, index]
        q = q - zp
    return (q * s).to(dtype or scale.dtype)


def quantized_bases(keys) -> set[str]:
    """The tensor names (`NAME.T`) that `keys` hold in packed form."""
    return {k[: -len("_packed")] for k in keys if k.endswith("_packed")}


def logical_keys(keys) -> set[str]:
    """The names a model sees: a packed tensor's parts become its one name."""
    keys = set(keys)
    bases = quantized_bases(keys)
    parts = {b + p for b in bases for p in QUANT_PARTS}
    return (keys - parts) | bases


def dequantizing_getter(get, keys, bits: int, group_size: int, dtype: torch.dtype | None = None):
    """`get(name)` over logical names: a packed tensor comes back dequantised, the rest as stored.

    `get` reads one stored tensor by name; `keys` are the stored names.
    """
    keys = set(keys)
    bases = quantized_bases(keys)

    def read(name: str) -> torch.Tensor:
        if name in bases:
            zp = get(name + "_zero_point") if name + "_zero_point" in keys else None
            return dequantize(get(name + "_packed"), get(name + "_scale"), get(name + "_shape").tolist(), bits,
                              group_size, zp, dtype)
        return get(name)

    return read

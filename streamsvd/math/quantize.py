"""Per-group integer quantisation of a factor: round-to-nearest, and GPTQ's error-feedback rounding.

A 2-D tensor W (rows = outputs, columns = inputs) is split along its columns into groups of G
(the last one shorter when G does not divide the width: no padding is stored, the scale tensor
has ceil(cols / G) columns). Each (row, group) gets one scale (symmetric: max |w| / (2^(b-1) - 1),
zero point 0) or a scale and a zero point (asymmetric: the range [min(w, 0), max(w, 0)] over
2^b - 1 steps). The integers are int8 in [-2^(b-1), 2^(b-1) - 1], the layout compressed-tensors
packs (model/quantized.py).

`gptq` is GPTQ's reference algorithm (Frantar et al. 2022, `gptq.py` fasterquant): columns in
order, each rounded with its group's scale, and the rounding error fed forward to the columns not
yet rounded through the inverse Hessian's Cholesky factor, so the error weighted by the input Gram H,
tr((W - Q) H (W - Q)^T), is smaller than round-to-nearest's. The group's scale is taken when the
loop reaches its first column, from the weights as updated so far (as the reference does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANT_BITS = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 128
ROUNDINGS = ("rtn", "gptq")
DEFAULT_ROUNDING = "gptq"  # measured: see docs/RESULTS.md (tools/quant_error.py)


@dataclass
class Quantized:
    q: torch.Tensor  # int8, rows x cols
    scale: torch.Tensor  # rows x groups, in the storage dtype
    zero_point: torch.Tensor | None  # int8, rows x groups (asymmetric), else None
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        index = torch.arange(self.q.shape[1]) // self.group_size
        q = self.q.to(torch.float32)
        if self.zero_point is not None:
            q = q - self.zero_point.to(torch.float32)[:, index]
        return (q * self.scale.to(torch.float32)[:, index]).to(dtype)


def _params(w: torch.Tensor, bits: int, symmetric: bool, dtype: torch.dtype):
    """Scale (rounded to the storage dtype, as it will be read back) and zero point of each row of `w` (rows x g)."""
    qmax = 2 ** (bits - 1) - 1
    if symmetric:
        scale = w.abs().amax(dim=1) / qmax
        zp = None
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(dtype).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an underflow in a small dtype
    if not symmetric:
        zp = (-torch.round(lo / scale) - 2 ** (bits - 1)).clamp(-(2 ** (bits - 1)), qmax)
    return scale, zp


def _round(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The integers of `w` (rows, or rows x k) for per-row `scale` and `zp`."""
    if w.dim() == 2:
        scale = scale.unsqueeze(1)
        zp = None if zp is None else zp.unsqueeze(1)
    q = torch.round(w / scale)
    if zp is not None:
        q = q + zp
    return q.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True, dtype: torch.dtype | None = None) -> Quantized:
    """Round-to-nearest per group. `dtype`: the scales' storage dtype (default: w's)."""
    dtype = dtype or w.dtype
    w = w.detach().to(torch.float32)
    rows, cols = w.shape
    qs, scales, zps = [], [], []
    for start in range(0, cols, group_size):
        g = w[:, start:start + group_size]
        scale, zp = _params(g, bits, symmetric, dtype)
        qs.append(_round(g, scale, zp, bits))
        scales.append(scale)
        zps.append(zp)
    return Quantized(
        torch.cat(qs, dim=1).to(torch.int8), torch.stack(scales, dim=1).to(dtype),
        None if symmetric else torch.stack(zps, dim=1).to(torch.int8), bits, group_size)


def gptq(w: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
         dtype: torch.dtype | None = None, damp: float = 0.01) -> Quantized:
    """GPTQ rounding of `w` for inputs whose Gram (cols x cols) is `gram`; `damp` x mean diag(H) is added
    to H's diagonal (the reference's percdamp), columns no input reaches are zeroed."""
    dtype = dtype or w.dtype
    W = w.detach().to(torch.float32).clone()
    rows, cols = W.shape
    H = gram.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)
    Q = torch.zeros(rows, cols)
    n_groups = -(-cols // group_size)
    scales = torch.zeros(rows, n_groups)
    zps = torch.zeros(rows, n_groups) if not symmetric else None
    block = group_size * max(1, 128 // group_size)  # whole groups per block: a group's scale sees its updated weights
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                scale, zp = _params(W1[:, i:i + group_size], bits, symmetric, dtype)
                scales[:, g] = scale
                if zps is not None:
                    zps[:, g] = zp
            g = col // group_size
            zp = None if zps is None else zps[:, g]
            w_col = W1[:, i]
            q = _round(w_col, scales[:, g], zp, bits)
            Q[:, col] = q
            deq = (q - (0 if zp is None else zp)) * scales[:, g]
            err = (w_col - deq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Quantized(Q.to(torch.int8), scales.to(dtype), None if zps is None else zps.to(torch.int8), bits, group_size)


def weighted_error(w: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """tr((W - W') H (W - W')^T) (the output error summed over the inputs whose Gram is H); ||W - W'||^2 without H."""
    d = (w.to(torch.float64) - approx.to(torch.float64))
    if gram is None:
        return float(d.pow(2).sum())
    return float(((d @ gram.to(torch.float64)) * d).sum())


def quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True, gram: torch.Tensor | None = None,
             rounding: str = "rtn", dtype: torch.dtype | None = None) -> Quantized:
    """`rtn`, or `gptq` when a Gram is given."""
    if rounding == "gptq" and gram is not None:
        return gptq(w, gram, bits, group_size, symmetric, dtype)
    return rtn(w, bits, group_size, symmetric, dtype)


@dataclass(frozen=True)
class QuantSpec:
    """What `run --quant` / `streamsvd quantize` do to every factor tensor of a compressed linear."""

    quant: str  # int8 or int4
    group_size: int = DEFAULT_GROUP_SIZE
    # Asymmetric: measured lower error than symmetric at every setting (int4, groups of 128, GPTQ, SmolLM2:
    # 0.019 vs 0.026 relative output error of the quantisation; docs/RESULTS.md) for 4 bits of zero point per group.
    symmetric: bool = False
    rounding: str = "rtn"

    @property
    def bits(self) -> int:
        return QUANT_BITS[self.quant]

    def section(self) -> dict:
        """The `quantization` entry of config.json's streamsvd section: compressed-tensors' quantisation
        arguments (num_bits, type, symmetric, strategy, group_size) and its format name."""
        return {"format": "pack-quantized", "num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                "strategy": "group", "group_size": self.group_size, "rounding": self.rounding,
                "tensors": list(FACTOR_SUFFIXES)}

    def packed_bytes(self, rows: int, cols: int, scale_itemsize: int) -> int:
        """Bytes one rows x cols factor takes quantised: packed words, scales, zero points, shape, and the
        shard header's and the index's entries for its 3 or 4 tensors (about 290 bytes each, measured:
        they matter only for tiny models)."""
        words = rows * -(-cols * self.bits // 32) * 4
        groups = -(-cols // self.group_size)
        zp = 0 if self.symmetric else -(-rows * self.bits // 32) * groups * 4
        return words + rows * groups * scale_itemsize + zp + 16 + (3 if self.symmetric else 4) * 290


FACTOR_SUFFIXES = (".out_factor", ".in_rest", ".in_factor", ".weight")  # the 2-D tensors of a compressed linear


def quantize_module_tensors(tensors: dict[str, torch.Tensor], full: str, spec: QuantSpec,
                            gram: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors of compressed linear `full` with each 2-D factor replaced by its packed parts.

    Pivots and biases stay as they are. `gram`: the Gram of the linear's input x (in x in); with
    spec.rounding == "gptq" each factor is rounded by GPTQ for the Gram of its own input: G[q, q] for
    B' (its input is x[q]), G for an in_factor or a dense weight, and for the out-factor the Gram of
    z = B_q x with the in-side factor as quantised (pivoted: z = x[p] + B'_q x[q]). Without a Gram,
    round-to-nearest.
    """
    from ..model.quantized import pack_int32

    out = {k: v for k, v in tensors.items() if not _is_factor(k, v, full)}
    gptq_gram = gram if spec.rounding == "gptq" else None
    pivots = tensors.get(full + ".pivots")
    in_side = None  # the in-side factor as the out-factor will see it (dequantised), for the out-factor's Gram
    for suffix in (".in_rest", ".in_factor", ".weight", ".out_factor"):
        key = full + suffix
        if key not in tensors or not _is_factor(key, tensors[key], full):
            continue
        value = tensors[key]
        g = None
        if gptq_gram is not None:
            g = _factor_gram(suffix, gptq_gram, pivots, in_side, tensors[full + ".out_factor"].shape[1] if pivots is not None else 0)
        q = quantize(value, spec.bits, spec.group_size, spec.symmetric, g, spec.rounding, value.dtype)
        if suffix in (".in_rest", ".in_factor"):
            in_side = q.dequantize(value.dtype).to(torch.float64)
        out[key + "_packed"] = pack_int32(q.q, spec.bits)
        out[key + "_scale"] = q.scale
        if q.zero_point is not None:
            out[key + "_zero_point"] = pack_int32(q.zero_point, spec.bits, dim=0)
        out[key + "_shape"] = torch.tensor(list(value.shape), dtype=torch.int64)
    return out


def _is_factor(key: str, value: torch.Tensor, full: str) -> bool:
    return key[len(full):] in FACTOR_SUFFIXES and value.dim() == 2 and value.is_floating_point()


def _factor_gram(suffix: str, gram: torch.Tensor, pivots: torch.Tensor | None, in_side: torch.Tensor | None,
                 r: int) -> torch.Tensor:
    """The Gram of the input of factor `suffix` of a linear whose input Gram is `gram` (see quantize_module_tensors)."""
    G = gram.to(torch.float64)
    if suffix in (".in_factor", ".weight"):
        return G
    if pivots is not None:
        perm = pivots.long()
        Gp = G[perm][:, perm]
        if suffix == ".in_rest":
            return Gp[r:, r:]
        M = torch.cat([torch.eye(r, dtype=torch.float64), in_side], dim=1)  # z = M x[perm]
        return M @ Gp @ M.T
    return in_side @ G @ in_side.T  # plain out-factor: z = B_q x


def factor_shapes(m: int, n: int, rank: int, factors: str) -> list[tuple[int, int]]:
    """The 2-D tensors (rows x cols) a rank-`rank` m x n linear is stored as in form `factors`."""
    from .pivot import dense_fallback

    if dense_fallback(m, n, rank, factors):
        return [(m, n)]
    if factors == "pivoted":
        return [(m, rank), (rank, n - rank)]
    return [(m, rank), (rank, n)]


def stored_linear_bytes(m: int, n: int, rank: int, factors: str, itemsize: int, spec: QuantSpec | None = None) -> int:
    """Bytes on disk of one compressed linear (its factors, quantised when `spec`, and its int32 pivots)."""
    shapes = factor_shapes(m, n, rank, factors)
    pivots = 4 * n if factors == "pivoted" and len(shapes) == 2 else 0
    if spec is None:
        return sum(r * c for r, c in shapes) * itemsize + pivots
    return sum(spec.packed_bytes(r, c, itemsize) for r, c in shapes) + pivots

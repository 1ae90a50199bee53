"""Accumulation of a linear layer's input statistics, GPTQ-style: add_batch(x), then use .gram.

Precision: each chunk of _ROW_CHUNK tokens is multiplied in the inputs' own precision (float32 for
float32 or 16-bit activations, float64 for float64 inputs) and added into a float64 running sum, so
the rounding of one product stays within a chunk (about 1e-6 of an entry for 2,048 float32 tokens)
and sums over millions of tokens stay exact. A float64 product per chunk cost a quarter of a default
job's CPU time on SmolLM2 (dgemm, plus the float64 copies of every chunk); docs/RESULTS.md has the
loss difference this makes. A symmetric Gram is accumulated on its upper triangle only, by column
tiles (about (1 + 1/T) / 2 of the full product's work for T tiles), and mirrored when read.
"""

from __future__ import annotations

import torch

# Rows multiplied at a time: bounds the temporary copy of a 16-bit batch to rows x features x 4 bytes.
_ROW_CHUNK = 2048
# The float32 product of one column tile stays under this (a 28672-wide Gram is added in 64 MiB pieces).
_TILE_BYTES = 64 << 20
# Column tiles of a symmetric Gram at least this wide are split into _MIN_TILES pieces, so that only
# the upper triangle is multiplied; narrower ones (SmolLM2's 576) are one product.
_SPLIT_FROM = 1024
_MIN_TILES = 4
# Under torchrun (job/distributed.py) an output Gram also keeps the per-chunk terms of its input diagonal: they
# are float64 sums, whose total depends on how they are grouped, so the ranks add them all up in the one
# process's order instead of adding their partial sums. Off for one process (nothing kept).
_keep_diag_terms = False


def keep_diag_terms(keep: bool) -> None:
    global _keep_diag_terms
    _keep_diag_terms = keep


def product_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 inputs keep float64; float32 and 16-bit inputs are multiplied in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tiles(features: int, rows: int, symmetric: bool) -> list[tuple[int, int]]:
    """Column ranges [lo, hi): the product of `rows` x width stays under _TILE_BYTES."""
    count = -(-rows * features * 4 // _TILE_BYTES)
    if symmetric and features >= _SPLIT_FROM:
        count = max(count, _MIN_TILES)
    width = -(-features // max(count, 1))
    return [(lo, min(features, lo + width)) for lo in range(0, features, width)]


def product_fraction(features: int) -> float:
    """The multiply-adds add_products spends on a symmetric features-wide Gram, over the full product's."""
    return sum(hi * (hi - lo) for lo, hi in _tiles(features, features, True)) / features**2


def product_space(total: torch.Tensor, symmetric: bool, dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The scratch add_products works in: room for its largest tile's product in the products' precision and in
    `total`'s (pass it to every call of a batch)."""
    tiles = _tiles(total.shape[1], total.shape[0], symmetric)
    numel = max((hi if symmetric else total.shape[0]) * (hi - lo) for lo, hi in tiles)
    return (torch.empty(numel, dtype=dtype, device=device),
            torch.empty(numel, dtype=total.dtype, device=total.device))


def add_products(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None,
                 space: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """total += a^T b (float64 `total`, 2-D `a`, `b` of the same rows), chunk by chunk and tile by tile.

    b None: a^T a, on the upper triangle and the diagonal blocks only (`mirror` completes it). The products are
    made on `a`'s device (b is brought there) and added into `total` on its own (run --device: the sums are on the
    GPU with the block, so nothing moves; an accumulator made on the host still takes a GPU's inputs).

    Every product is made in one scratch (`space`, from product_space, or one made for this call) and widened to
    float64 in a second before the add: a fresh tensor per tile and chunk (the product, and the float64 copy an
    in-place add of a float32 tensor into a float64 one makes) was a fresh mmap of zeroed pages each time, and
    the kernel's page faults were a third of the statistics' time on SmolLM2 (docs/RESULTS.md). Same products,
    same sums, same bits.
    """
    symmetric = b is None
    n = total.shape[1]
    dtype = product_dtype(a)
    tiles = _tiles(n, total.shape[0], symmetric)
    product_flat, wide_flat = space if space is not None else product_space(total, symmetric, dtype, a.device)
    for start in range(0, a.shape[0], _ROW_CHUNK):
        left = a[start : start + _ROW_CHUNK].to(dtype)
        right = left if symmetric else b[start : start + _ROW_CHUNK].to(device=left.device, dtype=dtype)
        for lo, hi in tiles:
            rows = hi if symmetric else total.shape[0]
            product = product_flat[: rows * (hi - lo)].view(rows, hi - lo)
            torch.matmul(left[:, :rows].T, right[:, lo:hi], out=product)
            wide = wide_flat[: rows * (hi - lo)].view(rows, hi - lo)
            wide.copy_(product)  # to total's device and precision (float64 exactly holds every float32)
            total[:rows, lo:hi] += wide


def projected_chunks(rows: torch.Tensor, weight: torch.Tensor, device: torch.device):
    """Per _ROW_CHUNK rows of `rows` (2-D): (start, the chunk in the products' precision on `device`, chunk W^T),
    every W^T product made in one buffer of the call (a fresh one per chunk was a fresh zeroed mapping, as in
    add_products). Use each chunk's product before asking for the next."""
    dtype = product_dtype(rows)
    w = weight.detach().to(device=device, dtype=dtype)
    outputs = torch.empty(min(rows.shape[0], _ROW_CHUNK), w.shape[0], dtype=dtype, device=device)
    for start in range(0, rows.shape[0], _ROW_CHUNK):
        chunk = rows[start : start + _ROW_CHUNK].to(device=device, dtype=dtype)
        y = outputs[: chunk.shape[0]]
        torch.matmul(chunk, w.T, out=y)
        yield start, chunk, y


def mirror(total: torch.Tensor) -> None:
    """Make an upper-accumulated sum (add_products with b None) symmetric, in place."""
    n = total.shape[0]
    for lo, hi in _tiles(n, n, True):
        block = total[lo:hi, lo:hi]
        block.copy_(block.triu() + block.triu(1).T)
        total[hi:, lo:hi] = total[lo:hi, hi:].T


class GramAccumulator:
    """Running mean of x x^T over every token seen (a float64 sum of per-chunk products; see the module)."""

    def __init__(self, features: int, device: torch.device | None = None):
        self.features = features
        # on the device of the block it watches (run --device: the GPU, where the products are made)
        self.sum = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.tokens = 0
        self._upper_only = False  # add_batch fills the upper triangle; `gram` mirrors it once
        # the machine epsilon of the products summed so far (float32 products: no eigenvalue of the Gram below
        # about eps x its largest can be told from round-off; math/compensate.py's pseudo-inverse reads it)
        self.product_eps = 0.0

    def add_batch(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.features)
        self.product_eps = max(self.product_eps, torch.finfo(product_dtype(rows)).eps)
        add_products(self.sum, rows)
        self._upper_only = True
        self.tokens += rows.shape[0]

    def _symmetric_sum(self) -> torch.Tensor:
        if self._upper_only:
            mirror(self.sum)
            self._upper_only = False
        return self.sum

    @property
    def gram(self) -> torch.Tensor:
        """Mean Gram: the truncation loss it implies is the per-token root-mean-square error."""
        return self._symmetric_sum() / max(self.tokens, 1)

    def nbytes(self) -> int:
        return self.sum.numel() * 8


class OutputGramAccumulator(GramAccumulator):
    """Running mean of y y^T for y = W x (bias excluded), from the inputs.

    Its mean is W G W^T for the input Gram G, so a weight with out < in can be factored from this
    out x out matrix (math/factorize.py, the output side) without the in x in Gram ever existing.
    y is computed a chunk of tokens at a time in the product precision (as the layer computes it).
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape[0], weight.device)
        self.weight = weight  # the layer's own parameter (not copied)
        # sum of x_i^2 per input channel: diag(G) times tokens, what shrinkage of the input Gram needs (shrunk_output_gram)
        self.input_diag_sum = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
        self.diag_terms: list[torch.Tensor] | None = [] if _keep_diag_terms else None

    def add_batch(self, x: torch.Tensor) -> None:
        n = self.weight.shape[1]
        rows = x.detach().reshape(-1, n)
        dtype = product_dtype(rows)
        space = product_space(self.sum, True, dtype, rows.device)  # one scratch per batch (see add_products)
        squared = torch.empty(min(rows.shape[0], _ROW_CHUNK), n, dtype=dtype, device=rows.device)
        # the products where the inputs are (run --device)
        for _, chunk, y in projected_chunks(rows, self.weight, rows.device):
            add_products(self.sum, y, space=space)
            squares = squared[: chunk.shape[0]]
            torch.mul(chunk, chunk, out=squares)
            term = torch.sum(squares, 0, dtype=torch.float64).to(self.input_diag_sum.device)
            self.input_diag_sum += term
            if self.diag_terms is not None:  # gathered from every rank (job/distributed.py): kept on the host
                self.diag_terms.append(term.to("cpu"))
        self._upper_only = True
        self.tokens += rows.shape[0]

    def nbytes(self) -> int:
        return (self.sum.numel() + self.input_diag_sum.numel()) * 8


def shrink_gram(gram: torch.Tensor, shrink: float) -> torch.Tensor:
    """(1 - a) G + a diag(G): the input Gram pulled toward its diagonal (run --shrink a).

    The off-diagonal correlations are what whitening fits hardest to the calibration text; the diagonal
    (each channel's energy) carries over to other text far better. a = 0 is G itself. In place: pass a
    Gram nobody else holds (an accumulator's `.gram` is a fresh tensor)."""
    if not shrink:
        return gram
    diagonal = gram.diagonal().clone()
    gram.mul_(1.0 - shrink).diagonal().add_(diagonal, alpha=shrink)
    return gram


def shrunk_output_gram(acc: "OutputGramAccumulator", shrink: float) -> torch.Tensor:
    """W shrink_gram(G) W^T from the output Gram W G W^T and G's diagonal, without G: (1 - a) H + a W diag(G) W^T."""
    h = acc.gram
    if not shrink:
        return h
    w = acc.weight.detach().to(torch.float64)
    return h.mul_(1.0 - shrink).add_((w * (acc.input_diag_sum / max(acc.tokens, 1))) @ w.T, alpha=shrink)

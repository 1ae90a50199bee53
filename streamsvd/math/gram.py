"""Accumulation of a linear layer's input statistics, GPTQ-style: add_batch(x), then use .gram."""

from __future__ import annotations

import torch

# Rows converted to float64 at a time: bounds the temporary copy to rows x features x 8 bytes.
_ROW_CHUNK = 2048


class GramAccumulator:
    """Running mean of x x^T over every token seen (float64, so sums over millions of tokens stay exact)."""

    def __init__(self, features: int):
        self.features = features
        self.sum = torch.zeros(features, features, dtype=torch.float64)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.features)
        for start in range(0, rows.shape[0], _ROW_CHUNK):
            chunk = rows[start : start + _ROW_CHUNK].to(torch.float64)
            self.sum.addmm_(chunk.T, chunk)
        self.tokens += rows.shape[0]

    @property
    def gram(self) -> torch.Tensor:
        """Mean Gram: the truncation loss it implies is the per-token root-mean-square error."""
        return self.sum / max(self.tokens, 1)

    def nbytes(self) -> int:
        return self.sum.numel() * 8


# Float64 tile of the weight converted at a time for the output Gram (bounds the temporary copy).
_WEIGHT_TILE_BYTES = 64 << 20


class OutputGramAccumulator(GramAccumulator):
    """Running mean of y y^T for y = W x (bias excluded), computed in float64 from the inputs.

    Its mean is W G W^T for the input Gram G, so a weight with out < in can be factored from this
    out x out matrix (math/factorize.py, the output side) without the in x in Gram ever existing.
    The weight is converted to float64 a tile of rows at a time.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape[0])
        self.weight = weight  # the layer's own parameter (not copied)
        # sum of x_i^2 per input channel: diag(G) times tokens, what shrinkage of the input Gram needs (shrunk_output_gram)
        self.input_diag_sum = torch.zeros(weight.shape[1], dtype=torch.float64)

    def add_batch(self, x: torch.Tensor) -> None:
        w = self.weight.detach()
        m, n = w.shape
        rows = x.detach().reshape(-1, n)
        tile = max(1, _WEIGHT_TILE_BYTES // (8 * n))
        whole = w.to(torch.float64) if tile >= m else None
        for start in range(0, rows.shape[0], _ROW_CHUNK):
            chunk = rows[start : start + _ROW_CHUNK].to(torch.float64)
            if whole is not None:
                y = chunk @ whole.T
            else:
                y = torch.empty(chunk.shape[0], m, dtype=torch.float64)
                for r in range(0, m, tile):
                    y[:, r : r + tile] = chunk @ w[r : r + tile].to(torch.float64).T
            self.sum.addmm_(y.T, y)
            self.input_diag_sum += chunk.pow(2).sum(0)
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

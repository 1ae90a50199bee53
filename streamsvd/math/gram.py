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

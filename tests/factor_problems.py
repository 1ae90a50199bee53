"""Small factorisation problems shared by the math tests: a weight and correlated, badly scaled activations."""

from __future__ import annotations

import torch


def activation_problem(tokens: int, m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W m x n, X tokens x n), float64: X's channels correlated and scaled over three decades, as real hidden
    states are (a Gram of condition number about 1e7)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    x *= torch.logspace(-2, 1, n, dtype=torch.float64)
    return w, x


def activation_loss(w: torch.Tensor, f, x: torch.Tensor) -> float:
    """||(W - B A) X^T||_F for factors f (out_factor B, in_factor A)."""
    return float(((w - f.out_factor @ f.in_factor) @ x.T).norm())

"""Pivoted (gauge-fixed) low-rank factors: the same rank-r matrix in r (m + n - r) numbers.

A rank-r pair W = A B (A: m x r, B: r x n) has an r x r gauge freedom, (A M, M^-1 B). Fixing it
by r pivot columns p of B (q = the other n - r columns) gives

    A' = A B[:, p]              (m x r: the columns p of W itself)
    B' = B[:, p]^-1 B[:, q]     (r x (n - r): how the other columns interpolate from the pivots)
    W x = A' (x[p] + B' x[q])

exactly (PivGa, arXiv 2512.03062). The choice of p decides how well conditioned B[:, p] is, so
how large B' gets and how much rounding A' and B' to bfloat16/float16 costs:

- "lu": the row pivots of a partial-pivoted LU of B^T (torch.linalg.lu);
- "qr": greedy QR with column pivoting (pick the column of largest remaining norm, project it out);
- "maxvol": start from "lu" and swap pivots while some |B'| entry exceeds 1 + tol (Goreinov,
  Tyrtyshnikov et al.'s maxvol), so on exit every |B'| <= 1 + tol. The default: it bounds B'
  by construction, and tools/bench_pivot.py measures it smallest in max |B'| and in reconstruction
  error at 16 bits on SmolLM2's matrices (docs/RESULTS.md).

Everything here works in float64; callers round the results to the stored dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PIVOT_METHODS = ("maxvol", "lu", "qr")
DEFAULT_PIVOT = "maxvol"
FACTOR_FORMS = ("pivoted", "plain")


@dataclass
class PivotedFactors:
    out_factor: torch.Tensor  # A' (m x r)
    in_rest: torch.Tensor  # B' (r x (n - r))
    pivots: torch.Tensor  # int64 permutation of range(n): the r pivots p first, then the others q

    @property
    def rank(self) -> int:
        return self.out_factor.shape[1]

    def matrix(self) -> torch.Tensor:
        """The m x n matrix these factors represent."""
        r = self.rank
        n = self.pivots.numel()
        full_in = torch.empty(r, n, dtype=self.in_rest.dtype)
        full_in[:, self.pivots[:r]] = torch.eye(r, dtype=self.in_rest.dtype)
        full_in[:, self.pivots[r:]] = self.in_rest
        return self.out_factor.to(self.in_rest.dtype) @ full_in


def _lu_pivots(b: torch.Tensor) -> torch.Tensor:
    """Permutation of the columns of B (r x n), pivots first, from the partial-pivoted LU of B^T."""
    n = b.shape[1]
    # LAPACK's 1-based successive row swaps; the _ex form gives them for a singular B too (a weight of zeros, or one
    # too small for float64 after whitening: lu_factor raised and the job stopped in a traceback, a probe 2026-12-07),
    # whose pivoted factors pivot_factors then makes from B's numerical rank
    _, pivots, _ = torch.linalg.lu_factor_ex(b.T.contiguous())
    perm = torch.arange(n)
    for i, j in enumerate((pivots - 1).tolist()):
        if i != j:
            perm[[i, j]] = perm[[j, i]]
    return perm


def _qr_pivots(b: torch.Tensor) -> torch.Tensor:
    """Greedy column-pivoted QR (Businger-Golub) of B: pivots first."""
    r, n = b.shape
    rest = b.clone()
    norms = rest.pow(2).sum(0)
    perm = torch.arange(n)
    for i in range(r):
        j = i + int(torch.argmax(norms[perm[i:]]))
        perm[[i, j]] = perm[[j, i]]
        col = rest[:, perm[i]]
        nrm = col.norm()
        if nrm == 0:
            break
        u = col / nrm
        rest -= u[:, None] * (u @ rest)[None, :]
        norms = rest.pow(2).sum(0)
    return perm


def _maxvol_pivots(b: torch.Tensor, tol: float = 0.05, max_iters: int | None = None) -> torch.Tensor:
    """Maxvol from the LU pivots: swap while some |B'| entry exceeds 1 + tol (volume grows each swap)."""
    r, n = b.shape
    perm = _lu_pivots(b)
    if r >= n:
        return perm
    # C = B[:, p]^-1 B (r x n); C[:, p] = I. Swapping pivot i for column j multiplies the volume by |C[i, j]|.
    c, info = torch.linalg.solve_ex(b[:, perm[:r]], b)
    if int(info) != 0:  # B[:, p] singular (B below full rank): nothing to improve; pivot_factors reduces B first
        return perm
    pos = torch.empty(n, dtype=torch.long)  # pos[col] = index of col in perm
    pos[perm] = torch.arange(n)
    max_iters = max_iters if max_iters is not None else 4 * r + 100
    c = c.contiguous()  # LAPACK's solve returns it column-major
    scratch = torch.empty_like(c)  # |C|, reused: each iteration is two passes over C and no allocation
    for _ in range(max_iters):
        # max over a flat view: a third of argmax's time on the CPU (r x n float64), the same entry
        flat = int(torch.abs(c, out=scratch).view(-1).max(0).indices)
        i, j = divmod(flat, n)
        pivot = float(c[i, j])
        if abs(pivot) <= 1.0 + tol:
            break
        # Column j enters at row i; the column that was pivot i leaves. Rank-1 update of C, in place (BLAS ger).
        row = c[i] / pivot
        col = c[:, j].clone()
        col[i] -= 1.0
        c.addr_(col, row, alpha=-1.0)
        leaving = int(perm[i])
        a, z = i, int(pos[j])
        perm[a], perm[z] = j, leaving
        pos[j], pos[leaving] = a, z
    return perm


def choose_pivots(b: torch.Tensor, method: str = DEFAULT_PIVOT) -> torch.Tensor:
    if method not in PIVOT_METHODS:
        raise ValueError(f"unknown pivot method {method!r}; choose from {PIVOT_METHODS}")
    b = b.detach().to(torch.float64)
    if method == "lu":
        return _lu_pivots(b)
    if method == "qr":
        return _qr_pivots(b)
    return _maxvol_pivots(b)


def pivot_factors(out_factor: torch.Tensor, in_factor: torch.Tensor, method: str = DEFAULT_PIVOT) -> PivotedFactors:
    """(A, B) -> (A', B', perm) with A' (x[p] + B' x[q]) = A B x exactly (in exact arithmetic).

    When B has rank below r (a rank-deficient truncation), B[:, p] is singular; the factors are then
    first reduced to their numerical rank by a QR of B, so the result is still exact and smaller.
    """
    a = out_factor.detach().to(torch.float64)
    b = in_factor.detach().to(torch.float64)
    r, n = b.shape
    if r > n:
        raise ValueError(f"rank {r} exceeds the input size {n}")
    perm = choose_pivots(b, method)
    p, q = perm[:r], perm[r:]
    bp = b[:, p]
    sv = torch.linalg.svdvals(bp)
    if r and float(sv[-1]) <= float(sv[0]) * n * torch.finfo(torch.float64).eps * 10:
        # Rank-deficient B: A B = (A Q) R with R of full row rank after dropping zero rows.
        return _reduced(a, b, method)
    rest = torch.linalg.solve(bp, b[:, q])
    return PivotedFactors(a @ bp, rest, perm)


def _reduced(a: torch.Tensor, b: torch.Tensor, method: str) -> PivotedFactors:
    u, s, vh = torch.linalg.svd(b, full_matrices=False)
    keep = int((s > s[0] * max(b.shape) * torch.finfo(torch.float64).eps * 10).sum()) if s.numel() else 0
    keep = max(keep, 1)
    a2 = a @ (u[:, :keep] * s[:keep])
    b2 = vh[:keep]
    perm = choose_pivots(b2, method)
    p, q = perm[:keep], perm[keep:]
    bp = b2[:, p]
    return PivotedFactors(a2 @ bp, torch.linalg.solve(bp, b2[:, q]), perm)


def stored_numel(m: int, n: int, rank: int, factors: str = "pivoted") -> int:
    """Numbers stored for an m x n linear of `rank` (weights only; a bias and the pivots' n integers aside).

    pivoted: r (m + n - r); plain: r (m + n); a rank reaching min(m, n), or a factored size reaching
    m n, is stored dense: m n (what `dense_fallback` decides).
    """
    if factors not in FACTOR_FORMS:
        raise ValueError(f"unknown factor form {factors!r}; choose from {FACTOR_FORMS}")
    if dense_fallback(m, n, rank, factors):
        return m * n
    return rank * (m + n - rank) if factors == "pivoted" else rank * (m + n)


def factored_numel(m: int, n: int, rank: int, factors: str) -> int:
    return rank * (m + n - rank) if factors == "pivoted" else rank * (m + n)


def dense_fallback(m: int, n: int, rank: int, factors: str) -> bool:
    """True when factoring would not make the matrix smaller: keep it as a plain dense weight."""
    return rank >= min(m, n) or factored_numel(m, n, rank, factors) >= m * n

"""Error compensation in closed form: factor toward the original model's outputs, not the weights.

Plain activation-aware truncation fits W' to W on the inputs the compressed model gives the layer
(X', tokens x in): it minimises ||X' W^T - X' W'^T||. The error of the blocks before this one is
then never corrected. Compensation fits W' to the *original* model's outputs instead, given the
original model's inputs X to the same linear, token for token, and pulls it toward the original
weights so that it does not over-fit the calibration text:

    E(W') = ||X W^T - X' W'^T||_F^2 / T + lam ||W - W'||_F^2,    lam = anchor * mean(diag(G'))

With the means G' = X'^T X' / T, C = X^T X' / T and e0 = ||X W^T||^2 / T, E is a quadratic in W':

    E(W') = e0 + lam ||W||^2 - 2 tr(W (C + lam I) W'^T) + tr(W' H W'^T),    H = G' + lam I
          = E(W*) + ||(W' - W*) S||_F^2,    W* = W (C + lam I) H^+,    S S^T = H

so the best rank-k W' is the whitened truncation of W* under H: with H = Q diag(l) Q^T and
S = Q diag(sqrt l), W' = U_k U_k^T W* for U_k the top-k left singular vectors of W* S (the same
"eig" route as math/factorize.py, nothing inverted but H's pseudo-inverse from its own
eigendecomposition). U_k is the same for any S with S S^T = H, so where lam > 0 keeps every eigenvalue of H
above the pseudo-inverse's cutoff, H's Cholesky factor serves as S and its two triangular solves as H^-1
(`compensated_whitening`). The spectrum of W* S gives the loss above E(W*) at every rank; E(W') itself
is computed exactly from the statistics (`output_error`). docs/DESIGN.md has the derivation.

Without compensation (X = X', C = G') and anchor 0 this is today's truncation exactly; with anchor
> 0 alone it is truncation under the shrunk Gram G' + lam I (a ridge toward the original weights).
"""

from __future__ import annotations

import torch

from .factorize import LINE_CHUNK, Factors, Whitening, factorize, row_chunks, whitened
from .gram import _ROW_CHUNK, GramAccumulator, add_products, product_dtype, product_space, projected_chunks


class CrossGramAccumulator(GramAccumulator):
    """Running mean of x x'^T over paired tokens: x from the original model, x' from the compressed one."""

    def add_pair(self, x: torch.Tensor, x_comp: torch.Tensor) -> None:
        a = x.detach().reshape(-1, self.features)
        b = x_comp.detach().reshape(-1, self.features)
        if a.shape != b.shape:
            raise ValueError(f"paired inputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        add_products(self.sum, a.to(b.device), b)  # not symmetric: every tile, no mirroring; made where b is (run --device)
        self.tokens += a.shape[0]

    def times(self, weight: torch.Tensor) -> torch.Tensor:
        """W C (float64, out x in, on W's device): all that compensation reads of C."""
        return weight.detach().to(torch.float64) @ self.gram.to(weight.device, torch.float64)


class ProjectedCrossAccumulator(GramAccumulator):
    """Running mean of (W x) x'^T over paired tokens: W C itself (out x in), for a linear whose out < in that
    has its input to itself (down_proj). Compensation reads C only as W C (compensated_target, output_error),
    so the in x in C is never formed: out x in float64 instead of in x in, and per token an out x in product
    instead of an in x in one (SmolLM2's down_proj: 576 x 1536 against 1536 x 1536). W x is made in the
    products' precision, a chunk at a time, as OutputGramAccumulator makes the layer's outputs."""

    def __init__(self, weight: torch.Tensor):
        out_f, in_f = weight.shape
        super().__init__(in_f, weight.device)
        self.weight = weight
        self.sum = torch.zeros(out_f, in_f, dtype=torch.float64, device=weight.device)

    def add_pair(self, x: torch.Tensor, x_comp: torch.Tensor) -> None:
        a = x.detach().reshape(-1, self.features)
        b = x_comp.detach().reshape(-1, self.features)
        if a.shape != b.shape:
            raise ValueError(f"paired inputs differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
        dtype = product_dtype(a)
        self.product_eps = max(self.product_eps, torch.finfo(dtype).eps)
        space = product_space(self.sum, False, dtype, b.device)  # one scratch per batch (gram.add_products)
        # W x where the compressed block's inputs are (run --device)
        for start, _, y in projected_chunks(a, self.weight, b.device):
            add_products(self.sum, y, b[start : start + _ROW_CHUNK], space=space)
        self.tokens += a.shape[0]

    def add_outputs(self, y: torch.Tensor, x_comp: torch.Tensor) -> None:
        """The same sum from the original linear's outputs y = W x (bias excluded) instead of its inputs x: what a job
        has anyway from the original block's forward, so the out x in product W x is not made again here, and the
        original side a job keeps on disk for a later pass is out wide instead of in wide (job/stages.py)."""
        out_f = self.sum.shape[0]
        a = y.detach().reshape(-1, out_f)
        b = x_comp.detach().reshape(-1, self.features)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"paired outputs and inputs differ in tokens: {a.shape[0]} vs {b.shape[0]}")
        dtype = product_dtype(a)
        self.product_eps = max(self.product_eps, torch.finfo(dtype).eps)
        add_products(self.sum, a.to(b.device), b)  # a chunk of rows at a time, as add_pair's
        self.tokens += a.shape[0]

    def times(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.shape != self.weight.shape:
            raise ValueError("a projected cross statistic holds W C for its own linear's W only")
        return self.gram.to(weight.device, torch.float64)


def projects_cross(out_features: int, in_features: int, alone: bool) -> bool:
    """Whether a group led by such a linear keeps W C (ProjectedCrossAccumulator, paired with the original linear's
    outputs) rather than C (paired with its inputs): a linear alone in its group with out < in."""
    return alone and out_features < in_features


def cross_accumulator(weight: torch.Tensor, alone: bool):
    """The cross statistic of a group led by the linear of `weight`: W C directly where that linear is alone in its
    group and out < in (ProjectedCrossAccumulator), else C (CrossGramAccumulator)."""
    out_f, in_f = weight.shape
    return ProjectedCrossAccumulator(weight) if projects_cross(out_f, in_f, alone) else CrossGramAccumulator(in_f, weight.device)


def ridge(gram: torch.Tensor, anchor: float) -> float:
    """lam for `anchor`: a fraction of the Gram's mean diagonal, so it does not depend on the activations' scale."""
    return float(anchor) * float(gram.diagonal().mean()) if anchor > 0 else 0.0


def _cholesky_exact(h: torch.Tensor, lam: float, product_eps: float) -> torch.Tensor | None:
    """H's Cholesky factor L where it gives what the eigendecomposition gives: lam > 0 bounds every eigenvalue of H
    from below, trace(H) bounds the largest from above, so when lam > trace(H) x the cutoff's ratio no eigenvalue
    is dropped and H^+ = H^-1 = L^-T L^-1 exactly; with L L^T = H, L whitens as Q diag(sqrt l) does (W' = U_k U_k^T
    W* is the same for any S with S S^T = H). None where that is not guaranteed (anchor 0, or an anchor so small that
    the cutoff could bite) or the factorisation fails: the eigendecomposition's pseudo-inverse then."""
    if lam <= 0 or lam <= float(h.diagonal().sum()) * max(h.shape[0] * torch.finfo(torch.float64).eps, product_eps):
        return None
    chol, info = torch.linalg.cholesky_ex(h)
    return chol if int(info) == 0 else None


@torch.no_grad()
def compensated_whitening(gram: torch.Tensor, anchor: float, product_eps: float = 0.0) -> tuple[Whitening, torch.Tensor, torch.Tensor | None, float]:
    """S (for factorize), H's pseudo-inverse and lam for H = G' + lam I. The pseudo-inverse is (Q, 1/l) from H's
    eigendecomposition, or (L, None) for H's Cholesky factor L where that is exact (`_cholesky_exact`: every anchored
    job's; about 10x less work than eigh, which was half of a compensated job's factorisation); both are what
    `compensated_target` reads.

    `product_eps`: the machine epsilon of the products the Gram was summed from (GramAccumulator.product_eps):
    eigenvalues below that fraction of the largest are round-off, not directions the calibration reached.
    """
    g = gram.detach().to(torch.float64)
    lam = ridge(g, anchor)
    h = g + lam * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    chol = _cholesky_exact(h, lam, product_eps)
    if chol is not None:
        return Whitening("eig", chol), chol, None, lam
    evals, evecs = torch.linalg.eigh(h)
    del h
    evals = evals.clamp_min(0)
    # H's pseudo-inverse: directions H does not see (no calibration token reached them) keep W* = 0 there. With
    # float32 products (math/gram.py) those directions hold round-off of about eps32 x the largest eigenvalue, whose
    # inverse would put noise-sized weights into W*: at anchor 0 on a tiny model the compensated block's output
    # error on its own calibration windows was 20x plain truncation's with the float64 cutoff alone, 0.09x with this
    # (tests/job/test_compensation.py). Anchored jobs (lam >= 0.1 mean diag) never reach either cutoff.
    cutoff = float(evals.max()) * max(g.shape[0] * torch.finfo(torch.float64).eps, product_eps)
    inv = torch.zeros_like(evals)
    seen = evals > cutoff
    inv[seen] = 1.0 / evals[seen]
    return Whitening("eig", evecs * evals.sqrt()), evecs, inv, lam


@torch.no_grad()
def compensated_target(weight: torch.Tensor, cross: torch.Tensor | None, q: torch.Tensor, inv: torch.Tensor | None, lam: float,
                       wc: torch.Tensor | None = None) -> torch.Tensor:
    """W* = W (C + lam I) H^+ (float64); `cross` None (and no `wc`) means X = X' (C = G'), where W* = W up to H's
    null space. `wc`: W C already made (ProjectedCrossAccumulator, or a caller's `times`), instead of C. `q`, `inv`:
    H's pseudo-inverse as `compensated_whitening` gives it (Q and 1/l, or H's Cholesky factor and None).

    Made LINE_CHUNK rows at a time into the one m x n result: beside `wc` and W* nothing m x n is held (no float64
    copy of W, no m x n intermediate products; job/plan.py counts W C and W* for a compensated linear)."""
    if cross is None and wc is None:
        return weight.detach().to(torch.float64)
    c = None if wc is not None else cross.to(torch.float64)
    q = q.to(torch.float64)
    out = torch.empty(weight.shape, dtype=torch.float64, device=weight.device)
    for i, w in row_chunks(weight):
        target = wc[i : i + LINE_CHUNK].to(torch.float64) if wc is not None else w @ c
        if lam:
            target = target + lam * w
        if inv is None:  # T H^-1 = (H^-1 T^T)^T, H = L L^T: two triangular solves
            out[i : i + LINE_CHUNK] = torch.cholesky_solve(target.T, q).T
        else:
            out[i : i + LINE_CHUNK] = ((target @ q) * inv) @ q.T
    return out


@torch.no_grad()
def factorize_compensated(weight: torch.Tensor, white: Whitening, q: torch.Tensor, inv: torch.Tensor | None, lam: float,
                          cross: torch.Tensor | None, rank: int, svd: str = "exact", wc: torch.Tensor | None = None,
                          dtype: torch.dtype = torch.float64) -> Factors:
    """The rank-`rank` minimiser of E (module docstring): truncation of W* whitened by H.

    `dtype`: the truncation's precision (math/factorize.py); H's factorisation and pseudo-inverse, and W*,
    stay float64 (the pseudo-inverse's cutoff is set by the product's precision)."""
    return factorize(compensated_target(weight, cross, q, inv, lam, wc), white, rank, "eig", svd=svd, dtype=dtype)


@torch.no_grad()
def output_error(weight: torch.Tensor, new, e0: float, cross: torch.Tensor | None, gram: torch.Tensor,
                 wc: torch.Tensor | None = None) -> float:
    """sqrt(||X W^T - X' W'^T||^2 / T) from the statistics: e0 - 2 tr(W C W'^T) + tr(W' G' W'^T).

    `new`: W' itself, or its factors (B, A) with W' = B A, from which the two traces are taken without any
    m x n matrix: tr(W C W'^T) = sum((B^T (W C)) * A) and tr(W' G' W'^T) = sum((A G' A^T) * (B^T B)) (k x n and
    k x k; against W' G' and B A, two m x n float64 matrices and a third of the work at SmolLM2's ranks).
    `cross` None (and no `wc`) means X = X' (no compensation): C = G'. `wc`: W C already made.
    """
    g = gram.to(torch.float64)
    if wc is None:
        wc = whitened(weight, g if cross is None else cross.to(torch.float64))  # W C, a row chunk of W at a time
    wc = wc.to(torch.float64)
    if isinstance(new, tuple):
        b, a = (t.detach().to(torch.float64) for t in new)
        cross_term = float(((b.T @ wc) * a).sum())
        quadratic = float(((a @ g @ a.T) * (b.T @ b)).sum())
    else:
        wn = new.detach().to(torch.float64)
        cross_term = float((wc * wn).sum())
        quadratic = float(((wn @ g) * wn).sum())
    value = e0 - 2.0 * cross_term + quadratic
    return max(value, 0.0) ** 0.5

"""Activation-aware truncated SVD of one weight matrix.

Both methods minimise ||W X^T - W' X^T||_F over rank-k W' given only the Gram G = X^T X, and both
return a spectrum whose truncated tail is exactly that loss: sqrt(sum of dropped sigma^2).

- "eig" (SVD-LLM V2's loss-optimised truncation, the default): G = Q diag(l) Q^T, S = Q diag(sqrt l),
  SVD of W S = U diag(s) V^T, and W' = U_k U_k^T W. Nothing is inverted, so a singular or
  rank-deficient G (few calibration tokens, dead channels) cannot make it fail.
- "cholesky" (SVD-LLM's truncation-aware whitening): G = S S^T by Cholesky (shifted as SVD-LLM does
  when G is not positive definite), W' = U_k diag(s_k) V_k^T S^{-1}. Same optimum when G is PD.
- "svd": plain SVD of W (G ignored), the activation-unaware baseline.

The smaller side (eig only): U_k, the top-k left singular vectors of W S, are the top-k
eigenvectors of (W S)(W S)^T = W G W^T, an out x out matrix (the Gram of the layer's outputs), and
the singular values are the square roots of its eigenvalues. So a weight with out < in is factored
from that matrix (`factorize_output_side`) and its in x in Gram is not needed (docs/DESIGN.md).
Likewise a tall whitened weight (out > in: gate_proj, up_proj) takes U_k from the in x in A^T A
(`_tall_eig`) rather than an SVD of the whole out x in matrix, and a square or wide one (attention's
projections) from the out x out A A^T (`_wide_eig`): eig never runs gesdd unless --svd asks otherwise.

`svd="randomized"` replaces the exact SVD of W S by Halko-Martinsson-Tropp's randomized SVD
(math/randomized.py); only the leading rank + oversamples singular values are then known, and the
truncation loss is computed exactly from ||W S||_F instead of from the spectrum's tail.

Precision (`dtype`, run --precision): eig's exact routes (W S, A A^T or A^T A and their eigh, U_k^T W; the
output side's eigh of W G W^T) run in float64 by default or in float32, which takes about half the time on a
CPU (here, at 2048: eigh 2.4x, a matrix product 2x faster) and is what a consumer GPU runs fast. The
whitening (the eigh of G, shared by a group) stays float64: the float32 route reads a float32 copy of S,
and a rerun reads S itself, so nothing beyond one route's workspace is held. The factors and the spectrum
come back in float64 either way. float32 blurs the top-k directions of a matrix whose dropped energy is a
small share of its total (`float32_trusted`); there the route runs again in float64, so float32 is kept
only where its loss is predicted within PRECISION_TOLERANCE of float64's (docs/RESULTS.md measures both).
Cholesky, plain SVD and the randomized SVD stay float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("eig", "cholesky", "svd")
# eig on a tall whitened weight (out > in) goes through the in x in A^T A; U_k = A V_k / s_k while the kept
# rank's singular value is at least this fraction of the largest (exact to about 1e-8), else a QR (see _tall_eig)
TALL_MIN_RATIO = 1e-4
# --precision: the dtype of eig's exact routes
PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
# float32 factors are kept only where their loss is predicted within this fraction of float64's (float32_trusted);
# elsewhere the route runs again in float64
PRECISION_TOLERANCE = 1e-3


@dataclass
class Factors:
    out_factor: torch.Tensor  # (out, k)
    in_factor: torch.Tensor  # (k, in)
    spectrum: torch.Tensor  # all singular values of the whitened matrix, descending, float64
    shift: float = 0.0  # diagonal added to G before Cholesky (0 when G was positive definite)
    tail_loss: float | None = None  # the loss when `spectrum` holds only the leading values (randomized)
    precision: str = "float64"  # the arithmetic the factors came from (float32 only where float32_trusted)

    @property
    def rank(self) -> int:
        return self.in_factor.shape[0]

    def to(self, device: torch.device) -> "Factors":
        """The same factors with their tensors on `device` (run --device: made there, stored from the CPU)."""
        move = lambda t: t.to(device)  # noqa: E731
        return Factors(move(self.out_factor), move(self.in_factor), move(self.spectrum), self.shift, self.tail_loss,
                       self.precision)

    def truncation_loss(self) -> float:
        """Predicted ||W X^T - W' X^T||_F (exact for eig; for cholesky, on the shifted Gram)."""
        if self.tail_loss is not None:
            return self.tail_loss
        return float(self.spectrum[self.rank :].pow(2).sum().sqrt())


def rank_for_ratio(out_features: int, in_features: int, ratio: float, factors: str = "plain") -> int:
    """Rank that removes `ratio` of the parameters of an out x in matrix.

    plain factors: k = floor(mn(1-R)/(m+n)); pivoted factors (math/pivot.py): the largest r with
    r (m + n - r) <= (1 - R) m n.
    """
    m, n = out_features, in_features
    if factors == "plain":
        return max(1, int(m * n * (1.0 - ratio) // (m + n)))
    if factors != "pivoted":
        raise ValueError(f"unknown factor form {factors!r}")
    budget = (1.0 - ratio) * m * n
    # r (m + n - r) grows with r up to (m + n) / 2 >= min(m, n): take the smaller root, then fix rounding.
    disc = max(0.0, (m + n) ** 2 - 4.0 * budget)
    r = min(min(m, n), int(((m + n) - math.sqrt(disc)) / 2))
    while r < min(m, n) and (r + 1) * (m + n - r - 1) <= budget:
        r += 1
    while r > 1 and r * (m + n - r) > budget:
        r -= 1
    return max(1, r)


def stored_numel(m: int, n: int, rank: int, factors: str = "pivoted") -> int:
    """Numbers stored for an m x n linear kept at `rank` in form `factors` (see math/pivot.py)."""
    from .pivot import stored_numel as numel

    return numel(m, n, rank, factors)


@dataclass
class Whitening:
    """S with G = S S^T, computed once per distinct input and shared by the linears reading it."""

    method: str
    s: torch.Tensor  # eig: Q diag(sqrt l); cholesky: lower-triangular Cholesky factor
    shift: float = 0.0


def whiten(gram: torch.Tensor, method: str = "eig") -> Whitening:
    g = gram.detach().to(torch.float64)
    if method == "eig":
        evals, evecs = torch.linalg.eigh(g)
        return Whitening(method, evecs * evals.clamp_min(0).sqrt())
    if method != "cholesky":
        raise ValueError(f"no whitening for method {method!r}")
    chol, info = torch.linalg.cholesky_ex(g)
    if info.item() == 0:
        return Whitening(method, chol)
    # SVD-LLM's remedy: lift the spectrum so the smallest eigenvalue becomes slightly positive.
    smallest = float(torch.linalg.eigvalsh(g)[0])
    shift = -smallest + 1e-6 * max(1.0, float(g.diagonal().abs().mean()))
    return Whitening(method, torch.linalg.cholesky(g + shift * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)), shift)


def factorize(weight: torch.Tensor, gram: torch.Tensor | Whitening | None, rank: int, method: str = "eig",
              svd: str = "exact", side: str = "input", dtype: torch.dtype = torch.float64) -> Factors:
    """Factor `weight` (out x in) into (out x k) @ (k x in), computed in float64 (eig's exact routes in `dtype`).

    `gram` may be the input Gram or its Whitening (pass that when several weights share an input).
    `svd` is "exact" or "randomized" (the SVD of W S); `side="output"` (eig only) factors from
    W G W^T instead, the route the job takes for out < in.
    """
    if side == "output":
        if method != "eig" or not isinstance(gram, torch.Tensor):
            raise ValueError("the output side needs method 'eig' and the input Gram itself")
        w64 = weight.detach().to(torch.float64)
        return factorize_output_side(weight, w64 @ gram.to(torch.float64) @ w64.T, rank, dtype)
    if svd not in ("exact", "randomized"):
        raise ValueError(f"unknown svd {svd!r}; choose exact or randomized")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    m, n = weight.shape
    rank = min(rank, m, n)
    if method == "eig" and svd == "exact" and gram is not None:
        # eig's exact routes never hold W or W S whole in float64 (row chunks of the stored weight)
        white = _checked_whitening(gram, method, n)  # float64 whatever `dtype` (see the module docstring)
        route = _tall_eig if m > n else _wide_eig
        return _in_precision(lambda d: route(weight, white.s.to(d), rank), dtype, rank)
    w = weight.detach().to(torch.float64)
    if method == "svd" or gram is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        return Factors(u[:, :rank] * root, root[:, None] * vh[:rank], s)
    white = _checked_whitening(gram, method, n)
    a = w @ white.s
    if svd == "randomized":
        from .randomized import randomized_svd

        u, s, vh = randomized_svd(a, rank)
        if s.shape[0] < min(m, n):
            # ||A - U_k U_k^T A||^2 = ||A||^2 - ||U_k^T A||^2, exactly, for the factors returned.
            u_k = u[:, :rank]
            tail = float((a.pow(2).sum() - (u_k.T @ a).pow(2).sum()).clamp_min(0).sqrt())
            if method == "eig":
                return Factors(u_k, u_k.T @ w, s, tail_loss=tail)
            root = s[:rank].sqrt()
            v_k_sinv = torch.linalg.solve_triangular(white.s.T, vh[:rank].T, upper=True, left=True)
            return Factors(u_k * root, root[:, None] * v_k_sinv.T, s, white.shift, tail_loss=tail)
    else:  # cholesky
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    if method == "eig":  # randomized, with every singular value known
        # W' = U_k U_k^T W: the same optimum as U_k S_k V_k^T S^{-1}, with nothing inverted.
        u_k = u[:, :rank]
        return Factors(u_k, u_k.T @ w, s)
    root = s[:rank].sqrt()
    # V_k^T S^{-1}: solve S^T Z^T = V_k instead of forming the inverse.
    v_k_sinv = torch.linalg.solve_triangular(white.s.T, vh[:rank].T, upper=True, left=True)
    return Factors(u[:, :rank] * root, root[:, None] * v_k_sinv.T, s, white.shift)


def _checked_whitening(gram, method: str, n: int) -> Whitening:
    white = gram if isinstance(gram, Whitening) else whiten(gram, method)
    if white.method != method:
        raise ValueError(f"whitening was computed for {white.method!r}, not {method!r}")
    if white.s.shape != (n, n):
        raise ValueError(f"whitening of shape {tuple(white.s.shape)} does not match weight input size {n}")
    return white


# Rows (or columns) of a weight converted to float64 at a time by eig's exact routes: W is never whole in
# float64 (an 11008 x 4096 gate_proj would be 344 MiB, a 70B one 1.75 GiB), only this many of its rows.
LINE_CHUNK = 512


def row_chunks(w: torch.Tensor, dtype: torch.dtype = torch.float64):
    """(first row, those LINE_CHUNK rows of w in `dtype`), in order: a weight read without a whole float64 copy."""
    for i in range(0, w.shape[0], LINE_CHUNK):
        yield i, w[i : i + LINE_CHUNK].detach().to(dtype)


def project(u_k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """U_k^T W (k x in, in U_k's dtype), summed over row chunks of W (any float dtype)."""
    out = torch.zeros(u_k.shape[1], w.shape[1], dtype=u_k.dtype, device=u_k.device)
    for i, chunk in row_chunks(w, u_k.dtype):
        out.addmm_(u_k[i : i + chunk.shape[0]].T, chunk)
    return out


def weight_gram(w: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W^T W (in x in, in `dtype`), summed over row chunks of W (any float dtype)."""
    wtw = torch.zeros(w.shape[1], w.shape[1], dtype=dtype, device=w.device)
    for _, chunk in row_chunks(w, dtype):
        wtw.addmm_(chunk.T, chunk)
    return wtw


def whitened(w: torch.Tensor, s_white: torch.Tensor) -> torch.Tensor:
    """A = W S (in S's dtype), made a row chunk of W at a time (W any float dtype); S may have any number of columns
    (the tall route's U_k = W (S V_k) is made the same way)."""
    a = torch.empty(w.shape[0], s_white.shape[1], dtype=s_white.dtype, device=s_white.device)
    for i, chunk in row_chunks(w, s_white.dtype):
        torch.mm(chunk, s_white, out=a[i : i + chunk.shape[0]])
    return a


def _tall_eig(w: torch.Tensor, s_white: torch.Tensor, rank: int) -> Factors:
    """eig's factors of a tall whitened weight A = W S (m > n) from the n x n matrix A^T A.

    A^T A = V diag(s^2) V^T, so U_k = A V_k diag(1/s_k) are A's top-k left singular vectors and
    W' = U_k U_k^T W as from the SVD, with an n x n eigendecomposition instead of gesdd on m x n
    (whose U, copy of A and work array are 2.5x this route's memory for an 11008 x 4096 gate_proj;
    docs/DESIGN.md). Neither A nor W is formed whole in float64: A^T A = S^T (W^T W) S with W^T W
    summed over row chunks, U_k = W (S V_k) a row chunk at a time, and U_k^T W summed the same way
    (a 7B gate_proj's workspace 1.75 -> 0.92 GiB; the same factors to round-off). The squared route
    loses precision where s_k is small (an error of about eps (s_0 / s_k)^2 in U_k): when the kept
    rank reaches below TALL_MIN_RATIO s_0 (rank-deficient inputs: few calibration tokens, dead
    channels), U_k is the Q of A V_k's QR instead, orthonormal whatever s_k, equal to the singular
    vectors where they are well determined and spanning what is left of A's range after them (whose
    loss is below that s_k anyway). In float32 (eps 1.2e-7 instead of 2.2e-16) the squared route's error would
    reach 1e-3 at s_k = 1e-2 s_0, so there U_k is always the QR's (2 m k^2 more operations, a few percent).
    All in s_white's dtype; the factors and s come back in float64.
    """
    dtype = s_white.dtype
    wtw = weight_gram(w, dtype)
    gram = s_white.T @ wtw @ s_white
    del wtw
    evals, evecs = torch.linalg.eigh(gram)
    del gram
    s = evals.flip(0).clamp_min(0).sqrt()  # descending
    sv = s_white @ evecs[:, evecs.shape[1] - rank :].flip(1)  # S V_k: the top k, descending
    del evecs
    u_k = whitened(w, sv)  # W (S V_k), a row chunk of W at a time
    del sv
    if dtype == torch.float64 and float(s[rank - 1]) > TALL_MIN_RATIO * float(s[0]):
        u_k /= s[:rank]
    else:
        u_k = torch.linalg.qr(u_k).Q
    return _float64_factors(u_k, project(u_k, w), s)


def _float64_factors(u_k: torch.Tensor, in_factor: torch.Tensor, s: torch.Tensor) -> Factors:
    """Factors in float64 whatever the route's precision (what callers and the stored form expect)."""
    precision = "float64" if u_k.dtype == torch.float64 else "float32"
    return Factors(u_k.to(torch.float64), in_factor.to(torch.float64), s.to(torch.float64), precision=precision)


def _wide_eig(w: torch.Tensor, s_white: torch.Tensor, rank: int) -> Factors:
    """eig's factors of a square or wide whitened weight A = W S (m <= n) from the m x m matrix A A^T.

    A A^T = U diag(s^2) U^T: its top eigenvectors are A's top-k left singular vectors, all that
    W' = U_k U_k^T W needs (V is never used), so an m x m product and eigh replace gesdd's U, V and
    work arrays: about 2x faster for a square 2048-wide matrix here, and a square attention weight is
    half of a 7B block's factorisation (docs/RESULTS.md). A is made a row chunk of W at a time (W is
    never whole in float64). Where eigenvalues are equal (a rank-deficient input's zeros) the vectors
    eigh returns there are another orthonormal basis of the same space, which leaves W' and its loss
    the SVD's. s comes from the eigenvalues: exact to about eps s_0^2 in s^2, so the truncation loss
    it reports is the SVD's to round-off of the largest squared value.
    """
    a = whitened(w, s_white)
    h = a @ a.T
    del a
    return _from_out_gram(h, w, rank)


def _from_out_gram(h: torch.Tensor, w: torch.Tensor, rank: int) -> Factors:
    """W' = U_k U_k^T W from H = (W S)(W S)^T (out x out): U_k its top-k eigenvectors, s the square roots of its
    eigenvalues (min(m, n) of them), descending. The output side's route, and the square / wide input side's.
    `w` in any float dtype: U_k^T W is summed over its row chunks in H's dtype; the factors come back in float64."""
    m, n = w.shape
    evals, evecs = torch.linalg.eigh(h)
    del h
    s = evals.flip(0).clamp_min(0).sqrt()[: min(m, n)]
    u_k = evecs[:, evecs.shape[1] - rank :].flip(1).contiguous()  # the top k, descending (a copy of k columns only)
    del evecs
    return _float64_factors(u_k, project(u_k, w), s)


def factorize_output_side(weight: torch.Tensor, output_gram: torch.Tensor, rank: int,
                          dtype: torch.dtype = torch.float64) -> Factors:
    """eig's factors from H = W G W^T (out x out), the Gram of the layer's outputs.

    H = (W S)(W S)^T, so its eigenvectors are the left singular vectors U of W S and its
    eigenvalues their squared singular values: W' = U_k U_k^T W and the loss sqrt(sum of the
    dropped eigenvalues) are exactly what the input side gives, with an out x out eigendecomposition.
    """
    m, n = weight.shape
    if output_gram.shape != (m, m):
        raise ValueError(f"output Gram of shape {tuple(output_gram.shape)} does not match weight output size {m}")
    rank = min(rank, m, n)
    return _in_precision(lambda d: _from_out_gram(output_gram.detach().to(d), weight, rank), dtype, rank)


def _in_precision(route, dtype: torch.dtype, rank: int) -> Factors:
    """route(dtype), run again as route(float64) where float32_trusted does not trust its float32 result."""
    f = route(dtype)
    if dtype != torch.float64 and not float32_trusted(f.spectrum, rank):
        f = None  # gone before the float64 route: the plan counts one route's workspace and factors
        f = route(torch.float64)
    return f


def float32_trusted(spectrum: torch.Tensor, rank: int) -> bool:
    """Whether float32 factors with this spectrum (theirs) are predicted to lose at most PRECISION_TOLERANCE more
    than float64's.

    The routes eigendecompose a squared matrix (A A^T, A^T A or W G W^T), whose float32 eigenvalues are exact only to
    about eps32 x its largest, so the top-k directions blur where the dropped energy is a small share of the total.
    tools/bench_precision.py measured the loss increase below (eps32 sqrt(size) / 4) x total / dropped energy on
    SmolLM2's matrices and 7B shapes (docs/RESULTS.md): block 0's attention at ratio 0.2 (1% of its output lost)
    lost 1-2% more in float32; most matrices, 1e-8-1e-4 more."""
    s2 = spectrum.to(torch.float64).pow(2)
    dropped = float(s2[rank:].sum())
    if dropped <= 0.0:
        return False  # nothing dropped or float32 could not tell: float64 decides
    predicted = torch.finfo(torch.float32).eps * math.sqrt(spectrum.shape[0]) / 4 * float(s2.sum()) / dropped
    return predicted <= PRECISION_TOLERANCE

"""Pivoted factors: exact reconstruction, bounded B', the rank a ratio affords, the stored size."""

import pytest
import torch

from streamsvd.math.factorize import rank_for_ratio, stored_numel
from streamsvd.math.pivot import PIVOT_METHODS, dense_fallback, pivot_factors


def _pair(m, n, r, seed=0, cond=None, true_rank=None):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, r, generator=g, dtype=torch.float64)
    b = torch.randn(r, n, generator=g, dtype=torch.float64)
    if cond is not None:  # singular values of B spread over `cond`
        u, _, vh = torch.linalg.svd(b, full_matrices=False)
        b = u @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=torch.float64)) @ vh
    if true_rank is not None:  # B of rank true_rank < r
        b = torch.randn(r, true_rank, generator=g, dtype=torch.float64) @ torch.randn(true_rank, n, generator=g, dtype=torch.float64)
    return a, b


def _rel(f, w):
    return float((f.matrix() - w).norm() / w.norm())


@pytest.mark.parametrize("method", PIVOT_METHODS)
@pytest.mark.parametrize("m,n,r", [(48, 80, 20), (80, 48, 30), (64, 64, 63), (16, 200, 1)])
def test_random_factors_reconstruct_exactly_with_a_permutation(method, m, n, r):
    a, b = _pair(m, n, r)
    f = pivot_factors(a, b, method)
    assert f.out_factor.shape == (m, r) and f.in_rest.shape == (r, n - r)
    assert sorted(f.pivots.tolist()) == list(range(n))
    assert _rel(f, a @ b) < 1e-12
    # A' is the pivot columns of W itself.
    torch.testing.assert_close(f.out_factor, (a @ b)[:, f.pivots[:r]])


@pytest.mark.parametrize("method", PIVOT_METHODS)
def test_rank_deficient_factors_reduce_to_their_true_rank_and_stay_exact(method):
    a, b = _pair(40, 90, 25, seed=1, true_rank=12)
    f = pivot_factors(a, b, method)
    assert f.rank == 12
    assert _rel(f, a @ b) < 1e-12


@pytest.mark.parametrize("method", PIVOT_METHODS)
@pytest.mark.parametrize("case", ["zero", "underflow", "repeated rows"])
def test_exactly_singular_factors_are_pivoted_not_refused(method, case):
    """A weight of zeros (or one scaled by 1e-30: its factors underflow) made LAPACK's LU raise 'U[1,1] is zero' and
    the job stop in a traceback (a probe, 2026-12-07); such factors reduce to their numerical rank like any other
    rank-deficient pair (at least 1), exactly."""
    a, b = _pair(30, 50, 6, seed=3)
    b = {"zero": torch.zeros_like(b), "underflow": b * 1e-300, "repeated rows": b[:2].repeat(3, 1)}[case]
    f = pivot_factors(a, b, method)
    assert sorted(f.pivots.tolist()) == list(range(50))
    assert f.rank == {"zero": 1, "underflow": f.rank, "repeated rows": 2}[case]  # underflow: as float64 resolves it
    assert float((f.matrix() - a @ b).abs().max()) <= 1e-12 * max(float((a @ b).abs().max()), 1e-300)


@pytest.mark.parametrize("method", PIVOT_METHODS)
def test_ill_conditioned_factors_reconstruct_to_float64_accuracy(method):
    a, b = _pair(60, 120, 40, seed=2, cond=1e8)
    f = pivot_factors(a, b, method)
    assert f.rank == 40
    assert _rel(f, a @ b) < 1e-8


def test_maxvol_bounds_every_interpolation_coefficient_and_lu_does_not():
    a, b = _pair(300, 300, 110, seed=3)
    maxvol = pivot_factors(a, b, "maxvol")
    lu = pivot_factors(a, b, "lu")
    assert float(maxvol.in_rest.abs().max()) <= 1.05 + 1e-9
    assert float(lu.in_rest.abs().max()) > float(maxvol.in_rest.abs().max())


def test_rank_for_pivoted_factors_is_the_largest_that_fits():
    # The figures of issue 14.
    assert rank_for_ratio(576, 576, 0.4, "pivoted") == 211 and rank_for_ratio(576, 576, 0.4) == 172
    assert rank_for_ratio(1536, 576, 0.4, "pivoted") == 291 and rank_for_ratio(1536, 576, 0.4) == 251
    assert rank_for_ratio(4096, 4096, 0.2, "pivoted") == 2264 and rank_for_ratio(4096, 4096, 0.2) == 1638
    for m, n in [(576, 1536), (64, 160), (4096, 11008), (7, 3)]:
        for ratio in (0.05, 0.2, 0.4, 0.6, 0.95):
            r = rank_for_ratio(m, n, ratio, "pivoted")
            budget = (1 - ratio) * m * n
            assert 1 <= r < min(m, n)
            assert r == 1 or r * (m + n - r) <= budget
            assert (r + 1) * (m + n - r - 1) > budget
            assert r >= rank_for_ratio(m, n, ratio, "plain")
    with pytest.raises(ValueError):
        rank_for_ratio(8, 8, 0.4, "other")


def test_stored_numel_by_form_and_the_dense_fallback():
    assert stored_numel(576, 1536, 291, "pivoted") == 291 * (576 + 1536 - 291)
    assert stored_numel(576, 1536, 251, "plain") == 251 * (576 + 1536)
    # Full rank costs exactly the dense matrix when pivoted; plain full rank is larger, so it stays dense.
    assert stored_numel(64, 160, 64, "pivoted") == 64 * 160 and dense_fallback(64, 160, 64, "pivoted")
    assert stored_numel(64, 160, 50, "plain") == 64 * 160 and dense_fallback(64, 160, 50, "plain")
    assert not dense_fallback(64, 160, 50, "pivoted")
    with pytest.raises(ValueError):
        stored_numel(8, 8, 2, "other")

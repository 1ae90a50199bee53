"""float32 factorisation (run --precision float32): every eig route gives float64 factors whose loss, measured
in float64, is within PRECISION_TOLERANCE of float64's, rank-deficient inputs included; where float32 would lose
more, the route runs again in float64."""

import pytest
import torch

from factor_problems import activation_loss, activation_problem
from streamsvd.math.compensate import compensated_target, compensated_whitening, factorize_compensated
from streamsvd.math import factorize as factorize_module
from streamsvd.math.factorize import PRECISION_TOLERANCE, factorize, factorize_output_side, float32_trusted, whiten


_problem = activation_problem
_loss = activation_loss


# tall (A^T A, always its QR in float32), square and wide (A A^T); 400 tokens or 30 (a rank-deficient Gram)
SHAPES = [(400, 80, 48), (400, 64, 64), (400, 48, 80), (30, 80, 48), (30, 48, 80)]


@pytest.mark.parametrize("tokens,m,n", SHAPES)
@pytest.mark.parametrize("rank", [1, 7, 30])
def test_float32_input_side_loses_almost_nothing(tokens, m, n, rank):
    w, x = _problem(tokens, m, n)
    gram = x.T @ x
    exact = factorize(w, gram, rank, "eig")
    low = factorize(w, whiten(gram), rank, "eig", dtype=torch.float32)
    assert low.out_factor.dtype == low.in_factor.dtype == low.spectrum.dtype == torch.float64
    assert low.rank == rank and low.out_factor.shape == (m, rank) and low.spectrum.shape == exact.spectrum.shape
    total = float((w @ x.T).norm())
    # never better than the optimum (to round-off), and worse by at most the tolerance
    assert _loss(w, exact, x) - 1e-9 * total <= _loss(w, low, x) <= _loss(w, exact, x) * (1 + PRECISION_TOLERANCE)
    # its own report of the loss is float32's eigenvalues: right to a small part of the output too
    assert low.truncation_loss() == pytest.approx(_loss(w, low, x), abs=1e-3 * total)
    # float32 kept (math/factorize.float32_trusted) unless the loss is a tiny share of the output (the Gram's rank)
    assert low.precision == ("float64" if _loss(w, exact, x) < 0.01 * total else "float32")
    if low.precision == "float32":
        assert not torch.equal(low.in_factor, exact.in_factor)  # float32 arithmetic ran
    else:  # run again in float64, on the same float64 whitening: float64's factors exactly
        assert torch.equal(low.in_factor, exact.in_factor) and torch.equal(low.spectrum, exact.spectrum)


@pytest.mark.parametrize("tokens", [400, 30])
def test_float32_output_side(tokens):
    w, x = _problem(tokens, 48, 80)
    h = w @ (x.T @ x) @ w.T
    exact, low = factorize_output_side(w, h, 12), factorize_output_side(w, h, 12, torch.float32)
    total = float((w @ x.T).norm())
    assert low.out_factor.dtype == torch.float64
    assert _loss(w, exact, x) - 1e-9 * total <= _loss(w, low, x) <= _loss(w, exact, x) + 1e-5 * total


def test_float32_compensated_factors_fit_the_target_as_float64():
    """Compensation's truncation in float32 (H's eigh and pseudo-inverse stay float64): the distance to W* under H is
    float64's to round-off of the whole."""
    g = torch.Generator().manual_seed(3)
    w, x = _problem(400, 80, 48)
    x_comp = x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    gram = x_comp.T @ x_comp / 400
    cross = x_comp.T @ x / 400
    white, q, inv, lam = compensated_whitening(gram, 0.1)
    exact = factorize_compensated(w, white, q, inv, lam, cross, 12)
    low = factorize_compensated(w, white, q, inv, lam, cross, 12, dtype=torch.float32)
    target = compensated_target(w, cross, q, inv, lam)
    h = gram + lam * torch.eye(48, dtype=torch.float64)

    def distance(f):
        d = target - f.out_factor @ f.in_factor
        return float(torch.trace(d @ h @ d.T)) ** 0.5

    total = float(torch.trace(target @ h @ target.T)) ** 0.5
    assert distance(exact) - 1e-9 * total <= distance(low) <= distance(exact) + 1e-5 * total


def _power_law(n=256, seed=0):
    """A whitened weight whose truncation keeps nearly everything: singular values (1 + i)^-1 under a Gram whose
    eigenvalues fall as (1 + i)^-2 (where tools/bench_precision.py found float32's squared routes weakest)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    steps = 1 + torch.arange(n, dtype=torch.float64)
    return (u / steps) @ v.T, (q * steps**-2.0) @ q.T


def test_where_float32_would_blur_the_top_directions_the_route_runs_again_in_float64(monkeypatch):
    w, gram = _power_law()
    s = whiten(gram).s

    def loss(f):
        return float(((w - f.out_factor @ f.in_factor) @ s).norm())

    exact = factorize(w, gram, 128)
    monkeypatch.setattr(factorize_module, "PRECISION_TOLERANCE", float("inf"))  # float32 kept whatever it loses
    unguarded = factorize(w, whiten(gram), 128, dtype=torch.float32)
    assert unguarded.precision == "float32"
    assert loss(unguarded) > loss(exact) * (1 + 10 * PRECISION_TOLERANCE)  # 1.7% more: the failure the guard is for
    monkeypatch.setattr(factorize_module, "PRECISION_TOLERANCE", PRECISION_TOLERANCE)
    guarded = factorize(w, whiten(gram), 128, dtype=torch.float32)
    assert guarded.precision == "float64"
    assert loss(guarded) <= loss(exact) * (1 + PRECISION_TOLERANCE)
    # at a rank that drops more, float32 is trusted and kept, and within the tolerance
    kept = factorize(w, whiten(gram), 32, dtype=torch.float32)
    assert kept.precision == "float32"
    assert loss(kept) <= loss(factorize(w, gram, 32)) * (1 + PRECISION_TOLERANCE)


def test_float32_trusted_reads_the_dropped_share():
    flat = torch.ones(100, dtype=torch.float64)
    assert float32_trusted(flat, 50)  # half the energy dropped
    assert not float32_trusted(flat, 100)  # nothing dropped: nothing to judge by, float64 decides
    steep = torch.logspace(0, -6, 100, dtype=torch.float64)
    assert not float32_trusted(steep, 50)  # the dropped energy is 1e-6 of the total: float32 cannot resolve it

"""Randomized SVD (math/randomized.py) and `factorize(..., svd="randomized")`."""

import pytest
import torch

from streamsvd.math.factorize import factorize
from streamsvd.math.randomized import auto_prefers_randomized, randomized_svd


def _decaying(m, n, seed=0, decay=0.03):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = torch.exp(-decay * torch.arange(min(m, n), dtype=torch.float64))
    return (u * s) @ v.T, s


def test_leading_singular_values_and_deterministic():
    a, s = _decaying(300, 200, decay=0.3)
    u, got, vh = randomized_svd(a, 20)
    assert u.shape == (300, 30) and got.shape == (30,) and vh.shape == (30, 200)
    torch.testing.assert_close(got[:20], s[:20], rtol=1e-6, atol=0)
    again = randomized_svd(a, 20)
    assert torch.equal(again[1], got)  # seeded: the same bytes every run


def test_without_power_iterations_a_flat_spectrum_is_worse():
    a, s = _decaying(300, 200, decay=0.002)
    exact_tail = float(s[20:].pow(2).sum().sqrt())
    def tail(q):
        u, _, _ = randomized_svd(a, 20, power_iterations=q)
        u = u[:, :20]
        return float((a - u @ (u.T @ a)).norm())
    assert tail(0) > tail(3) >= exact_tail * (1 - 1e-9)


@pytest.mark.parametrize("method", ["eig", "cholesky"])
def test_randomized_factorize_loss_is_exact_for_its_factors_and_close_to_optimal(method):
    g = torch.Generator().manual_seed(1)
    w, _ = _decaying(120, 160)
    x = torch.randn(600, 160, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 160, dtype=torch.float64)
    gram = x.T @ x
    exact = factorize(w, gram, 25, method)
    rand = factorize(w, gram, 25, method, svd="randomized")
    measured = float(((w - rand.out_factor @ rand.in_factor) @ x.T).norm())
    assert rand.truncation_loss() == pytest.approx(measured, rel=1e-6)
    assert exact.truncation_loss() * (1 - 1e-9) <= rand.truncation_loss() <= exact.truncation_loss() * 1.01
    assert rand.spectrum.shape[0] == 35  # rank + oversamples leading values only


def test_auto_takes_randomized_only_for_measured_shapes(monkeypatch):
    import streamsvd.math.randomized as randomized
    from streamsvd.job.plan import choose_svd

    # SmolLM2's shapes were measured above 1% of exact: auto keeps the exact SVD there.
    assert choose_svd("auto", 576, 1536, 251) == "exact" and choose_svd("auto", 576, 576, 172) == "exact"
    assert choose_svd("randomized", 576, 576, 172) == "randomized"
    monkeypatch.setattr(randomized, "MEASURED_WITHIN_1PCT", frozenset({(4096, 4096)}))
    assert auto_prefers_randomized(4096, 4096, 1228) and choose_svd("auto", 4096, 4096, 1228) == "randomized"

"""Closed-form compensation (math/compensate.py) against brute force on tiny cases."""

from __future__ import annotations

import pytest
import torch

from streamsvd.math.compensate import (
    CrossGramAccumulator,
    compensated_target,
    compensated_whitening,
    factorize_compensated,
    output_error,
    ridge,
)
from streamsvd.math.factorize import factorize
from streamsvd.math.gram import GramAccumulator


def _problem(seed=0, t=300, n=12, m=9, noise=0.3, deficient=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    if deficient:
        x[:, -3:] = 0  # three dead channels: G' is singular
    x_comp = x + noise * torch.randn(t, n, generator=g, dtype=torch.float64)
    if deficient:
        x_comp[:, -3:] = 0
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    return x, x_comp, w


def _stats(x, x_comp, w):
    gram, cross = GramAccumulator(x.shape[1]), CrossGramAccumulator(x.shape[1])
    for part in range(0, x.shape[0], 70):  # several batches, as the job adds them
        gram.add_batch(x_comp[part : part + 70])
        cross.add_pair(x[part : part + 70], x_comp[part : part + 70])
    e0 = float((x @ w.T).pow(2).sum()) / x.shape[0]
    return gram.gram, cross.gram, e0


def _objective(x, x_comp, w, new, lam):
    return float((x @ w.T - x_comp @ new.T).pow(2).sum()) / x.shape[0] + lam * float((w - new).pow(2).sum())


def _brute_force(x, x_comp, w, rank, lam, steps=400):
    """Minimise the objective over rank-`rank` A B directly (L-BFGS from a random start)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(w.shape[0], rank, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(rank, w.shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (x @ w.T - x_comp @ (a @ b).T).pow(2).sum() / x.shape[0] + lam * (w - a @ b).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return _objective(x, x_comp, w, (a @ b).detach(), lam)


@pytest.mark.parametrize("anchor", [0.0, 0.1])
@pytest.mark.parametrize("rank", [3, 6])
def test_the_closed_form_reaches_the_brute_force_minimum(anchor, rank):
    x, x_comp, w = _problem()
    gram, cross, e0 = _stats(x, x_comp, w)
    white, q, inv, lam = compensated_whitening(gram, anchor)
    f = factorize_compensated(w, white, q, inv, lam, cross, rank)
    ours = _objective(x, x_comp, w, f.out_factor @ f.in_factor, lam)
    best = _brute_force(x, x_comp, w, rank, lam)
    assert ours <= best * (1 + 1e-6) + 1e-9
    assert ours == pytest.approx(best, rel=1e-4)


def test_the_unconstrained_target_is_the_least_squares_solution():
    x, x_comp, w = _problem(seed=3)
    gram, cross, _ = _stats(x, x_comp, w)
    white, q, inv, lam = compensated_whitening(gram, 0.2)
    full = factorize_compensated(w, white, q, inv, lam, cross, min(w.shape))
    # Stacked least squares: [X'; sqrt(T lam) I] W'^T = [X W^T; sqrt(T lam) W^T].
    t = x.shape[0]
    lhs = torch.cat([x_comp, (t * lam) ** 0.5 * torch.eye(x.shape[1], dtype=torch.float64)])
    rhs = torch.cat([x @ w.T, (t * lam) ** 0.5 * w.T])
    solution = torch.linalg.lstsq(lhs, rhs).solution.T
    assert torch.allclose(full.out_factor @ full.in_factor, solution, atol=1e-8)


@pytest.mark.parametrize("deficient", [False, True])
def test_the_reported_output_error_is_the_error_achieved(deficient):
    x, x_comp, w = _problem(seed=5, deficient=deficient)
    gram, cross, e0 = _stats(x, x_comp, w)
    white, q, inv, lam = compensated_whitening(gram, 0.0 if deficient else 0.1)
    f = factorize_compensated(w, white, q, inv, lam, cross, 4)
    new = f.out_factor @ f.in_factor
    achieved = (float((x @ w.T - x_comp @ new.T).pow(2).sum()) / x.shape[0]) ** 0.5
    assert output_error(w, new, e0, cross, gram) == pytest.approx(achieved, rel=1e-9)
    # from the factors, no m x n matrix (what the job reports)
    assert output_error(w, (f.out_factor, f.in_factor), e0, cross, gram) == pytest.approx(achieved, rel=1e-9)
    # The spectrum's tail is the part of the objective above the unconstrained optimum W*.
    best = factorize_compensated(w, white, q, inv, lam, cross, min(w.shape))
    above = _objective(x, x_comp, w, new, lam) - _objective(x, x_comp, w, best.out_factor @ best.in_factor, lam)
    assert f.truncation_loss() ** 2 == pytest.approx(above, rel=1e-6, abs=1e-9)


def test_compensation_lowers_the_error_against_the_original_outputs():
    # The upstream error as a compression leaves it: a systematic distortion of the inputs, not noise.
    x, _, w = _problem(seed=7)
    distortion = torch.eye(x.shape[1], dtype=torch.float64) + 0.3 * torch.randn(x.shape[1], x.shape[1], generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x_comp = x @ distortion
    gram, cross, e0 = _stats(x, x_comp, w)
    white, q, inv, lam = compensated_whitening(gram, 0.0)
    comp = factorize_compensated(w, white, q, inv, lam, cross, 5)
    plain = factorize(w, gram, 5, "eig")
    err = lambda f: output_error(w, f.out_factor @ f.in_factor, e0, cross, gram)  # noqa: E731
    assert err(comp) < 0.9 * err(plain)


def test_no_compensation_and_no_anchor_is_todays_truncation():
    x, x_comp, w = _problem(seed=2)
    gram = GramAccumulator(x.shape[1])
    gram.add_batch(x_comp)
    white, q, inv, lam = compensated_whitening(gram.gram, 0.0)
    ours = factorize_compensated(w, white, q, inv, lam, None, 4)
    today = factorize(w, gram.gram, 4, "eig")
    assert lam == 0.0
    assert torch.allclose(ours.out_factor @ ours.in_factor, today.out_factor @ today.in_factor, atol=1e-9)


def test_the_anchor_scales_with_the_activations():
    x, x_comp, w = _problem(seed=4)
    gram, _, _ = _stats(x, x_comp, w)
    assert ridge(gram * 100, 0.1) == pytest.approx(100 * ridge(gram, 0.1))
    assert ridge(gram, 0.0) == 0.0
    # The same factors whatever the activations' scale (lam follows the Gram).
    a = factorize_compensated(w, *compensated_whitening(gram, 0.1), None, 4)
    b = factorize_compensated(w, *compensated_whitening(gram * 100, 0.1), None, 4)
    assert torch.allclose(a.out_factor @ a.in_factor, b.out_factor @ b.in_factor, atol=1e-8)


def test_paired_inputs_of_other_shapes_are_refused():
    acc = CrossGramAccumulator(4)
    with pytest.raises(ValueError):
        acc.add_pair(torch.zeros(3, 4), torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_projected_cross_statistic_is_w_times_the_cross_gram_and_gives_the_same_factors(dtype):
    """For a lone linear with out < in (down_proj) the job accumulates W C (out x in) instead of C (in x in):
    the same W C to the products' precision, the same factors and the same output error."""
    from streamsvd.math.compensate import ProjectedCrossAccumulator, cross_accumulator

    x, x_comp, w = _problem(n=12, m=5)  # out 5 < in 12
    projected, cross = ProjectedCrossAccumulator(w), CrossGramAccumulator(12)
    gram = GramAccumulator(12)
    for part in range(0, x.shape[0], 70):
        projected.add_pair(x[part : part + 70].to(dtype), x_comp[part : part + 70].to(dtype))
        cross.add_pair(x[part : part + 70].to(dtype), x_comp[part : part + 70].to(dtype))
        gram.add_batch(x_comp[part : part + 70].to(dtype))
    assert projected.sum.shape == (5, 12) and projected.tokens == cross.tokens == x.shape[0]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    wc = projected.times(w)
    assert torch.allclose(wc, cross.times(w), rtol=0, atol=tol * float(cross.times(w).abs().max()))
    white, q, inv, lam = compensated_whitening(gram.gram, 0.1, gram.product_eps)
    a = factorize_compensated(w, white, q, inv, lam, None, 3, wc=wc)
    b = factorize_compensated(w, white, q, inv, lam, cross.gram, 3)
    assert torch.allclose(a.out_factor @ a.in_factor, b.out_factor @ b.in_factor, atol=100 * tol * float(w.abs().max()))
    e0 = float((x @ w.T).pow(2).sum()) / x.shape[0]
    new = a.out_factor @ a.in_factor
    assert output_error(w, new, e0, None, gram.gram, wc=wc) == pytest.approx(output_error(w, new, e0, cross.gram, gram.gram), rel=1e-4)
    # from the original linear's outputs W x (what the job's original block gives) instead of its inputs: the same sum
    from_outputs = ProjectedCrossAccumulator(w)
    for part in range(0, x.shape[0], 70):
        from_outputs.add_outputs((x[part : part + 70] @ w.T).to(dtype), x_comp[part : part + 70].to(dtype))
    assert from_outputs.tokens == projected.tokens and from_outputs.product_eps == projected.product_eps
    assert torch.allclose(from_outputs.times(w), wc, rtol=0, atol=tol * float(wc.abs().max()))
    with pytest.raises(ValueError):
        from_outputs.add_outputs(x[:3] @ w.T, x_comp[:2])
    with pytest.raises(ValueError):
        projected.times(w.T)  # W C of its own linear only
    # the job's choice: W C for a lone out < in linear, C where the input is shared or out >= in
    assert isinstance(cross_accumulator(w, alone=True), ProjectedCrossAccumulator)
    assert type(cross_accumulator(w, alone=False)) is CrossGramAccumulator
    assert type(cross_accumulator(w.T.contiguous(), alone=True)) is CrossGramAccumulator


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_w_star_made_a_row_chunk_at_a_time_is_the_whole_products(dtype, monkeypatch):
    """W* = W (C + lam I) H^+ made LINE_CHUNK rows at a time (no float64 copy of W, no m x n intermediates)
    equals the whole-matrix product to round-off, with C or with W C given, from a weight in any dtype."""
    from streamsvd.math import compensate, factorize as fz

    x, x_comp, w = _problem(seed=9, n=12, m=23)
    gram, cross, _ = _stats(x, x_comp, w)
    white, q, inv, lam = compensated_whitening(gram, 0.1)
    weight = w.to(dtype)
    w64 = weight.to(torch.float64)
    assert inv is None  # anchored: H's Cholesky factor (test below)
    h = gram + lam * torch.eye(gram.shape[0], dtype=torch.float64)
    whole = (w64 @ cross + lam * w64) @ torch.linalg.inv(h)
    for chunk in (5, 23, 512):  # chunks that split the rows unevenly, exactly, and not at all
        monkeypatch.setattr(compensate, "LINE_CHUNK", chunk)
        monkeypatch.setattr(fz, "LINE_CHUNK", chunk)
        for got in (compensated_target(weight, cross, q, inv, lam), compensated_target(weight, None, q, inv, lam, wc=w64 @ cross)):
            assert got.dtype == torch.float64 and got.shape == w.shape
            assert torch.allclose(got, whole, rtol=0, atol=1e-12 * float(whole.abs().max()))


@pytest.mark.parametrize("deficient", [False, True])
def test_the_cholesky_route_of_an_anchored_job_gives_the_eigendecompositions_factors_and_error(deficient, monkeypatch):
    """Anchored (lam > 0): H = G' + lam I is factored by Cholesky, not eigh (about 10x less work), and the target,
    the factors and the reported error are the eigendecomposition's to round-off, dead input channels included."""
    from streamsvd.math import compensate

    x, x_comp, w = _problem(seed=4, n=40, m=30, deficient=deficient)
    gram, cross, e0 = _stats(x, x_comp, w)
    white, q, inv, lam = compensated_whitening(gram, 0.1)
    assert inv is None and torch.equal(white.s, q) and torch.allclose(q @ q.T, gram + lam * torch.eye(40, dtype=torch.float64))
    monkeypatch.setattr(compensate, "_cholesky_exact", lambda *a: None)
    white_e, q_e, inv_e, lam_e = compensated_whitening(gram, 0.1)
    assert inv_e is not None and lam_e == lam
    target, target_e = compensated_target(w, cross, q, inv, lam), compensated_target(w, cross, q_e, inv_e, lam)
    assert torch.allclose(target, target_e, rtol=0, atol=1e-10 * float(target_e.abs().max()))
    for rank in (5, 17):
        f = factorize_compensated(w, white, q, inv, lam, cross, rank)
        f_e = factorize_compensated(w, white_e, q_e, inv_e, lam, cross, rank)
        new, new_e = f.out_factor @ f.in_factor, f_e.out_factor @ f_e.in_factor
        assert torch.allclose(new, new_e, rtol=0, atol=1e-9 * float(new_e.abs().max()))
        assert torch.allclose(f.spectrum, f_e.spectrum, rtol=1e-9, atol=1e-12 * float(f_e.spectrum[0]))
        err = output_error(w, (f.out_factor, f.in_factor), e0, cross, gram)
        assert err == pytest.approx(output_error(w, (f_e.out_factor, f_e.in_factor), e0, cross, gram), rel=1e-8)


def test_anchor_zero_or_too_small_for_the_cutoff_keeps_the_pseudo_inverse():
    """Without an anchor H may be singular, and an anchor below the pseudo-inverse's cutoff could leave directions
    the eigendecomposition drops: both keep eigh (its pseudo-inverse), never a Cholesky factor."""
    x, x_comp, w = _problem(seed=5, n=20, m=10, deficient=True)
    gram, _, _ = _stats(x, x_comp, w)
    assert compensated_whitening(gram, 0.0)[2] is not None
    assert compensated_whitening(gram, 1e-9, product_eps=torch.finfo(torch.float32).eps)[2] is not None
    assert compensated_whitening(gram, 0.1, product_eps=torch.finfo(torch.float32).eps)[2] is None

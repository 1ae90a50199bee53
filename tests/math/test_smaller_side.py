"""The smaller side: eig's factors from the out x out output Gram W G W^T equal those from the in x in side."""

import pytest
import torch

from factor_problems import activation_loss, activation_problem
from streamsvd.math.factorize import factorize, factorize_output_side
from streamsvd.math.gram import GramAccumulator, OutputGramAccumulator


def _problem(tokens=500, m=40, n=96, seed=0):
    return activation_problem(tokens, m, n, seed)


_loss = activation_loss


@pytest.mark.parametrize("rank", [1, 9, 30])
@pytest.mark.parametrize("tokens", [500, 30])  # 30 tokens: a singular in x in Gram
def test_both_sides_give_the_same_factors_and_loss(rank, tokens):
    w, x = _problem(tokens=tokens)
    g = x.T @ x
    inside = factorize(w, g, rank, "eig")
    outside = factorize(w, g, rank, "eig", side="output")
    # Same columns up to sign, same product, same spectrum and loss, to round-off.
    signs = torch.sign((inside.out_factor * outside.out_factor).sum(0))
    torch.testing.assert_close(outside.out_factor * signs, inside.out_factor, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(outside.out_factor @ outside.in_factor, inside.out_factor @ inside.in_factor, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(outside.spectrum, inside.spectrum, rtol=1e-7, atol=1e-6 * float(inside.spectrum[0]))
    assert outside.truncation_loss() == pytest.approx(inside.truncation_loss(), rel=1e-7, abs=1e-6 * float(inside.spectrum[0]))  # squared route: sqrt(eps) s_max
    assert _loss(w, outside, x) == pytest.approx(outside.truncation_loss(), rel=1e-6, abs=1e-6 * float(inside.spectrum[0]))


def test_output_gram_accumulator_is_w_g_wt_without_the_input_gram():
    w, x = _problem()
    acc = OutputGramAccumulator(w)  # float64 inputs: float64 products, exact to round-off
    for chunk in x.split(77):
        acc.add_batch(chunk)
    inputs = GramAccumulator(w.shape[1])
    inputs.add_batch(x)
    torch.testing.assert_close(acc.gram, w @ inputs.gram @ w.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(acc.input_diag_sum / acc.tokens, torch.diag(inputs.gram), rtol=1e-10, atol=1e-10)
    # out x out, not in x in, plus the in-long diagonal --shrink reads
    assert acc.nbytes() == 8 * w.shape[0] ** 2 + 8 * w.shape[1]
    assert acc.nbytes() < 8 * w.shape[1] ** 2


def test_float32_inputs_give_the_output_gram_to_float32_round_off():
    w, x = _problem()
    exact = OutputGramAccumulator(w)
    exact.add_batch(x)
    acc = OutputGramAccumulator(w.float())
    for chunk in x.float().split(77):
        acc.add_batch(chunk)
    scale = float(exact.gram.abs().max())
    error = float((acc.gram - exact.gram).abs().max()) / scale
    assert 0 < error < 1e-5  # float32 products (not float64), within float32's round-off of the largest entry
    torch.testing.assert_close(acc.input_diag_sum, exact.input_diag_sum, rtol=1e-5, atol=0)


def test_output_side_factors_from_the_accumulated_outputs_match_the_input_side():
    w, x = _problem()
    acc = OutputGramAccumulator(w)
    acc.add_batch(x)
    f = factorize_output_side(w, acc.gram, 12)
    ref = factorize(w, x.T @ x / x.shape[0], 12, "eig")
    torch.testing.assert_close(f.out_factor @ f.in_factor, ref.out_factor @ ref.in_factor, rtol=1e-7, atol=1e-8)


def test_output_side_refuses_what_it_cannot_do():
    w, x = _problem()
    with pytest.raises(ValueError):
        factorize(w, x.T @ x, 5, "cholesky", side="output")
    with pytest.raises(ValueError):
        factorize_output_side(w, torch.eye(3, dtype=torch.float64), 5)


@pytest.mark.parametrize("rank", [1, 9, 30, 40])
@pytest.mark.parametrize("tokens", [500, 30])  # 30 tokens: ranks past 30 keep singular values of zero
def test_a_tall_weight_from_the_small_gram_equals_the_svd_of_the_whitened_weight(rank, tokens):
    from streamsvd.math.factorize import TALL_MIN_RATIO, whiten

    w, x = _problem(tokens=tokens, m=96, n=40)  # out > in: gate_proj's shape, factored from the 40 x 40 A^T A
    white = whiten(x.T @ x, "eig")
    u, s, _ = torch.linalg.svd(w @ white.s, full_matrices=False)
    got = factorize(w, white, rank, "eig")
    sure = int((s[:rank] > TALL_MIN_RATIO * s[0]).sum())  # kept singular values that are not (numerically) zero
    assert sure >= min(rank, 9)
    if sure == rank:  # the reference: W' = U_k U_k^T W from the SVD of W S (past the input's rank both are arbitrary)
        torch.testing.assert_close(got.out_factor @ got.in_factor, u[:, :rank] @ u[:, :rank].T @ w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.spectrum, s, rtol=1e-7, atol=1e-6 * float(s[0]))
    assert got.truncation_loss() == pytest.approx(float(s[rank:].pow(2).sum().sqrt()), rel=1e-7, abs=1e-6 * float(s[0]))
    assert _loss(w, got, x) == pytest.approx(got.truncation_loss(), rel=1e-6, abs=1e-6 * float(s[0]))
    # orthonormal columns, the singular vectors in order wherever they are well determined
    torch.testing.assert_close(got.out_factor.T @ got.out_factor, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-8)
    signs = torch.sign((got.out_factor[:, :sure] * u[:, :sure]).sum(0))
    torch.testing.assert_close(got.out_factor[:, :sure] * signs, u[:, :sure], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 40), (24, 40)])  # square (q_proj, o_proj) and wide (k/v of grouped attention)
@pytest.mark.parametrize("rank", [1, 9, 24])
@pytest.mark.parametrize("tokens", [500, 12])  # 12 tokens: ranks past 12 keep singular values of zero
def test_a_square_or_wide_weight_from_the_out_by_out_product_equals_the_svd_of_the_whitened_weight(
        shape, rank, tokens, monkeypatch):
    """eig takes U_k from eigh(A A^T) (math/factorize._wide_eig) instead of gesdd: the same W' = U_k U_k^T W, spectrum
    and loss to round-off, orthonormal factors, and the loss it reports is the loss it gives on the inputs."""
    from streamsvd.math.factorize import whiten

    m, n = shape
    w, x = _problem(tokens=tokens, m=m, n=n)
    white = whiten(x.T @ x, "eig")
    u, s, _ = torch.linalg.svd(w @ white.s, full_matrices=False)

    def no_gesdd(*args, **kwargs):
        raise AssertionError("eig ran an SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_gesdd)
    got = factorize(w, white, rank, "eig")
    scale = float(s[0])
    if int((s[:rank] > 1e-6 * scale).sum()) == rank:  # past the input's rank any basis of the null part does
        torch.testing.assert_close(got.out_factor @ got.in_factor, u[:, :rank] @ u[:, :rank].T @ w, rtol=1e-6,
                                   atol=1e-7 * scale)
    assert got.spectrum.shape == s.shape
    torch.testing.assert_close(got.spectrum, s, rtol=1e-6, atol=1e-6 * scale)
    assert got.truncation_loss() == pytest.approx(float(s[rank:].pow(2).sum().sqrt()), rel=1e-6, abs=1e-6 * scale)
    assert _loss(w, got, x) == pytest.approx(got.truncation_loss(), rel=1e-6, abs=1e-6 * scale)
    torch.testing.assert_close(got.out_factor.T @ got.out_factor, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(70, 24), (24, 24), (20, 44)])  # tall, square, wide: A^T A, A A^T, A A^T
@pytest.mark.parametrize("chunk", [7, 512])
def test_eig_routes_read_the_weight_a_row_chunk_at_a_time_and_match_the_svd_of_w_s(monkeypatch, shape, chunk):
    """eig's exact routes never convert W whole to float64 (math/factorize.LINE_CHUNK rows at a time): a 16-bit
    weight gives the factors its float64 copy gives through gesdd of W S, whatever the chunk size."""
    import streamsvd.math.factorize as fz

    monkeypatch.setattr(fz, "LINE_CHUNK", chunk)
    m, n = shape
    g = torch.Generator().manual_seed(m * n)
    w16 = (torch.randn(m, n, generator=g) * torch.logspace(0, -2, n)).to(torch.bfloat16)
    x = torch.randn(300, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1, n, dtype=torch.float64)
    gram = x.T @ x
    w = w16.to(torch.float64)
    white = fz.whiten(gram, "eig")
    u, s, _ = torch.linalg.svd(w @ white.s, full_matrices=False)
    rank = 9
    f = factorize(w16, white, rank, "eig")
    assert f.out_factor.dtype == torch.float64 and f.in_factor.dtype == torch.float64
    reference = u[:, :rank] @ (u[:, :rank].T @ w)
    torch.testing.assert_close(f.out_factor @ f.in_factor, reference, rtol=1e-8, atol=1e-10 * float(w.abs().max()))
    torch.testing.assert_close(f.spectrum[: min(m, n)], s, rtol=1e-6, atol=1e-7 * float(s[0]))
    outside = factorize_output_side(w16, w @ gram @ w.T, rank)
    torch.testing.assert_close(outside.out_factor @ outside.in_factor, reference, rtol=1e-7, atol=1e-9 * float(w.abs().max()))

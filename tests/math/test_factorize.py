"""The factorisation math: measured activation loss equals the truncated spectrum, methods agree."""

import pytest
import torch

from factor_problems import activation_loss, activation_problem
from streamsvd.math.factorize import factorize, rank_for_ratio
from streamsvd.math.gram import GramAccumulator


def _problem(tokens=400, m=48, n=80, seed=0):
    return activation_problem(tokens, m, n, seed)


_loss = activation_loss


@pytest.mark.parametrize("method", ["eig", "cholesky"])
@pytest.mark.parametrize("rank", [1, 7, 30])
def test_measured_loss_is_root_of_truncated_squared_singular_values(method, rank):
    w, x = _problem()
    f = factorize(w, x.T @ x, rank, method)
    assert f.rank == rank
    assert f.out_factor.shape == (48, rank) and f.in_factor.shape == (rank, 80)
    predicted = float(f.spectrum[rank:].pow(2).sum().sqrt())
    assert _loss(w, f, x) == pytest.approx(predicted, rel=1e-8)
    assert f.truncation_loss() == pytest.approx(predicted)


def test_eig_and_cholesky_give_the_same_matrix_when_the_gram_is_positive_definite():
    w, x = _problem()
    a = factorize(w, x.T @ x, 12, "eig")
    b = factorize(w, x.T @ x, 12, "cholesky")
    assert b.shift == 0.0
    torch.testing.assert_close(a.spectrum, b.spectrum, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.out_factor @ a.in_factor, b.out_factor @ b.in_factor, rtol=1e-7, atol=1e-8)


def test_whitening_beats_plain_svd_on_activations():
    w, x = _problem()
    whitened = _loss(w, factorize(w, x.T @ x, 10, "eig"), x)
    plain = _loss(w, factorize(w, None, 10, "svd"), x)
    assert whitened < 0.9 * plain


def test_eig_is_exact_on_a_singular_gram_where_cholesky_needs_a_shift():
    w, x = _problem(tokens=20)  # 20 tokens, 80 features: Gram of rank 20
    gram = x.T @ x
    eig = factorize(w, gram, 10, "eig")
    assert _loss(w, eig, x) == pytest.approx(eig.truncation_loss(), rel=1e-6)
    chol = factorize(w, gram, 10, "cholesky")
    assert chol.shift > 0
    assert torch.isfinite(chol.in_factor).all()
    # The shifted Cholesky optimum is close to, but cannot beat, the exact one.
    assert _loss(w, chol, x) >= _loss(w, eig, x) * (1 - 1e-9)


def test_rank_for_ratio_removes_the_requested_fraction():
    assert rank_for_ratio(576, 576, 0.4) == int(576 * 576 * 0.6 // 1152)
    for m, n, r in [(576, 1536, 0.2), (4096, 11008, 0.6), (64, 160, 0.4)]:
        k = rank_for_ratio(m, n, r)
        assert k * (m + n) <= m * n * (1 - r) < (k + 1) * (m + n)
    assert rank_for_ratio(8, 8, 0.999) == 1


def test_gram_accumulator_matches_direct_product_in_chunks():
    x = torch.randn(3, 1500, 24)
    acc = GramAccumulator(24)
    acc.add_batch(x[:2])
    acc.add_batch(x[2:])
    flat = x.reshape(-1, 24).double()
    torch.testing.assert_close(acc.gram, flat.T @ flat / flat.shape[0])
    assert acc.tokens == 4500

"""--shrink: the input Gram pulled toward its diagonal, the same on the input and the output side."""

import torch

from streamsvd.math.factorize import factorize, factorize_output_side
from streamsvd.math.gram import GramAccumulator, OutputGramAccumulator, shrink_gram, shrunk_output_gram


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    mix = torch.randn(10, 10, generator=g, dtype=torch.float64)
    x = torch.randn(400, 10, generator=g, dtype=torch.float64) @ mix * torch.arange(1, 11, dtype=torch.float64)
    return w, x


def test_shrink_is_a_convex_pull_toward_the_diagonal():
    _, x = _data()
    acc = GramAccumulator(10)
    acc.add_batch(x)
    g = acc.gram
    half = shrink_gram(acc.gram, 0.5)
    assert torch.allclose(half.diagonal(), g.diagonal())
    off = ~torch.eye(10, dtype=torch.bool)
    assert torch.allclose(half[off], 0.5 * g[off])
    assert shrink_gram(acc.gram, 0.0).equal(g)
    assert torch.allclose(shrink_gram(acc.gram, 1.0 - 1e-12), torch.diag(g.diagonal()), atol=1e-6)


def test_the_output_side_shrinks_exactly_as_the_input_side_would():
    w, x = _data(1)
    acc, out = GramAccumulator(10), OutputGramAccumulator(w)
    acc.add_batch(x)
    out.add_batch(x)
    for a in (0.0, 0.3, 0.9):
        g = shrink_gram(acc.gram, a)
        assert torch.allclose(shrunk_output_gram(out, a), w @ g @ w.T, rtol=1e-10, atol=1e-8)
        inp = factorize(w, g, 3, "eig")
        outp = factorize_output_side(w, shrunk_output_gram(out, a), 3)
        assert torch.allclose(inp.out_factor @ inp.in_factor, outp.out_factor @ outp.in_factor, atol=1e-8)


def test_shrinking_changes_the_factors_it_is_not_a_no_op():
    w, x = _data(2)
    acc = GramAccumulator(10)
    acc.add_batch(x)
    plain = factorize(w, acc.gram, 3, "eig")
    shrunk = factorize(w, shrink_gram(acc.gram, 0.3), 3, "eig")
    assert not torch.allclose(plain.out_factor @ plain.in_factor, shrunk.out_factor @ shrunk.in_factor, atol=1e-4)

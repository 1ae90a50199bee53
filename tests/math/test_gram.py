"""The statistics' accumulation: upper-triangle tiles, mirroring, per-chunk precision (math/gram.py)."""

import pytest
import torch

import streamsvd.math.gram as gram_module
from streamsvd.math.compensate import CrossGramAccumulator
from streamsvd.math.gram import GramAccumulator, add_products, mirror


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few columns and chunks of a few rows, so that every edge of the tiling is crossed."""
    monkeypatch.setattr(gram_module, "_TILE_BYTES", 4 * 23 * 7)  # ~7 columns of 23 rows
    monkeypatch.setattr(gram_module, "_SPLIT_FROM", 8)
    monkeypatch.setattr(gram_module, "_ROW_CHUNK", 50)


def _x(tokens=333, features=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, features, generator=g, dtype=torch.float64) @ torch.randn(features, features, generator=g,
                                                                                            dtype=torch.float64)


def test_the_tiles_cover_every_column_once(small_tiles):
    for features in (1, 7, 8, 23, 64):
        tiles = gram_module._tiles(features, features, symmetric=True)
        assert tiles[0][0] == 0 and tiles[-1][1] == features
        assert all(a[1] == b[0] for a, b in zip(tiles, tiles[1:]))
        assert len(tiles) >= (gram_module._MIN_TILES if features >= 8 else 1)


def test_upper_tiles_mirrored_give_the_full_gram(small_tiles):
    x = _x()
    acc = GramAccumulator(x.shape[1])
    for chunk in x.split(40):
        acc.add_batch(chunk)
    assert torch.count_nonzero(torch.tril(acc.sum, -8)) == 0  # below the diagonal blocks nothing was multiplied
    torch.testing.assert_close(acc.gram, x.T @ x / x.shape[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(acc.gram, acc.gram.T)


def test_batches_added_after_a_read_still_sum_exactly(small_tiles):
    x = _x()
    acc = GramAccumulator(x.shape[1])
    acc.add_batch(x[:100])
    first = acc.gram
    torch.testing.assert_close(first, x[:100].T @ x[:100] / 100, rtol=1e-12, atol=1e-12)
    acc.add_batch(x[100:])  # the mirrored lower part is stale now: the next read mirrors again
    torch.testing.assert_close(acc.gram, x.T @ x / x.shape[0], rtol=1e-12, atol=1e-12)


def test_cross_products_use_every_tile(small_tiles):
    a, b = _x(seed=1), _x(seed=2)
    acc = CrossGramAccumulator(a.shape[1])
    acc.add_pair(a, b)
    torch.testing.assert_close(acc.gram, a.T @ b / a.shape[0], rtol=1e-12, atol=1e-12)


def test_float32_and_bfloat16_inputs_are_multiplied_in_float32_into_a_float64_sum(small_tiles):
    x = _x()
    for dtype in (torch.float32, torch.bfloat16):
        xs = x.to(dtype)
        total = torch.zeros(23, 23, dtype=torch.float64)
        add_products(total, xs)
        mirror(total)
        assert total.dtype == torch.float64
        exact = xs.double().T @ xs.double()  # the same (rounded) inputs, multiplied in float64
        error = float((total - exact).abs().max() / exact.abs().max())
        assert error < 1e-6  # float32 products of 50-row chunks
    assert gram_module.product_dtype(x) == torch.float64 and gram_module.product_dtype(x.float()) == torch.float32


def _per_tile_sum(total, a, b=None):
    """What add_products adds, written out: a fresh product per chunk and tile, added into the float64 sum."""
    symmetric = b is None
    for start in range(0, a.shape[0], gram_module._ROW_CHUNK):
        left = a[start : start + gram_module._ROW_CHUNK]
        right = left if symmetric else b[start : start + gram_module._ROW_CHUNK]
        for lo, hi in gram_module._tiles(total.shape[1], total.shape[0], symmetric):
            rows = hi if symmetric else total.shape[0]
            total[:rows, lo:hi] += left[:, :rows].T @ right[:, lo:hi]


def test_products_made_in_one_scratch_give_the_fresh_products_sums_bit_for_bit(small_tiles):
    """The scratch (product_space) changes where each product is made, not a bit of any sum, for every
    accumulator that multiplies through it: input, cross, output and projected cross statistics."""
    from streamsvd.math.compensate import ProjectedCrossAccumulator
    from streamsvd.math.gram import OutputGramAccumulator

    x, y = _x(seed=3).float(), _x(seed=4).float()
    w = torch.randn(9, 23, generator=torch.Generator().manual_seed(5))

    acc, expected = GramAccumulator(23), torch.zeros(23, 23, dtype=torch.float64)
    for part in x.split(120):  # a batch at a time, as the hooks add them; the last chunk of each is short
        acc.add_batch(part)
        _per_tile_sum(expected, part)
    assert torch.equal(acc.sum, expected)

    cross, expected = CrossGramAccumulator(23), torch.zeros(23, 23, dtype=torch.float64)
    cross.add_pair(x, y)
    _per_tile_sum(expected, x, y)
    assert torch.equal(cross.sum, expected)

    out, expected = OutputGramAccumulator(w), torch.zeros(9, 9, dtype=torch.float64)
    diag = torch.zeros(23, dtype=torch.float64)
    out.add_batch(x)
    for chunk in x.split(gram_module._ROW_CHUNK):
        _per_tile_sum(expected, chunk @ w.T)
        diag += torch.sum(chunk * chunk, 0, dtype=torch.float64)
    assert torch.equal(out.sum, expected) and torch.equal(out.input_diag_sum, diag)

    projected, expected = ProjectedCrossAccumulator(w), torch.zeros(9, 23, dtype=torch.float64)
    projected.add_pair(x, y)
    for start in range(0, x.shape[0], gram_module._ROW_CHUNK):
        stop = start + gram_module._ROW_CHUNK
        _per_tile_sum(expected, x[start:stop] @ w.T, y[start:stop])
    assert torch.equal(projected.sum, expected)

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

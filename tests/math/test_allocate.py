"""Rank allocation: every allocator meets the global budget, tightly, and behaves at its corners."""

import math

import numpy as np
import pytest

from streamsvd.errors import StreamSVDError
from streamsvd.math.allocate import (
    Matrix,
    allocate,
    budget_numel,
    global_greedy,
    max_loss,
    next_rank,
    relative_loss,
    step_cost,
    total_numel,
    uniform,
    v2,
    v2_ratios,
)
from streamsvd.math.factorize import rank_for_ratio

SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
          "self_attn.o_proj": (64, 64), "mlp.gate_proj": (160, 64), "mlp.up_proj": (160, 64), "mlp.down_proj": (64, 160)}


def _model(layers=3, seed=0, weights=False):
    """Matrices of a tiny llama's shapes with spectra that decay at different speeds."""
    rng = np.random.default_rng(seed)
    mats = []
    for i in range(layers):
        for name, (m, n) in SHAPES.items():
            k = min(m, n)
            s = np.sort(rng.lognormal(0, 1, k) * np.exp(-np.arange(k) * rng.uniform(0.01, 0.2)))[::-1]
            mats.append(Matrix(f"model.layers.{i}.{name}", m, n, s, float(rng.uniform(0.1, 10)) if weights else 1.0))
    return mats


def _leftover_is_below_every_next_step(mats, ranks, budget, multiple=1):
    left = budget - total_numel(mats, ranks)
    assert left >= 0
    steps = [step_cost(a, ranks[a.name], multiple) for a in mats if ranks[a.name] < a.full]
    assert all(left < c for c in steps), (left, min(steps))


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
@pytest.mark.parametrize("method", ["v2", "global"])
def test_budget_met_to_within_one_rank_step(method, ratio):
    mats = _model(weights=True)
    ranks = allocate(method, mats, ratio)
    budget = budget_numel(mats, ratio)
    _leftover_is_below_every_next_step(mats, ranks, budget)
    smallest = min(mats, key=lambda a: a.m * a.n)
    assert budget - total_numel(mats, ranks) < smallest.m + smallest.n


def test_uniform_is_rank_for_ratio_and_within_budget():
    mats = _model()
    ranks = uniform(mats, 0.4)
    assert ranks == {a.name: rank_for_ratio(a.m, a.n, 0.4, "pivoted") for a in mats}
    assert total_numel(mats, ranks) <= budget_numel(mats, 0.4)


def test_global_follows_the_spectra_and_the_weights():
    flat = Matrix("a.q_proj", 64, 64, np.ones(64))  # every rank removes as much loss: needs rank
    steep = Matrix("b.q_proj", 64, 64, np.exp(-np.arange(64.0)))  # a few ranks hold all the energy
    ranks = global_greedy([flat, steep], 0.5)
    assert ranks["a.q_proj"] > ranks["b.q_proj"]
    heavy = [Matrix("a.q_proj", 64, 64, np.ones(64), 1.0), Matrix("b.q_proj", 64, 64, np.ones(64), 100.0)]
    ranks = global_greedy(heavy, 0.3)
    assert ranks["b.q_proj"] == 64 and ranks["a.q_proj"] < 32


def test_weighted_energies_replace_weight_times_spectrum():
    """Matrix.weighted (per direction, token-weighted) is the loss the greedy ranks by; weight x s^2 gives the old ranks."""
    mats = _model(weights=True)
    same = [Matrix(a.name, a.m, a.n, a.spectrum, a.weight, a.weight * a.spectrum**2) for a in mats]
    assert global_greedy(same, 0.4) == global_greedy(mats, 0.4)
    assert max_loss(same, 0.1) == max_loss(mats, 0.1)
    a, b = same[0], same[1]
    assert a.loss(3) == pytest.approx(a.weight * a.tail(3)) and a.loss(a.full) == 0.0
    # The same scalar weight, but b's tokens that carry its energy are where the model is sensitive: b keeps its rank.
    flat = [Matrix("a.q_proj", 64, 64, np.ones(64), 1.0, np.ones(64)), Matrix("b.q_proj", 64, 64, np.ones(64), 1.0, 100 * np.ones(64))]
    ranks = global_greedy(flat, 0.3)
    assert ranks["b.q_proj"] == 64 and ranks["a.q_proj"] < 32
    with pytest.raises(ValueError, match="weighted energies"):
        Matrix("c.q_proj", 64, 64, np.ones(64), 1.0, np.ones(3)).loss(0)


@pytest.mark.parametrize("multiple", [1, 8])
def test_global_ranks_do_not_depend_on_the_number_of_calibration_tokens(multiple):
    """A Gram summed over T tokens instead of averaged scales every s by sqrt(T): same ranks once normalised."""
    mats = _model(weights=True)
    ranks = global_greedy(mats, 0.4, multiple=multiple)
    for tokens in (10, 1000, 10**6):
        scaled = [Matrix(a.name, a.m, a.n, a.spectrum * math.sqrt(tokens), a.weight) for a in mats]
        assert global_greedy(scaled, 0.4, multiple=multiple, tokens=tokens) == ranks
    # A common factor on every weight (the gradients of a summed instead of averaged loss) changes nothing either.
    heavier = [Matrix(a.name, a.m, a.n, a.spectrum, a.weight * 1e6) for a in mats]
    assert global_greedy(heavier, 0.4, multiple=multiple) == ranks
    assert max_loss(heavier, 0.1) == max_loss(mats, 0.1)


def test_v2_is_not_scale_invariant_as_published():
    """The published formula takes log of the un-normalised loss: more tokens, other ranks (the issue's caution)."""
    mats = _model()
    assert v2_ratios(mats, 0.4, tokens=10) != pytest.approx(v2_ratios(mats, 0.4, tokens=10**8))


def test_v2_ratios_are_proportional_to_inverse_log_loss_within_a_group():
    mats = _model(layers=4)
    ratios = v2_ratios(mats, 0.4, tokens=10**4)
    group = [a for a in mats if a.name.endswith("up_proj")]
    logs = [math.log(math.sqrt(10**4 * a.tail(rank_for_ratio(a.m, a.n, 0.4, "pivoted")))) for a in group]
    assert all(x > 0 for x in logs)
    products = [ratios[a.name] * lg for a, lg in zip(group, logs)]
    assert products == pytest.approx([products[0]] * len(products))
    assert np.mean([ratios[a.name] for a in group]) == pytest.approx(0.4)


def test_v2_corner_cases_loss_below_one_and_clipped_ratios():
    # One matrix with almost no loss (L <= 1: log <= 0) and one with a zero spectrum tail.
    tiny = Matrix("l0.o_proj", 64, 64, np.full(64, 1e-4))
    zero = Matrix("l1.o_proj", 64, 64, np.concatenate([np.ones(4), np.zeros(60)]))
    normal = [Matrix(f"l{i}.o_proj", 64, 64, np.linspace(10, 1, 64)) for i in range(2, 6)]
    mats = [tiny, zero] + normal
    ratios = v2_ratios(mats, 0.4, tokens=100)
    hi = 1 - (64 + 64 - 1) / 64**2  # the ratio of rank 1
    assert ratios["l0.o_proj"] == pytest.approx(hi) and ratios["l1.o_proj"] == pytest.approx(hi)
    assert all(0 < ratios[a.name] < hi for a in normal)
    assert sum(ratios.values()) / len(mats) == pytest.approx(0.4)  # the clipped share went to the others
    ranks = v2(mats, 0.4, tokens=100)
    assert ranks["l0.o_proj"] == 1 and ranks["l1.o_proj"] >= 1
    _leftover_is_below_every_next_step(mats, ranks, budget_numel(mats, 0.4))


def test_v2_refuses_a_ratio_no_ranks_can_meet():
    with pytest.raises(StreamSVDError):
        v2(_model(layers=1), 0.999)


@pytest.mark.parametrize("method", ["uniform", "v2", "global"])
@pytest.mark.parametrize("multiple", [8, 16])
def test_rank_multiples_under_the_budget(method, multiple):
    mats = _model(weights=True)
    ranks = allocate(method, mats, 0.4, multiple=multiple)
    assert all(r % multiple == 0 or r == a.full for a, r in zip(mats, ranks.values()))
    _leftover_is_below_every_next_step(mats, ranks, budget_numel(mats, 0.4), multiple)


def test_a_multiple_too_large_for_the_budget_is_refused():
    with pytest.raises(StreamSVDError, match="rank-multiple"):
        global_greedy(_model(), 0.9, multiple=32)
    with pytest.raises(StreamSVDError):
        global_greedy(_model(), 0.4, multiple=0)


def test_max_loss_is_monotone_and_meets_its_target():
    mats = _model(weights=True)
    sizes = []
    for target in (0.5, 0.2, 0.05, 0.01, 0.0):
        ranks = max_loss(mats, target)
        assert relative_loss(mats, ranks) <= target + 1e-9
        sizes.append(total_numel(mats, ranks))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert sizes[-1] == sum(a.m * a.n for a in mats)  # no loss at all: every matrix whole
    with pytest.raises(StreamSVDError, match="max-loss"):
        max_loss(mats, 1.5)


def test_a_matrix_can_be_left_whole_and_is_counted_dense():
    flat = Matrix("a.q_proj", 64, 64, np.ones(64), 1000.0)  # costly to truncate anywhere
    cheap = [Matrix(f"b{i}.q_proj", 64, 64, np.exp(-np.arange(64.0))) for i in range(5)]
    mats = [flat] + cheap
    ranks = global_greedy(mats, 0.4)
    assert ranks["a.q_proj"] == 64
    assert total_numel(mats, {"a.q_proj": 64, **{a.name: 1 for a in cheap}}) == 64 * 64 + 5 * 127
    assert next_rank(flat, 63) == 64 and step_cost(flat, 63) == 1  # pivoted: 63 * 65 = 64^2 - 1


def test_plain_factors_jump_to_dense_where_factoring_stops_paying():
    a = Matrix("x.q_proj", 64, 64, np.linspace(2, 1, 64))
    # plain: r (m + n) >= m n from r = 32, so the step from 31 goes straight to full rank
    assert next_rank(a, 31, factors="plain") == 64
    assert step_cost(a, 31, factors="plain") == 64 * 64 - 31 * 128
    ranks = global_greedy([a, Matrix("y.q_proj", 64, 64, np.linspace(2, 1, 64))], 0.3, factors="plain")
    assert all(r <= 31 or r == 64 for r in ranks.values())


def test_unknown_allocator_and_bad_spectrum_are_refused():
    with pytest.raises(StreamSVDError, match="alloc"):
        allocate("best", _model(), 0.4)
    with pytest.raises(ValueError, match="spectrum"):
        global_greedy([Matrix("a.q_proj", 8, 8, np.ones(3))], 0.4)


def test_max_ppl_increase_is_the_first_model_on_the_global_path_within_the_predicted_target():
    from streamsvd.math.allocate import max_ppl_increase, predicted_nll_increase

    mats = _model(weights=True)
    scale = 2.0 / sum(a.weight * a.tail(0) for a in mats)  # weights scaled so that dropping everything predicts +1.0 nat
    mats = [Matrix(a.name, a.m, a.n, a.spectrum, a.weight * scale) for a in mats]
    sizes = []
    for f in (0.01, 0.1, 0.5):
        ranks = max_ppl_increase(mats, f, seqlen=64)
        assert predicted_nll_increase(mats, ranks, 64) <= math.log1p(f) + 1e-12
        # The same path as --max-loss: the model max_loss picks for the same weighted loss.
        assert ranks == max_loss(mats, relative_loss(mats, ranks) * (1 + 1e-12))
        sizes.append(total_numel(mats, ranks))
        both = max_ppl_increase(mats, f, seqlen=64, max_relative_loss=0.05)
        assert relative_loss(mats, both) <= 0.05 and predicted_nll_increase(mats, both, 64) <= math.log1p(f) + 1e-12
    assert sizes[0] > sizes[1] > sizes[2]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(StreamSVDError, match="max-ppl-increase"):
            max_ppl_increase(mats, bad, seqlen=64)


@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("floor", [0.25, 0.5, 1.0])
def test_alloc_floor_keeps_every_matrix_above_its_share_of_uniform_and_meets_the_budget(floor, multiple):
    mats = _model(weights=True)
    free = global_greedy(mats, 0.6, multiple=multiple)
    ranks = global_greedy(mats, 0.6, multiple=multiple, floor=floor)
    assert ranks == allocate("global", mats, 0.6, multiple=multiple, floor=floor)
    low = {a.name: max(multiple, int(floor * rank_for_ratio(a.m, a.n, 0.6, "pivoted")) // multiple * multiple) for a in mats}
    assert all(ranks[a.name] >= low[a.name] for a in mats)
    if floor >= 0.5 and multiple == 1:  # without a floor the weighted greedy starves some matrix below it: the floor changed something
        assert any(free[a.name] < low[a.name] for a in mats)
    if multiple == 1:
        _leftover_is_below_every_next_step(mats, ranks, budget_numel(mats, 0.6))
    else:
        assert total_numel(mats, ranks) <= budget_numel(mats, 0.6)
    # The greedy optimum without a floor has the least loss; the floor costs some of it.
    assert relative_loss(mats, free) <= relative_loss(mats, ranks)


@pytest.mark.parametrize("floor", [-0.1, 1.5, float("nan")])
def test_alloc_floor_out_of_range_is_refused(floor):
    with pytest.raises(StreamSVDError, match="--alloc-floor"):
        global_greedy(_model(), 0.4, floor=floor)

"""Rank allocation: one parameter budget over all matrices, shared out by their spectra.

Input per matrix: its shape m x n, its whitened spectrum s (the singular values of W S, descending,
from the mean Gram: the truncation loss at rank r is sum(s[r:]^2), the mean squared output error per
calibration token), an optional sensitivity weight w (the mean squared gradient of the LM loss at
the matrix's output; 1 without one) and optionally its weighted energies d (`Matrix.weighted`, one per
direction of s: d_j = E_t[w_t a_tj^2], a_tj the output's component along the j-th direction at token t
and w_t that token's own mean squared gradient). The sensitivity-weighted loss at rank r (`Matrix.loss`)
is sum(d[r:]), or w sum(s[r:]^2) without d; the two agree when a token's gradient is unrelated to how
much energy it carries. They do not on Gemma 3: its down_proj, behind a norm, carries most energy on
tokens whose gradient is small, and w sum(s^2) over-predicted its cost 40x (docs/RESULTS.md).
Output: a rank per matrix. Storage is counted by
math/factorize.stored_numel (pivoted: r (m + n - r) numbers; a matrix at full rank is stored dense
and costs m n exactly), and every allocator except `uniform` spends the global budget

    sum stored_numel(m, n, r) <= (1 - ratio) sum m n

to within one rank step: the budget left over is smaller than the next step of every matrix not at
full rank (`uniform`, today's per-matrix rank_for_ratio, leaves less than one step per matrix).

- `uniform`: rank_for_ratio per matrix.
- `v2`: SVD-LLM V2 (arXiv 2503.12340) as published: matrices grouped by type (the module name's
  last part: q_proj, k_proj, ..., down_proj); in a group, L_i is the theoretical truncation loss
  ||W X - W' X||_F at the group's uniform ratio over all calibration tokens (un-normalised, as in the
  paper: sqrt(tokens sum(s[r:]^2))), and ratio_i = c / log(L_i) with c set so the group removes its
  share. Corner cases: a loss <= 1 has log <= 0 (a negative or infinite ratio): its log is raised to
  LOG_FLOOR, which gives it the largest ratio the group allows. Ratios are clipped to [0, the ratio of
  rank 1] and what the clipped ones could not take is redistributed over the others (water-filling,
  repeated until nothing more clips). The per-matrix rounding down to whole ranks leaves budget over;
  it is spent by the `global` greedy step below (unweighted), so v2 meets the same tightness.
- `global`: greedy over all matrices by (weighted loss reduction) / (marginal parameter cost), with
  a heap. Loss = Matrix.loss(r) / tokens; a common factor on every loss (the number of tokens, the
  Gram as a sum instead of a mean) changes no comparison, so the ranks do not depend on it.
- `rank_multiple` K (any allocator but plain uniform): every rank is a multiple of K or full rank;
  the greedy steps are K ranks (or the rest up to full rank).
- `max_loss`: instead of a ratio, the smallest model on the greedy path whose relative weighted loss
  (`relative_loss`: sum w sum(s[r:]^2) / sum w sum(s^2), the fraction of the weighted whitened
  output energy that truncation drops, between 0 and 1) is at most the target.
- `max_ppl_increase`: the smallest model on the same greedy path whose predicted held-out perplexity is at
  most (1 + F) times the original's. The prediction (`predicted_nll_increase`, derived in docs/DESIGN.md):
  with w the mean squared gradient of the summed LM loss at a linear's output, the truncation error e_t of
  output t adds about 1/2 sum_t e_t^T diag(g_t^2) e_t to the summed loss (second order, the empirical Fisher
  as curvature, the first-order term taken as zero at a trained model); with the error spread evenly over
  the output's coordinates that is 1/2 sum_t w_t ||e_t||^2 = 1/2 P loss(r) over P positions (loss from the
  weighted energies; w tail(r) without them), so the mean NLL per predicted token (P (seqlen - 1) / seqlen of
  them) rises by 1/2 seqlen / (seqlen - 1) sum_i loss_i(r_i), the matrices' errors taken as independent;
  perplexity is multiplied by exp of that.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from ..errors import StreamSVDError
from .factorize import rank_for_ratio, stored_numel
from .pivot import dense_fallback

ALLOCATORS = ("uniform", "v2", "global")
LOG_FLOOR = 1e-6  # v2: the smallest log(L) used, for losses <= 1


@dataclass
class Matrix:
    name: str  # full module name; its last part is the matrix type (v2's groups)
    m: int  # out_features
    n: int  # in_features
    spectrum: np.ndarray | None = None  # whitened singular values, descending, min(m, n) of them
    weight: float = 1.0  # sensitivity: mean squared gradient at the output (1 without one)
    # per singular direction j (the spectrum's order): E_t[w_t a_tj^2], the energy of the output's j-th direction
    # weighted token by token by that token's mean squared gradient w_t; when given, it replaces weight x s_j^2
    weighted: np.ndarray | None = None

    @property
    def full(self) -> int:
        return min(self.m, self.n)

    def _cumulative(self, attr: str, per_direction, what: str) -> np.ndarray:
        """[0, cumsum(per_direction())], computed once and kept in `attr`; min(m, n) values are required."""
        if getattr(self, attr, None) is None:
            values = np.asarray(per_direction(), dtype=np.float64)
            if values.shape[0] != self.full:
                raise ValueError(f"{self.name}: {what} of {values.shape[0]} values, expected min(m, n) = {self.full}")
            setattr(self, attr, np.concatenate([[0.0], np.cumsum(values)]))
        return getattr(self, attr)

    def energy(self) -> np.ndarray:
        """cum[r] = sum(s[:r]^2), so the loss at rank r is cum[-1] - cum[r]."""
        return self._cumulative("_cum", lambda: (np.zeros(self.full) if self.spectrum is None
                                                 else np.asarray(self.spectrum, dtype=np.float64)) ** 2, "spectrum")

    def tail(self, rank: int) -> float:
        cum = self.energy()
        return float(cum[-1] - cum[min(rank, self.full)])

    def loss(self, rank: int) -> float:
        """The sensitivity-weighted truncation loss at `rank`: sum of `weighted` over the dropped directions,
        or weight x tail(rank) without it (one weight for every token and direction)."""
        if self.weighted is None:
            return self.weight * self.tail(rank)
        cum = self._cumulative("_wcum", lambda: self.weighted, "weighted energies")
        return float(cum[-1] - cum[min(rank, self.full)])


def matrix_type(name: str) -> str:
    """q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (any family's own leaf names)."""
    return name.rpartition(".")[2]


def budget_numel(mats: list[Matrix], ratio: float) -> float:
    return (1.0 - ratio) * sum(a.m * a.n for a in mats)


def total_numel(mats: list[Matrix], ranks: dict[str, int], factors: str = "pivoted") -> int:
    return sum(stored_numel(a.m, a.n, ranks[a.name], factors) for a in mats)


def relative_loss(mats: list[Matrix], ranks: dict[str, int]) -> float:
    """The max_loss measure: weighted truncation loss over weighted total energy (0 = nothing dropped)."""
    total = sum(a.loss(0) for a in mats)
    return sum(a.loss(ranks[a.name]) for a in mats) / total if total > 0 else 0.0


def next_rank(a: Matrix, rank: int, multiple: int = 1, factors: str = "pivoted") -> int:
    """One greedy step up: `multiple` ranks, or straight to full rank once the factors are no smaller than dense."""
    nxt = min(rank + multiple, a.full)
    return a.full if dense_fallback(a.m, a.n, nxt, factors) else nxt


def step_cost(a: Matrix, rank: int, multiple: int = 1, factors: str = "pivoted") -> int:
    nxt = next_rank(a, rank, multiple, factors)
    return stored_numel(a.m, a.n, nxt, factors) - stored_numel(a.m, a.n, rank, factors)


def start_rank(a: Matrix, multiple: int = 1) -> int:
    return multiple if multiple < a.full else a.full


def _round_down(a: Matrix, rank: int, multiple: int) -> int:
    if rank >= a.full or multiple <= 1:
        return rank
    return max(start_rank(a, multiple), rank // multiple * multiple)


def _check_multiple(multiple: int) -> None:
    if multiple < 1:
        raise StreamSVDError(f"--rank-multiple {multiple} is not positive", "give a rank multiple of 1 or more, e.g. 64")


def _greedy(mats: list[Matrix], ranks: dict[str, int], budget: float, tokens: float, multiple: int, factors: str,
            loss_target: float | None = None) -> dict[str, int]:
    """Raise ranks step by step, best (weighted loss reduction / parameter cost) first.

    With a budget: a matrix whose next step does not fit is dropped (its later steps come after it),
    so on return no matrix not at full rank can take a step in what is left. With `loss_target`:
    steps are taken in the same order until sum w tail(r) <= loss_target (no budget).
    """
    ranks = dict(ranks)
    used = total_numel(mats, ranks, factors)
    loss = sum(a.loss(ranks[a.name]) for a in mats)
    heap = []

    def push(i: int) -> None:
        a = mats[i]
        r = ranks[a.name]
        if r >= a.full:
            return
        nxt = next_rank(a, r, multiple, factors)
        cost = step_cost(a, r, multiple, factors)
        gain = (a.loss(r) - a.loss(nxt)) / tokens
        heapq.heappush(heap, (-gain / max(cost, 1e-12), i))

    for i in range(len(mats)):
        push(i)
    while heap:
        if loss_target is not None and loss <= loss_target:
            break
        _, i = heapq.heappop(heap)
        a = mats[i]
        r = ranks[a.name]
        cost = step_cost(a, r, multiple, factors)
        if used + cost > budget:
            continue
        ranks[a.name] = next_rank(a, r, multiple, factors)
        loss -= a.loss(r) - a.loss(ranks[a.name])
        used += cost
        push(i)
    return ranks


def _starting_ranks(mats: list[Matrix], budget: float, multiple: int, factors: str) -> dict[str, int]:
    ranks = {a.name: start_rank(a, multiple) for a in mats}
    need = total_numel(mats, ranks, factors)
    if need > budget:
        raise StreamSVDError(
            f"the smallest ranks allowed ({'rank 1' if multiple == 1 else f'multiples of {multiple}'}) need {need} parameters, "
            f"more than the budget of {int(budget)}",
            "use a smaller --ratio or a smaller --rank-multiple" if multiple > 1 else
            "use a smaller --ratio (the share of the linears' parameters removed): rank 1 everywhere is the least there is",
        )
    return ranks


def check_smallest_ranks(method: str, mats: list[Matrix], ratio: float, factors: str = "pivoted", multiple: int = 1) -> None:
    """Allocator `method`'s refusal of a --ratio budget below the smallest ranks it allows (_starting_ranks: rank 1,
    or `multiple`, or full rank where that is smaller), which needs the matrices' shapes only (no spectrum): a job that
    profiles for itself calls it before profiling, where the allocator (which calls _starting_ranks itself) came
    after minutes of profiling. uniform at multiple 1 takes rank_for_ratio's ranks, which keep rank 1 at the least: near
    --ratio 1 they need more than the budget (a finished job reported a smaller ratio than asked, where global refused)."""
    _check_multiple(multiple)
    if not (method == "uniform" and multiple == 1):
        _starting_ranks(mats, budget_numel(mats, ratio), multiple, factors)
        return
    need, budget = total_numel(mats, uniform(mats, ratio, factors), factors), budget_numel(mats, ratio)
    if need > budget * (1 + 1e-9):  # float rounding of the per-matrix budgets against their sum
        raise StreamSVDError(
            f"--alloc uniform's ranks (rank 1 at the least) need {need} parameters, more than the budget of {int(budget)}",
            "use a smaller --ratio (the share of the linears' parameters removed): rank 1 is the least a linear keeps",
        )


def uniform(mats: list[Matrix], ratio: float, factors: str = "pivoted", multiple: int = 1, tokens: float = 1.0) -> dict[str, int]:
    """Today's ranks: rank_for_ratio per matrix. With a multiple: rounded down, then the budget left is filled greedily."""
    _check_multiple(multiple)
    ranks = {a.name: rank_for_ratio(a.m, a.n, ratio, factors) for a in mats}
    if multiple == 1:
        return ranks
    budget = budget_numel(mats, ratio)
    _starting_ranks(mats, budget, multiple, factors)
    ranks = {a.name: _round_down(a, r, multiple) for a, r in zip(mats, ranks.values())}
    return _greedy(mats, ranks, budget, tokens, multiple, factors)


def global_greedy(mats: list[Matrix], ratio: float, factors: str = "pivoted", multiple: int = 1,
                  tokens: float = 1.0, floor: float = 0.0) -> dict[str, int]:
    """All ranks together: the budget goes where it removes the most weighted loss per parameter.

    `floor` f in [0, 1]: every matrix starts at f x its uniform rank (rounded down to the multiple), so none
    falls below it; the greedy shares out only what is left. The second-order loss it ranks steps by holds
    for small errors; a floor keeps each matrix's error in that range (docs/RESULTS.md measures it).
    """
    _check_multiple(multiple)
    _check_floor(floor)
    budget = budget_numel(mats, ratio)
    ranks = _starting_ranks(mats, budget, multiple, factors)
    if floor > 0:
        for a in mats:
            low = _round_down(a, int(floor * rank_for_ratio(a.m, a.n, ratio, factors)), multiple)
            ranks[a.name] = max(ranks[a.name], low)
        if total_numel(mats, ranks, factors) > budget:  # only when the multiple's rounding up of tiny ranks overshoots
            raise StreamSVDError(f"--alloc-floor {floor} with --rank-multiple {multiple} does not fit --ratio {ratio}",
                                 "use a smaller --alloc-floor, a smaller --rank-multiple or a smaller --ratio")
    return _greedy(mats, ranks, budget, tokens, multiple, factors)


def _check_floor(floor: float) -> None:
    if not (0.0 <= floor <= 1.0):
        raise StreamSVDError(f"--alloc-floor {floor} is out of range",
                             "give the fraction of its uniform rank every matrix keeps at least, in [0, 1], e.g. 0.5")


def max_loss(mats: list[Matrix], target: float, factors: str = "pivoted", multiple: int = 1) -> dict[str, int]:
    """The first model on the greedy path whose relative_loss is <= `target` (0 <= target < 1)."""
    _check_multiple(multiple)
    if not 0.0 <= target < 1.0:
        raise StreamSVDError(f"--max-loss {target} is out of range",
                             "give the fraction of the weighted output energy that may be dropped, in [0, 1), e.g. 0.05")
    if target == 0.0:
        return {a.name: a.full for a in mats}  # nothing may be dropped (the running sum's rounding aside)
    ranks = {a.name: start_rank(a, multiple) for a in mats}
    total = sum(a.loss(0) for a in mats)
    return _greedy(mats, ranks, math.inf, 1.0, multiple, factors, loss_target=target * total)


def predicted_nll_increase(mats: list[Matrix], ranks: dict[str, int], seqlen: int) -> float:
    """The second-order estimate of the mean next-token NLL increase of truncating to `ranks` (module doc)."""
    return 0.5 * seqlen / (seqlen - 1) * sum(a.loss(ranks[a.name]) for a in mats)


def max_ppl_increase(mats: list[Matrix], target: float, seqlen: int, factors: str = "pivoted", multiple: int = 1,
                     max_relative_loss: float | None = None) -> dict[str, int]:
    """The first model on the global greedy path whose predicted perplexity is at most (1 + target) x the original's
    (target > 0); with `max_relative_loss` too (--max-loss), the first that meets both."""
    _check_multiple(multiple)
    if not (target > 0 and math.isfinite(target)):
        raise StreamSVDError(f"--max-ppl-increase {target} is out of range",
                             "give the largest held-out perplexity increase allowed as a fraction above 0, e.g. 0.25 for +25%")
    limit = math.log1p(target) / (0.5 * seqlen / (seqlen - 1))  # in units of sum Matrix.loss
    if max_relative_loss is not None:
        limit = min(limit, max_relative_loss * sum(a.loss(0) for a in mats))
    ranks = {a.name: start_rank(a, multiple) for a in mats}
    return _greedy(mats, ranks, math.inf, 1.0, multiple, factors, loss_target=limit)


def _water_fill(inv: np.ndarray, params: np.ndarray, hi: np.ndarray, ratio: float) -> np.ndarray:
    """ratio_i = c inv_i clipped to [0, hi_i], with sum params_i ratio_i = ratio sum params (as far as hi allows)."""
    ratios = np.zeros_like(inv)
    free = np.ones(inv.shape[0], dtype=bool)
    while free.any():
        left = ratio * params.sum() - (params * ratios)[~free].sum()
        c = max(left, 0.0) / (params * inv)[free].sum()
        trial = c * inv
        over = free & (trial > hi)
        if not over.any():
            ratios[free] = trial[free]
            break
        ratios[over] = hi[over]
        free &= ~over
    return ratios


def v2_ratios(mats: list[Matrix], ratio: float, factors: str = "pivoted", tokens: float = 1.0) -> dict[str, float]:
    """SVD-LLM V2's per-matrix ratios: within each type group, proportional to 1 / log(L_i) (see the module doc)."""
    groups: dict[str, list[Matrix]] = {}
    for a in mats:
        groups.setdefault(matrix_type(a.name), []).append(a)
    out = {}
    for group in groups.values():
        logs = []
        for a in group:
            loss = math.sqrt(tokens * a.tail(rank_for_ratio(a.m, a.n, ratio, factors)))
            logs.append(max(math.log(loss), LOG_FLOOR) if loss > 0 else LOG_FLOOR)
        params = np.array([a.m * a.n for a in group], dtype=np.float64)
        hi = np.array([1.0 - stored_numel(a.m, a.n, 1, factors) / (a.m * a.n) for a in group])
        ratios = _water_fill(1.0 / np.array(logs), params, hi, ratio)
        out.update({a.name: float(r) for a, r in zip(group, ratios)})
    return out


def v2(mats: list[Matrix], ratio: float, factors: str = "pivoted", multiple: int = 1, tokens: float = 1.0) -> dict[str, int]:
    """V2's ratios as ranks (rounded down, to a multiple if asked), then the rounding's leftover filled greedily."""
    _check_multiple(multiple)
    budget = budget_numel(mats, ratio)
    _starting_ranks(mats, budget, multiple, factors)
    ratios = v2_ratios(mats, ratio, factors, tokens)
    ranks = {}
    for a in mats:
        r = a.full if ratios[a.name] <= 0 else rank_for_ratio(a.m, a.n, ratios[a.name], factors)
        ranks[a.name] = _round_down(a, r, multiple)
    if total_numel(mats, ranks, factors) > budget:
        raise StreamSVDError(f"v2's ratios cannot meet --ratio {ratio}", "use a smaller --ratio or --alloc global")
    unweighted = [Matrix(a.name, a.m, a.n, a.spectrum) for a in mats]
    return _greedy(unweighted, ranks, budget, tokens, multiple, factors)


def allocate(method: str, mats: list[Matrix], ratio: float, factors: str = "pivoted", multiple: int = 1,
             tokens: float = 1.0, floor: float = 0.0) -> dict[str, int]:
    """The ranks of allocator `method` (uniform, v2 or global) for --ratio `ratio`; `floor` is global's."""
    functions = {"uniform": uniform, "v2": v2, "global": global_greedy}
    if method not in functions:
        raise StreamSVDError(f"unknown --alloc {method!r}", f"choose one of {', '.join(ALLOCATORS)}")
    if method == "global":
        return global_greedy(mats, ratio, factors, multiple=multiple, tokens=tokens, floor=floor)
    return functions[method](mats, ratio, factors, multiple=multiple, tokens=tokens)

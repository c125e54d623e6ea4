"""IR-free, exact planner of contiguous pipeline stages.

A graph in topological order is a sequence of ``N`` nodes with costs ``c_i ≥ 0``. A *cut* at
position ``j`` (``0 ≤ j ≤ N-2``) ends a stage after node ``j``; it sends ``b_j`` bytes across
the boundary (``+inf``: the cut is not allowed, e.g. a non-tensor value is live there). A plan
of ``S`` stages picks ``S-1`` allowed cuts ``j_1 < … < j_{S-1}``; stage ``k`` costs
``C_k = Σ c_i`` over its nodes, written ``cost(s, e) = P[e+1] − P[s]`` with the prefix sums
``P`` (one expression everywhere, so the floating-point cost is a monotone interval function).

1. **Bottleneck** ``B* = min over plans of max_k C_k``, exactly. For a threshold ``T`` the
   greedy that ends every stage at the last allowed cut whose stage still costs ``≤ T`` uses
   the fewest stages of any plan with stages ``≤ T`` (exchange argument: its ``k``-th cut is
   never left of any such plan's ``k``-th cut); ``T`` is feasible iff it needs ``≤ S`` stages
   (more cuts never raise a stage's cost, and ``S-1`` allowed cuts exist). The search keeps
   ``lo`` (every ``T < lo`` infeasible) and ``hi`` (the bottleneck of a real plan): probing
   ``T = (lo+hi)/2`` either lowers ``hi`` to the greedy plan's own bottleneck (``≤ T``) or
   raises ``lo`` to the smallest cost at which one of the greedy's stages could grow (below it
   the greedy, and so infeasibility, is unchanged). Both are actual stage costs; the search
   stops when ``lo ≥ hi`` and then ``B* = hi``. It starts from the lower bound
   ``max(Σc / S, max c_i)``.
2. **Floor.** Many plans may share ``B*`` (one heavy node, an embedding table, can fix it),
   some with nearly empty stages; among them the largest smallest stage ``L*`` is found by
   bisection on ``L``: "every stage in ``[L, B*]``" is monotone in ``L``, and checked layer by
   layer with numpy (stage ``k`` can end at ``e`` iff some allowed earlier end lies in the
   window of starts whose stage costs between ``L`` and ``B*``; prefix counts answer it).
3. **Boundary bytes.** Among plans with ``max_k C_k ≤ B*·(1 + slack + 1e-9)`` and
   ``min_k C_k ≥ L*·(1 − slack − 1e-9)``, a DP minimises ``Σ b_j`` over the chosen cuts:
   ``F_k(e) = min_p F_{k-1}(p) + b_p`` over previous ends ``p`` whose stage ``p+1..e`` is in
   range. Those ``p`` form a window whose two ends only move right as ``e`` grows, so a
   monotone deque gives each layer in ``O(N)``: ``O(S·N)``.

Costs: ``flops``; ``memory`` = the bytes a stage keeps resident for a node (the constants it is
the first reader of, its KV-cache share; ``_pipeline_costs``); ``mixed`` (:func:`mixed_costs`)
= ``w·flops_i/Σflops + (1−w)·memory_i/Σmemory`` so both parts sum to 1 over the graph and a
stage's cost is its weighted share of the two.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from graphpress.graph.errors import PreconditionError

__all__ = ["StagePlan", "plan_stages", "mixed_costs", "allowed_cuts"]

logger = logging.getLogger(__name__)

TOLERANCE = 1e-9  # relative: plans this close to the bottleneck count as optimal


@dataclass(frozen=True)
class StagePlan:
    """Where the stages end and what they cost.

    ``cuts[k]`` is the last node of stage ``k`` (``S-1`` entries); ``boundary_bytes[k]`` is
    what crosses cut ``k``; ``optimum`` is the proven minimum of the largest stage cost over
    every contiguous split into ``S`` stages; ``lower_bound = max(Σc/S, max c_i)``; ``floor``
    the largest smallest stage among the plans at ``optimum`` (module doc, 2; by bisection, so
    up to a relative 1e-9 below it).
    """

    cuts: tuple[int, ...]
    stage_costs: tuple[float, ...]
    boundary_bytes: tuple[float, ...]
    optimum: float
    lower_bound: float
    floor: float = 0.0

    @property
    def stages(self) -> int:
        return len(self.stage_costs)

    @property
    def max_cost(self) -> float:
        return max(self.stage_costs)

    @property
    def imbalance(self) -> float:
        """Largest stage cost over the mean stage cost (1.0 is a perfect balance)."""
        mean = sum(self.stage_costs) / self.stages
        return self.max_cost / mean if mean > 0 else 1.0

    @property
    def boundary_total(self) -> float:
        return float(sum(self.boundary_bytes))

    def stage_of(self, count: int) -> list[int]:
        """The stage index of each of ``count`` nodes."""
        bounds = zip([-1, *self.cuts], [*self.cuts, count - 1])
        return [k for k, (before, end) in enumerate(bounds) for _ in range(before, end)]


def allowed_cuts(boundary: Sequence[float]) -> int:
    """Number of cut positions with a finite boundary size."""
    return int(np.isfinite(np.asarray(boundary, dtype=np.float64)).sum())


def mixed_costs(flops: Sequence[float], memory: Sequence[float], weight: float = 0.5) -> np.ndarray:
    """``weight·flops/Σflops + (1−weight)·memory/Σmemory`` per node (a part summing to 0 is 0)."""
    parts = []
    for values in (flops, memory):
        array = np.asarray(values, dtype=np.float64)
        total = array.sum()
        parts.append(array / total if total > 0 else np.zeros_like(array))
    return weight * parts[0] + (1.0 - weight) * parts[1]


def plan_stages(
    costs: Sequence[float], boundary: Sequence[float], stages: int, *, slack: float = 0.0
) -> StagePlan:
    """The contiguous split of ``costs`` into ``stages`` stages with the smallest largest stage
    (exact), then the largest smallest stage, and among those within ``slack`` of both, the
    fewest boundary bytes (exact).

    ``boundary[j]`` (``len(costs) - 1`` entries) is the size of cut ``j``; ``inf`` forbids it.
    Raises :class:`PreconditionError` if there are fewer than ``stages - 1`` allowed cuts.
    """
    c = np.asarray(costs, dtype=np.float64)
    b = np.asarray(boundary, dtype=np.float64)
    n = len(c)
    if b.shape != (max(n - 1, 0),):
        raise ValueError(f"boundary needs {max(n - 1, 0)} entries (one per cut), got {b.shape}")
    if (c < 0).any() or not np.isfinite(c).all() or (b < 0).any():
        raise ValueError("costs must be finite and ≥ 0 and boundary sizes ≥ 0")
    if stages < 1:
        raise PreconditionError(f"stages={stages} must be ≥ 1")
    if stages - 1 > allowed_cuts(b):
        raise PreconditionError(
            f"{stages} stages need {stages - 1} cuts but the graph has {allowed_cuts(b)} places "
            f"where only tensors are live; ask for at most {allowed_cuts(b) + 1} stages"
        )
    if n == 0:
        return StagePlan((), (0.0,), (), 0.0, 0.0)
    prefix = np.concatenate([[0.0], np.cumsum(c)])
    search = _Search(prefix, b, stages)
    lower = max(float(prefix[-1]) / stages, float(c.max()))
    optimum = search.bottleneck(lower)
    floor = search.floor(optimum)
    cuts = search.fewest_bytes(optimum * (1.0 + slack + TOLERANCE),
                               max(floor * (1.0 - slack - TOLERANCE), 0.0))
    ends = [*cuts, n - 1]
    starts = [0, *(j + 1 for j in cuts)]
    stage_costs = tuple(float(prefix[e + 1] - prefix[s]) for s, e in zip(starts, ends))
    plan = StagePlan(tuple(cuts), stage_costs, tuple(float(b[j]) for j in cuts), optimum, lower,
                     floor)
    logger.debug("stage plan: %s (optimum %s, bound %s)", plan.stage_costs, optimum, lower)
    return plan


class _Search:
    """The greedy probe and the boundary DP over one cost prefix array."""

    def __init__(self, prefix: np.ndarray, boundary: np.ndarray, stages: int) -> None:
        self.prefix, self.boundary, self.stages = prefix, boundary, stages
        self.n = len(prefix) - 1
        allowed = np.isfinite(boundary)
        index = np.arange(self.n - 1)
        # last_allowed[i]: largest allowed cut ≤ i (-1 if none); next_end[i]: smallest allowed
        # cut ≥ i, or the last node (a stage may always end there)
        self.last_allowed = np.maximum.accumulate(np.where(allowed, index, -1))
        nxt = np.where(allowed, index, self.n - 1)
        self.next_end = np.append(np.minimum.accumulate(nxt[::-1])[::-1], self.n - 1)

    def cost(self, start: int, end: int) -> float:
        return float(self.prefix[end + 1] - self.prefix[start])

    def furthest(self, start: int, limit: float) -> int:
        """Largest ``end ≥ start - 1`` with ``cost(start, end) ≤ limit``."""
        end = int(np.searchsorted(self.prefix, self.prefix[start] + limit, side="right")) - 2
        end = min(max(end, start - 1), self.n - 1)
        while end + 1 < self.n and self.cost(start, end + 1) <= limit:
            end += 1
        while end >= start and self.cost(start, end) > limit:
            end -= 1
        return end

    def probe(self, limit: float) -> tuple[bool, float]:
        """(True, the greedy plan's bottleneck) or (False, the next limit that may change it)."""
        start, worst, grow = 0, 0.0, math.inf
        for _ in range(self.stages):
            end = self.furthest(start, limit)
            if end >= self.n - 1:
                return True, max(worst, self.cost(start, self.n - 1))
            cut = int(self.last_allowed[end]) if end >= 0 else -1
            if cut < start:  # not even the first allowed end fits under the limit
                return False, min(grow, self.cost(start, int(self.next_end[start])))
            worst = max(worst, self.cost(start, cut))
            grow = min(grow, self.cost(start, int(self.next_end[cut + 1])))
            start = cut + 1
        return False, grow

    def bottleneck(self, lower: float) -> float:
        lo = lower
        hi = self.probe(self.cost(0, self.n - 1))[1]  # one stage always passes the probe
        while lo < hi:
            mid = lo + (hi - lo) / 2
            feasible, value = self.probe(mid if lo < mid < hi else lo)
            if feasible:
                hi = value
            else:
                lo = value
        return hi

    def windows(self, limit: float, floor: float) -> tuple[np.ndarray, np.ndarray]:
        """Per end ``e``: the first and last previous end ``p`` (``-1``: the stage starts at
        node 0) with ``floor ≤ cost(p+1, e) ≤ limit`` (both non-decreasing in ``e``; empty
        when first > last)."""
        prefix, n = self.prefix, self.n
        ends = np.arange(n)
        top = prefix[1:]

        def smallest_start(stop) -> np.ndarray:
            """Per end, the smallest start ``q ≤ e`` with ``stop(cost(q, e))``, else ``e+1``
            (``cost`` only falls as ``q`` grows: a vectorised bisection on the one cost
            expression, so no rounding of a shifted search)."""
            lo, hi = np.zeros(n, dtype=np.int64), ends + 1
            while (lo < hi).any():
                mid = (lo + hi) // 2
                ok = (mid > ends) | stop(top - prefix[np.minimum(mid, n)])
                hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid + 1)
            return lo

        first = smallest_start(lambda cost: cost <= limit)
        last = smallest_start(lambda cost: cost < floor) - 1
        return first - 1, last - 1  # as previous ends p = start - 1


    def feasible(self, limit: float, floor: float) -> bool:
        """Whether some plan has every stage cost in ``[floor, limit]``."""
        first, last = self.windows(limit, floor)
        allowed = np.append(np.isfinite(self.boundary), False)  # no cut after the last node
        reach = (first <= -1) & (last >= -1)  # one stage ending at e
        for _ in range(1, self.stages):
            count = np.concatenate([[0], np.cumsum(reach & allowed)])  # ends p < index
            lo, hi = np.maximum(first, 0), last
            reach = (hi >= lo) & (count[np.clip(hi + 1, 0, self.n)] > count[np.clip(lo, 0, self.n)])
        return bool(reach[-1])

    def floor(self, limit: float) -> float:
        """``L*``: the largest smallest stage among plans with every stage ``≤ limit``."""
        lo, hi = 0.0, min(self.cost(0, self.n - 1) / self.stages, limit)
        if self.feasible(limit, hi):
            return hi
        for _ in range(100):
            mid = lo + (hi - lo) / 2
            if not lo < mid < hi or hi - lo <= TOLERANCE * hi:
                break
            lo, hi = (mid, hi) if self.feasible(limit, mid) else (lo, mid)
        return lo

    def fewest_bytes(self, limit: float, floor: float = 0.0) -> list[int]:
        """Cuts of the plan with every stage in ``[floor, limit]`` and the fewest boundary
        bytes."""
        n, stages = self.n, self.stages
        boundary = [*self.boundary.tolist(), math.inf]  # a stage cannot end "after" node n-1
        first, last = (w.tolist() for w in self.windows(limit, floor))
        best = [0.0 if first[e] <= -1 <= last[e] else math.inf for e in range(n)]  # F_1
        choice = [[-1] * n for _ in range(stages)]
        for k in range(1, stages):
            through = [f + b for f, b in zip(best, boundary)]  # F_{k-1}(p) + b_p
            new, window, pushed = [math.inf] * n, deque(), 0
            for end in range(1, n):
                while pushed <= min(last[end], end - 1):
                    if through[pushed] < math.inf:
                        while window and through[window[-1]] >= through[pushed]:
                            window.pop()
                        window.append(pushed)
                    pushed += 1
                while window and window[0] < first[end]:
                    window.popleft()
                ends_here = end == n - 1 if k == stages - 1 else boundary[end] < math.inf
                if window and ends_here:
                    new[end], choice[k][end] = through[window[0]], window[0]
            best = new
        if best[n - 1] == math.inf:
            raise AssertionError(f"no plan in [{floor}, {limit}]; the searches are inconsistent")
        cuts, end = [], n - 1
        for k in range(stages - 1, 0, -1):
            end = choice[k][end]
            cuts.append(end)
        return cuts[::-1]

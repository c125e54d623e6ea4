"""The IR-free stage planner: exact bottleneck and boundary bytes against brute force."""

from __future__ import annotations

import itertools
import math
import random
import time

import numpy as np
import pytest

from graphpress.graph.errors import PreconditionError
from graphpress.passes.partition._stage_plan import allowed_cuts, mixed_costs, plan_stages


def brute_force(costs, boundary, stages):
    """(min max-stage-cost, then max min-stage-cost, then min boundary bytes) over all
    splits, as (worst, smallest, bytes)."""
    n, best = len(costs), None
    for cuts in itertools.combinations(range(n - 1), stages - 1):
        if not all(math.isfinite(boundary[j]) for j in cuts):
            continue
        starts, ends = [0, *(j + 1 for j in cuts)], [*cuts, n - 1]
        sizes = [sum(costs[s:e + 1]) for s, e in zip(starts, ends)]
        key = (max(sizes), -min(sizes), sum(boundary[j] for j in cuts))
        best = key if best is None or key < best else best
    return best[0], -best[1], best[2]


def random_instance(rng: random.Random, n: int):
    costs = [rng.choice([0, rng.randint(0, 30)]) for _ in range(n)]
    boundary = [math.inf if rng.random() < 0.25 else rng.randint(0, 9) for _ in range(n - 1)]
    return costs, boundary


def test_optimal_against_every_contiguous_split():
    rng, checked = random.Random(0), 0
    for _ in range(600):
        n = rng.randint(1, 10)
        costs, boundary = random_instance(rng, n)
        for stages in range(1, allowed_cuts(boundary) + 2):
            plan = plan_stages(costs, boundary, stages)
            worst, smallest, traffic = brute_force(costs, boundary, stages)
            assert plan.optimum == worst and plan.max_cost == worst, (costs, boundary, stages)
            assert min(plan.stage_costs) == smallest, (costs, boundary, stages)
            assert plan.floor == pytest.approx(smallest, rel=1e-9, abs=1e-12)  # (bisection)
            assert plan.boundary_total == traffic, (costs, boundary, stages)
            assert all(math.isfinite(boundary[j]) for j in plan.cuts)
            assert len(plan.cuts) == stages - 1 and list(plan.cuts) == sorted(set(plan.cuts))
            checked += 1
    assert checked > 1200


def test_float_costs_are_optimal_within_rounding():
    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.integers(2, 10))
        costs = list(rng.random(n) * rng.choice([1e-6, 1.0, 1e9]))
        boundary = list(rng.integers(0, 5, n - 1).astype(float))
        stages = int(rng.integers(1, n + 1))
        plan = plan_stages(costs, boundary, stages)
        worst, smallest, _ = brute_force(costs, boundary, stages)
        assert plan.max_cost == pytest.approx(worst, rel=1e-9)
        assert min(plan.stage_costs) == pytest.approx(smallest, rel=1e-6)
        assert sum(plan.stage_costs) == pytest.approx(sum(costs), rel=1e-12)


def test_boundary_bytes_break_ties_between_equally_balanced_splits():
    # every cut gives stages of cost 1: only the boundary sizes decide
    plan = plan_stages([1, 0, 0, 1], [5, 1, 7], 2)
    assert plan.cuts == (1,) and plan.boundary_bytes == (1.0,) and plan.max_cost == 1


def test_forbidden_cuts_are_never_used_and_the_bound_follows():
    # the balanced cut (after node 1) is forbidden: the best allowed split is 3 | 1
    plan = plan_stages([1, 1, 1, 1], [0, math.inf, 0], 2)
    assert plan.cuts in ((0,), (2,)) and plan.optimum == 3
    assert plan.lower_bound == 2 and plan.imbalance == pytest.approx(1.5)


def test_slack_trades_balance_for_fewer_boundary_bytes():
    costs, boundary = [1, 1, 1, 1], [1, 100, 1]
    exact = plan_stages(costs, boundary, 2)
    assert exact.cuts == (1,) and exact.boundary_total == 100
    loose = plan_stages(costs, boundary, 2, slack=0.5)
    assert loose.optimum == 2 and loose.max_cost == 3 and loose.boundary_total == 1


def test_stage_of_lists_every_node_once_in_order():
    plan = plan_stages([3, 1, 1, 1, 3, 1], [0] * 5, 3)
    assert plan.stage_of(6) == sorted(plan.stage_of(6)) and len(plan.stage_of(6)) == 6
    for k, cost in enumerate(plan.stage_costs):
        members = [c for c, s in zip([3, 1, 1, 1, 3, 1], plan.stage_of(6)) if s == k]
        assert sum(members) == cost


def test_too_many_stages_and_bad_inputs_are_refused():
    with pytest.raises(PreconditionError, match="at most 2 stages"):
        plan_stages([1, 1, 1], [0, math.inf], 3)
    with pytest.raises(PreconditionError, match="must be ≥ 1"):
        plan_stages([1, 1], [0], 0)
    with pytest.raises(ValueError, match="one per cut"):
        plan_stages([1, 1, 1], [0], 2)
    with pytest.raises(ValueError):
        plan_stages([1, -1], [0], 2)


def test_mixed_costs_weigh_normalised_parts():
    mixed = mixed_costs([2, 2, 0], [0, 1, 3], weight=0.25)
    assert mixed == pytest.approx([0.125, 0.125 + 0.1875, 0.5625])
    assert mixed.sum() == pytest.approx(1.0)


def test_thousands_of_nodes_plan_in_well_under_a_second():
    rng = np.random.default_rng(0)
    costs = rng.integers(0, 10**9, 6000).astype(float)
    boundary = rng.integers(0, 10**6, 5999).astype(float)
    boundary[rng.random(5999) < 0.5] = math.inf
    start = time.perf_counter()
    plan = plan_stages(costs, boundary, 8)
    assert time.perf_counter() - start < 1.0
    assert plan.imbalance < 1.01 and plan.optimum >= plan.lower_bound

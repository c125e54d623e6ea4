"""IR-free math of ``factor-low-rank``: truncated/randomized/activation-aware SVD and rank
selection (fixed, energy, error bound, global budget with rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphpress.graph.errors import PreconditionError
from graphpress.passes.low_rank._plan import Target, plan
from graphpress.passes.low_rank._rank import (
    Layer,
    allocate_budget,
    cost,
    max_rank,
    select_energy,
    select_error,
    select_fixed,
)
from graphpress.passes.low_rank._svd import (
    decompose,
    randomized_svd,
    relative_error,
    truncated_svd,
    whitening,
)
from graphpress.passes.low_rank.factor import FactorLowRank

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small dense linear algebra gains little from threads and loses 10x or more when the
    (shared, 2-core) test machine is oversubscribed: run these tests on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _decaying(n: int, k: int, decay: float = 0.05, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(n, min(n, k))))
    v, _ = np.linalg.qr(rng.normal(size=(k, min(n, k))))
    s = np.exp(-decay * np.arange(min(n, k))) + 1e-3
    return (u * s) @ v.T


def test_truncated_error_is_the_optimal_tail_energy():
    w = RNG.normal(size=(60, 40))
    s_ref = np.linalg.svd(w, compute_uv=False)
    spectrum = decompose(w)
    np.testing.assert_allclose(spectrum.s, s_ref, rtol=1e-10)
    for r in (1, 5, 17, 39):
        a, b = spectrum.factors(r)
        assert a.shape == (60, r) and b.shape == (r, 40)
        err2 = np.sum((w - a @ b) ** 2)
        np.testing.assert_allclose(err2, np.sum(s_ref[r:] ** 2), rtol=1e-9)
        np.testing.assert_allclose(spectrum.tail(r), err2, rtol=1e-9)
        other = RNG.normal(size=(60, r)) @ RNG.normal(size=(r, 40))  # any other rank-r matrix
        assert np.sum((w - other) ** 2) > err2
    a, b = spectrum.factors(40)
    np.testing.assert_allclose(a @ b, w, atol=1e-10)  # full rank reproduces W


@pytest.mark.parametrize("rank", [10, 40])
def test_randomized_within_one_percent_and_tail_exact(rank):
    w = _decaying(400, 200)
    _, s_exact, _ = truncated_svd(w)
    exact_err = np.sqrt(np.sum(s_exact[rank:] ** 2))
    spectrum = decompose(w, rank=rank, method="randomized", oversample=10, power_iters=2)
    assert len(spectrum.s) == rank and not spectrum.complete
    a, b = spectrum.factors(rank)
    err = np.linalg.norm(w - a @ b)
    assert exact_err <= err <= 1.01 * exact_err
    np.testing.assert_allclose(np.sqrt(spectrum.tail(rank)), err, rtol=1e-8)  # ‖W‖² − Σσ²
    u, s, vt = randomized_svd(w, rank, power_iters=0, seed=3)  # without power iterations:
    worse = np.linalg.norm(w - (u * s) @ vt)  # still a valid, but poorer, approximation
    assert worse >= err * (1 - 1e-9) and np.allclose(u.T @ u, np.eye(rank), atol=1e-8)
    with pytest.raises(ValueError, match="computed"):
        spectrum.factors(rank + 1)


def test_activation_aware_minimises_output_error_on_correlated_inputs():
    k, n, r = 48, 64, 8
    mix = RNG.normal(size=(k, k)) * np.exp(-0.3 * np.arange(k))[:, None]
    x = RNG.normal(size=(4000, k)) @ mix  # strongly anisotropic inputs
    w = RNG.normal(size=(n, k))
    lower = whitening(x.T @ x / len(x), damp=1e-6)
    plain = decompose(w)
    aware = decompose(w, lower=lower)
    err_plain = relative_error(w, *plain.factors(r), x)
    err_aware = relative_error(w, *aware.factors(r), x)
    assert err_aware < 0.5 * err_plain
    # the whitened tail is the output error (up to the tiny damping)
    np.testing.assert_allclose(np.sqrt(aware.tail(r) / aware.total), err_aware, rtol=1e-3)
    # and the plain factors stay optimal for the weight error
    assert relative_error(w, *plain.factors(r)) < relative_error(w, *aware.factors(r))


def test_max_rank_and_single_layer_selection():
    for n, k in [(384, 384), (1536, 384), (7, 3), (2, 2)]:
        r = max_rank(n, k)
        assert r * (n + k) < n * k <= (r + 1) * (n + k)
    s = np.array([4.0, 2.0, 1.0, 0.5, 0.25])
    layer = Layer(64, 32, s, float(np.sum(s**2)))
    energy = np.cumsum(s**2) / np.sum(s**2)
    assert select_energy(layer, energy[1])[0] == 2
    assert select_energy(layer, energy[1] + 1e-6)[0] == 3
    assert select_energy(layer, 0.5, round_to=4)[0] == 4
    bound = np.sqrt(1 - energy[2])
    assert select_error(layer, bound + 1e-9)[0] == 3 and select_error(layer, bound - 1e-6)[0] == 4
    assert select_fixed(layer, 3) == 3 and select_fixed(layer, 3, round_to=8) == 8
    assert select_fixed(layer, max_rank(64, 32) + 1) is None  # no saving: stays dense
    partial = Layer(64, 32, s[:2], float(np.sum(s**2)))  # randomized: only 2 values known
    assert select_energy(partial, 0.99) == (2, True)  # starved: needs more values


def _layers(seed: int = 0) -> list[Layer]:
    rng = np.random.default_rng(seed)
    shapes = [(384, 384), (1536, 384), (384, 1536), (256, 128), (512, 512)] * 3
    layers = []
    for i, (n, k) in enumerate(shapes):
        s = np.sort(rng.gamma(1.0, size=min(n, k)) * np.exp(-rng.uniform(0, 0.05) * np.arange(
            min(n, k))))[::-1] * (1 + i)
        layers.append(Layer(n, k, s, float(np.sum(s**2))))
    return layers


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("round_to", [1, 8, 16])
def test_budget_hits_the_parameter_count_within_one_percent(budget, round_to):
    layers = _layers()
    ranks, starved = allocate_budget(layers, budget, round_to)
    assert starved == []
    total = sum(layer.n * layer.k for layer in layers)
    used = sum(cost(layer, r) for layer, r in zip(layers, ranks))
    assert used <= budget * total and used >= 0.99 * budget * total
    for layer, r in zip(layers, ranks):
        assert r is None or (r % round_to == 0 and 1 <= r <= max_rank(layer.n, layer.k))


def test_budget_allocation_beats_uniform_and_is_greedy_optimal():
    layers = _layers(1)
    ranks, _ = allocate_budget(layers, 0.5)
    err = sum(layer.rel_error2(r) if r else 0.0 for layer, r in zip(layers, ranks))
    uniform = [int(0.5 * layer.n * layer.k / (layer.n + layer.k)) for layer in layers]
    assert sum(cost(la, r) for la, r in zip(layers, uniform)) <= 0.5 * sum(
        la.n * la.k for la in layers)
    assert err < sum(layer.rel_error2(r) for layer, r in zip(layers, uniform))
    # moving one rank from any layer to any other never helps (KKT of the greedy)
    for i, (li, ri) in enumerate(zip(layers, ranks)):
        for j, (lj, rj) in enumerate(zip(layers, ranks)):
            if i == j or not ri or not rj or ri < 2 or rj + 1 > max_rank(lj.n, lj.k):
                continue
            freed = li.n + li.k
            if freed < lj.n + lj.k:
                continue
            loss = li.rel_error2(ri - 1) - li.rel_error2(ri)
            gain = lj.rel_error2(rj) - lj.rel_error2(rj + 1)
            assert gain <= loss + 1e-12


def test_budget_below_the_minimum_ranks_is_refused():
    with pytest.raises(PreconditionError, match="raise the budget"):
        allocate_budget(_layers(), 0.05, round_to=64)


def test_plan_randomized_grows_starved_sketches_to_the_exact_choice():
    targets = [Target(f"w{i}", _decaying(300, 120, decay=0.02 + 0.005 * i, seed=i))
               for i in range(3)]
    exact, _ = plan(targets, FactorLowRank(energy=0.95))
    fast, _ = plan(targets, FactorLowRank(energy=0.95, method="randomized"))
    assert [c.rank for c in fast] == [c.rank for c in exact]
    assert all(c.rank is not None and c.rank > 120 // 4 for c in exact)  # beyond the first sketch
    for c_fast, c_exact in zip(fast, exact):
        assert c_fast.row["output_error"] <= 1.01 * c_exact.row["output_error"]
    budget, _ = plan(targets, FactorLowRank(budget=0.5, method="randomized", round_to=8))
    used = sum(c.rank * 420 if c.rank else 300 * 120 for c in budget)
    assert 0.99 * 0.5 * 3 * 300 * 120 <= used <= 0.5 * 3 * 300 * 120

"""IR-free plan of ``factor-low-rank``: spectra, ranks, factors and per-layer report rows.

For each target weight ``W`` ``[N, K]`` (optionally with the whitening ``L`` of its input's
second moment and a sample of its input rows) the plan computes the spectrum of ``W·L``
(exact SVD, or randomized SVD of as many leading values as the rank selection needs: it starts
from a guess and doubles the sketch of the layers the selection reports *starved*), selects
the ranks (``_rank``), and forms the factors ``A`` ``[N, r]``, ``B`` ``[r, K]`` (``_svd``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._rank import (
    Layer,
    allocate_budget,
    max_rank,
    round_up,
    select_energy,
    select_error,
    select_fixed,
    uniform_guess,
)
from ._svd import Spectrum, decompose, relative_error

__all__ = ["Target", "Choice", "plan", "layer_row"]

logger = logging.getLogger(__name__)

MAX_SPECTRUM = 512  # singular values kept in a report row


@dataclass
class Target:
    """One weight to factor: ``w`` ``[N, K]``, whitening ``lower`` and input ``rows``."""

    name: str
    w: np.ndarray
    lower: np.ndarray | None = None
    rows: np.ndarray | None = None
    weight: float = 1.0  # importance of its relative error in the budget (``_sensitivity``)


@dataclass
class Choice:
    """The plan for one target: ``rank`` (``None``: stays dense) and the factors."""

    target: Target
    rank: int | None
    spectrum: Spectrum
    a: np.ndarray | None = None
    b: np.ndarray | None = None
    row: dict[str, Any] = field(default_factory=dict)


def _first_count(opts: Any, n: int, k: int) -> int:
    """How many leading singular values to compute first (randomized SVD)."""
    full, u = min(n, k), max(opts.round_to, 1)
    if opts.rank is not None:
        return min(full, round_up(opts.rank, u))
    if opts.budget is not None:
        return min(full, round_up(math.ceil(1.25 * uniform_guess(n, k, opts.budget)), u) + u)
    return min(full, max(2 * u, full // 4))


def _select(opts: Any, layers: list[Layer]) -> tuple[list[int | None], list[int]]:
    u = max(opts.round_to, 1)
    if opts.budget is not None:
        return allocate_budget(layers, opts.budget, u)
    if opts.rank is not None:
        return [select_fixed(layer, opts.rank, u) for layer in layers], []
    if opts.energy is not None:
        picks = [select_energy(layer, opts.energy, u) for layer in layers]
    else:
        picks = [select_error(layer, opts.error, u) for layer in layers]
    return [r for r, _ in picks], [i for i, (_, starved) in enumerate(picks) if starved]


def plan(targets: list[Target], opts: Any, spectra: list[Spectrum] | None = None
         ) -> tuple[list[Choice], float]:
    """Spectra (computed, or the given ones), ranks and factors for ``targets``; also the
    seconds spent decomposing."""
    started = time.perf_counter()
    randomized = opts.method == "randomized"
    counts = []
    for t in targets:
        n, k = t.w.shape
        counts.append(_first_count(opts, n, k) if randomized else min(n, k))
    if spectra is not None:
        counts = [max(c, len(s.s)) for c, s in zip(counts, spectra)]

    def spectrum(i: int) -> Spectrum:
        t = targets[i]
        if opts.rank is not None and select_fixed(Layer(*t.w.shape, np.zeros(0), 0.0),
                                                  opts.rank, opts.round_to) is None:
            m = t.w if t.lower is None else t.w @ t.lower  # stays dense: no decomposition
            empty = np.zeros((t.w.shape[0], 0)), np.zeros(0), np.zeros((0, t.w.shape[1]))
            return Spectrum(*empty, float(np.sum(np.square(m, dtype=np.float64))), t.lower)
        return decompose(t.w, rank=counts[i], method=opts.method, oversample=opts.oversample,
                         power_iters=opts.power_iters, lower=t.lower)

    spectra = list(spectra) if spectra is not None else [spectrum(i) for i in range(len(targets))]
    while True:
        layers = [Layer(*t.w.shape, s.s, s.total, t.weight) for t, s in zip(targets, spectra)]
        ranks, starved = _select(opts, layers)
        if not starved:
            break
        for i in starved:  # the selection needs more of these spectra: double the sketch
            n, k = targets[i].w.shape
            counts[i] = min(min(n, k), max(2 * counts[i], counts[i] + 1))
            spectra[i] = spectrum(i)
    seconds = time.perf_counter() - started
    choices = []
    for t, s, r in zip(targets, spectra, ranks):
        choice = Choice(t, r, s)
        if r is not None:
            choice.a, choice.b = s.factors(r)
            choice.row = layer_row(choice)
        choices.append(choice)
    return choices, seconds


def layer_row(choice: Choice) -> dict[str, Any]:
    """The report row of a factored layer (see ``PassResult.layers``)."""
    t, s, r = choice.target, choice.spectrum, choice.rank
    n, k = t.w.shape
    layer = Layer(n, k, s.s, s.total)
    curve = sorted({max(1, round(f * len(s.s))) for f in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)}
                   | {r})
    return {
        "layer": t.name,
        "shape": f"{n}x{k}",
        "rank": int(r),
        "max_rank": min(n, k),
        "break_even_rank": max_rank(n, k),
        "energy_kept": layer.energy(r) / max(s.total, 1e-300),
        "params_before": n * k,
        "params_after": r * (n + k),
        "predicted_error": math.sqrt(layer.rel_error2(r)),
        "output_error": relative_error(t.w, choice.a, choice.b, t.rows),
        "output_error_on": "calibration" if t.rows is not None and len(t.rows) else "weight",
        "whitened": t.lower is not None,
        "spectrum": [float(v) for v in s.s[:MAX_SPECTRUM]],
        "error_curve": [[q * (n + k) / (n * k), math.sqrt(layer.rel_error2(q))] for q in curve],
    }

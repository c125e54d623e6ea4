"""factor-low-rank: replace a linear layer's constant weight by a rank-``r`` product of two thin
factors, ``y = x·Wᵀ + b ≈ (x·Bᵀ)·Aᵀ + b`` with ``A`` ``[N, r]``, ``B`` ``[r, K]``, only where it
saves parameters (``r·(N + K) < N·K``).

The factors come from the truncated SVD of ``W`` (exact or randomized), or of ``W·L`` with
``LLᵀ`` the damped second moment ``E[xxᵀ]`` of the layer's calibration inputs
(activation-aware: minimises the layer's output error on those inputs rather than the weight
error); math in ``_svd``. Ranks are fixed, per-layer energy or error bounds, or a global
parameter budget allocated by marginal error per parameter (``_rank``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from graphpress.graph.errors import PassSpecError, PostconditionError, PreconditionError

from .._collect import collect
from .._linears import LinearSite, find_linears
from .._rewrite import require_canonical, value_names
from ..base import Pass, PassResult
from ..calibrate import CalibrationTable
from ..quantize._gptq import InputStats
from ..registry import register
from ._plan import Target, plan
from ._rank import Layer, max_rank
from ._sensitivity import sensitivities
from ._svd import whitening

__all__ = ["FactorLowRank"]

logger = logging.getLogger(__name__)


@register
@dataclass(frozen=True)
class FactorLowRank(Pass):
    """Factor linear layers into two thin ones by (activation-aware) truncated SVD.

    **Rules**
      1. FX ``aten.linear(x, W, b)`` → ``aten.linear(aten.linear(x, B), A, b)``; FX
         ``addmm(b, x, W[K, N])`` → ``addmm(b, mm(x, Bᵀ), Aᵀ)`` (``mm``/``matmul`` alike; the
         weight may come through ``t``/``permute``).
      2. ONNX ``MatMul(x, W[K, N])`` → ``MatMul(MatMul(x, Bᵀ), Aᵀ)`` (a bias ``Add`` after it is
         untouched); ``Gemm(x, W, C)`` (``transA = 0``, ``transB`` either way) →
         ``Gemm(MatMul(x, Bᵀ), A, C)`` with the same ``alpha``/``beta``/``transB``.
      3. A layer is factored only when its rank ``r ≤ ⌊(N·K − 1)/(N + K)⌋``; ranks come from
         exactly one of ``rank``, ``energy``, ``error`` (per layer) or ``budget`` (global),
         rounded to multiples of ``round_to``.
      4. ``activation_aware``: factors of ``W·L`` with ``LLᵀ = E[xxᵀ] + λI`` from the
         calibration batches, ``B ← B·L⁻¹``.
      5. Skipped: weights read by several products (tied), names matching ``exclude``
         (fnmatch, node or weight name), ``min(N, K) < min_features``.
      6. ``sensitivity`` (with ``budget``): each layer's relative error is weighted by its
         measured effect on the graph outputs (``_sensitivity``) before the allocation.

    **Requires** FX graphs in the aten dialect; calibration batches when ``activation_aware``
    or ``sensitivity``. **Ensures** every factor pair holds fewer parameters than the weight it
    replaced; the graph interface is unchanged; no existing tensor is modified.
    """

    name: ClassVar[str] = "factor-low-rank"
    rank: int | None = None
    energy: float | None = None
    error: float | None = None
    budget: float | None = None
    method: Literal["svd", "randomized"] = "svd"
    oversample: int = 10
    power_iters: int = 4
    round_to: int = 1
    activation_aware: bool = False
    damp: float = 0.01
    sensitivity: bool = False
    exclude: tuple[str, ...] = ()
    min_features: int = 16

    accepts_calibration: ClassVar[bool] = True  # needed only when activation_aware

    def __post_init__(self) -> None:
        modes = {k: getattr(self, k) for k in ("rank", "energy", "error", "budget")}
        given = [k for k, v in modes.items() if v is not None]
        if len(given) != 1:
            raise PassSpecError(
                f"factor-low-rank needs exactly one of rank, energy, error, budget (got "
                f"{', '.join(given) or 'none'}), e.g. factor-low-rank:budget=0.75")
        if self.rank is not None and self.rank < 1:
            raise PassSpecError(f"factor-low-rank: rank={self.rank} must be >= 1")
        for key in ("energy", "budget"):
            value = modes[key]
            if value is not None and not 0.0 < value < 1.0:
                raise PassSpecError(f"factor-low-rank: {key}={value} must be in (0, 1)")
        if self.error is not None and not 0.0 < self.error < 1.0:
            raise PassSpecError(f"factor-low-rank: error={self.error} must be in (0, 1)")
        if self.round_to < 1 or self.oversample < 0 or self.power_iters < 0:
            raise PassSpecError("factor-low-rank: round_to >= 1, oversample >= 0 and "
                                "power_iters >= 0 are required")
        if self.damp <= 0.0:
            raise PassSpecError(f"factor-low-rank: damp={self.damp} must be > 0")
        if self.sensitivity and self.budget is None:
            raise PassSpecError("factor-low-rank: sensitivity=true weights the global budget; "
                                "use it with budget=...")

    def requires(self, graph) -> None:
        require_canonical(graph)

    def run_onnx(self, model, calibration: Any = None) -> PassResult:
        return self._run(model, calibration)

    def run_fx(self, gm, calibration: Any = None) -> PassResult:
        result = self._run(gm, calibration)
        if result.modified:
            gm.recompile()
        return result

    def _apply(self, graph, site: LinearSite, a: np.ndarray, b: np.ndarray,
               taken: dict[int, set[str]]) -> None:
        """Rules 1-2 on ``graph`` (``taken``: the ONNX value names in use, per graph)."""
        if isinstance(site.node, ir.Node):
            from ._apply_onnx import factor_onnx

            names = taken.setdefault(id(graph), value_names(graph))
            factor_onnx(graph, site, a, b, self.name, names)
        else:
            from ._apply_fx import factor_fx

            factor_fx(graph, site, a, b, self.name)

    def _run(self, graph, calibration: Any) -> PassResult:
        needs_inputs = self.activation_aware or self.sensitivity
        if needs_inputs and (calibration is None or isinstance(calibration, CalibrationTable)):
            raise PreconditionError(
                "factor-low-rank: activation_aware=true and sensitivity=true need calibration "
                "batches (raw inputs, not a CalibrationTable): call optimize(graph, passes, "
                "calibration=batches)")
        start = time.perf_counter()
        sites = find_linears(graph, exclude=self.exclude)
        shared = sum(s.shared for s in sites)
        todo: list[tuple[LinearSite, np.ndarray]] = []
        index: dict[int, int] = {}  # position among find_linears(graph, exclude)
        for position, site in enumerate(sites):
            if site.shared:  # Rule 5
                continue
            w = site.weight_nk(graph)
            if min(w.shape) >= self.min_features and max_rank(*w.shape) >= 1:
                index[id(site)] = position
                todo.append((site, w))
        stats_by_x = self._input_stats(graph, calibration, [s for s, _ in todo])
        lowers: dict[str, np.ndarray] = {}
        targets = []
        for site, w in todo:
            x_stats = stats_by_x.get(site.x)
            lower = None
            if self.activation_aware and x_stats is not None:  # Rule 4
                if site.x not in lowers:
                    lowers[site.x] = whitening(x_stats.xtx / max(x_stats.rows, 1), self.damp)
                lower = lowers[site.x]
            rows = x_stats.rows_sample() if x_stats is not None else None
            targets.append(Target(site.name, w, lower, rows))
        choices, svd_seconds = plan(targets, self)
        taken: dict[int, set[str]] = {}
        if self.sensitivity and todo:  # Rule 6: re-allocate with measured layer weights
            probes = []
            for (site, _), choice in zip(todo, choices):
                layer = Layer(*choice.target.w.shape, choice.spectrum.s, choice.spectrum.total)
                probe = choice.rank or min(len(layer.s), max(1, max_rank(layer.n, layer.k) // 2))
                a, b = choice.spectrum.factors(probe)
                probes.append((index[id(site)], a, b, layer.rel_error2(probe)))
            weights = sensitivities(graph, calibration, self.exclude, probes,
                                    lambda g, site, a, b: self._apply(g, site, a, b, {}))
            for target, weight in zip(targets, weights):
                target.weight = weight
            choices, more = plan(targets, self, [c.spectrum for c in choices])
            svd_seconds += more
        rows, before, after = [], 0, 0
        for (site, w), choice in zip(todo, choices):
            before += w.size
            if choice.rank is None:
                after += w.size
                continue
            self._apply(graph, site, choice.a, choice.b, taken)  # Rules 1-2
            after += choice.rank * sum(w.shape)
            rows.append({**choice.row, "sensitivity": choice.target.weight}
                        if self.sensitivity else choice.row)
        stats = {
            "linears_factored": len(rows),
            "linears_considered": len(todo),
            "skipped_shared": shared,
            "params_before": before,
            "params_after": after,
            "params_saved": before - after,
            "param_ratio": after / before if before else 1.0,
            "svd_seconds": svd_seconds,
            "seconds": time.perf_counter() - start,
        }
        if rows:
            stats["output_error_mean"] = float(np.mean([r["output_error"] for r in rows]))
            stats["rank_mean"] = float(np.mean([r["rank"] for r in rows]))
        return PassResult(graph, bool(rows), stats, layers=tuple(rows))

    def _input_stats(self, graph, calibration: Any, sites: list[LinearSite]
                     ) -> dict[str, InputStats]:
        """Streamed second moments and row samples of the sites' inputs (one per input)."""
        if calibration is None or isinstance(calibration, CalibrationTable) or not sites:
            return {}  # a table (meant for insert-qdq) holds ranges, not inputs
        found: dict[str, InputStats] = {}

        def consume(name: str, array: np.ndarray) -> None:
            if name not in found:
                found[name] = InputStats(array.shape[-1], max_rows=1024,
                                         need_hessian=self.activation_aware)
            found[name].update(array)

        collect(graph, calibration, sorted({s.x for s in sites}), consume)
        return found

    def ensures(self, graph) -> None:
        sites = {id(s.node): s for s in find_linears(graph)}
        for site in sites.values():
            if not site.name.replace("_", ".").endswith(".lowrank.a"):
                continue
            a = site.weight_nk(graph)
            x = site.node.args[1 if site.layout == "addmm" else 0] if hasattr(
                site.node, "args") else site.node.inputs[0].producer()
            first = sites.get(id(x))
            if first is None:
                raise PostconditionError(f"factor-low-rank: {site.name} is not fed by its "
                                         "first factor")
            (n, r), k = a.shape, first.weight_nk(graph).shape[1]
            if r * (n + k) >= n * k:
                raise PostconditionError(
                    f"factor-low-rank: {site.name} has rank {r} on a {n}x{k} layer, which "
                    "saves no parameters")

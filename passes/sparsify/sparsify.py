"""sparsify: zero a fraction of every linear weight (unstructured or N:M), optionally
activation-aware.

Every targeted linear weight ``W`` ``[N, K]`` (``passes._linears``: FX ``aten.linear``/``addmm``/
``mm``/``matmul``, ONNX ``MatMul``/``Gemm``) becomes ``Ŵ = M ⊙ W`` for a keep-mask ``M`` chosen on
scores ``|W|`` or, activation-aware, ``|W|·‖x‖`` (Wanda; masks and math: ``_masks``). The new
dense tensor is bound in place of the old one, so the graph keeps its ops and runs in ONNX
Runtime unchanged. ORT stores and runs the dense tensor: the report's byte column is the
dense size, and the stats give, beside it, the bytes of the cheapest compressed storage form
(``_storage``: CSR, bitmask, N:M values + metadata; ``format_<name>`` counts the layers whose
cheapest form it is) that a sparse runtime would hold.

Zeros survive later quantization exactly, symmetric or asymmetric (``insert-qdq``,
``quantize-dynamic``, ``quantize-weights``): round-to-nearest widens each range to contain 0,
so a zero weight gets the zero point's code and dequantizes to exactly 0; GPTQ holds exact
zeros at the zero point and spreads that error over the other columns (``_gptq``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from graphpress.graph.errors import PassSpecError, PreconditionError

from .._collect import collect
from .._linears import LinearSite, find_linears, replace_weight
from .._rewrite import require_canonical
from ..base import Pass, PassResult
from ..calibrate import CalibrationTable
from ..registry import register
from ._masks import (
    ActivationStats,
    global_masks,
    importance,
    layer_mask,
    nm_mask,
    parse_pattern,
    relative_error,
)
from ._storage import smallest, storage_bytes

__all__ = ["Sparsify"]

logger = logging.getLogger(__name__)


@register
@dataclass(frozen=True)
class Sparsify(Pass):
    """Zero a fraction of every linear weight: unstructured (per layer/row or global) or N:M.

    **Rules**
      1. Every linear site with a constant 2-D float weight (``passes._linears``) whose ``N``
         and ``K`` are both ≥ ``min_features`` and that no name in ``exclude`` (fnmatch, weight
         or node name) matches gets ``Ŵ = M ⊙ W``, bound as a new constant
         ``<weight>.sparse`` (the old one goes when nothing reads it).
      2. ``pattern=unstructured``: ``scope=layer`` zeroes ``round(p·N·K)`` weights of each
         layer, ``scope=row`` ``round(p·K)`` of each output row (Wanda's comparison group),
         ``scope=global`` the ``round(p·Σ N·K)`` smallest scores of all targeted layers
         together, so layers get different sparsities. ``normalize=mean`` divides each
         layer's scores by their mean first (the default, ``auto``, does so only for
         activation-aware scores, whose scale differs between layers with the activations':
         on all-MiniLM-L6-v2 at 50%, cosine 0.872 normalised vs 0.740 raw; raw magnitudes
         0.760 vs 0.751 normalised).
      3. ``pattern=N:M`` (2:4, 4:8, any ``0 < N < M``): every group of ``M`` consecutive
         weights of a row along ``K`` keeps its ``N`` best; ``K`` not a multiple of ``M`` is
         zero-padded, the pad counting as pruned. ``sparsity`` is implied (``1 − N/M``).
      4. ``activation_aware``: scores ``|W_ij|·‖x_j‖₂`` with ``‖x_j‖`` streamed over the
         calibration batches at the layer's input; otherwise ``|W_ij|``.
      5. A weight read by anything else (tied weights, a second product, a graph output) is
         skipped: sparsifying it for one reader would change the others or duplicate it.
      6. A mask that zeroes nothing that was non-zero leaves the site untouched (no-op).

    **Requires** calibration batches for ``activation_aware`` (``optimize(...,
    calibration=batches)``; a ``CalibrationTable`` holds no activation norms); without it,
    calibration batches given are used only to measure each layer's output error.
    **Ensures** the graph interface and op sequence are unchanged.
    """

    name: ClassVar[str] = "sparsify"
    accepts_calibration: ClassVar[bool] = True
    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: Literal["layer", "row", "global"] = "layer"
    activation_aware: bool = False
    exclude: tuple[str, ...] = ()
    min_features: int = 16
    normalize: Literal["auto", "none", "mean"] = "auto"

    def __post_init__(self) -> None:
        try:
            nm = parse_pattern(self.pattern)
        except ValueError as exc:
            raise PassSpecError(f"sparsify: {exc}") from None
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise PassSpecError(f"sparsify: sparsity={self.sparsity} must be in [0, 1)")
        if nm is not None:
            implied = 1.0 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise PassSpecError(
                    f"sparsify: pattern={self.pattern} means sparsity {implied:g}, not "
                    f"{self.sparsity:g}; drop the sparsity option or pick another N:M")
            if self.scope != "layer":
                raise PassSpecError(f"sparsify: pattern={self.pattern} keeps {nm[0]} of every "
                                    f"{nm[1]} weights; scope={self.scope} applies to "
                                    "unstructured sparsity only")
        if self.normalize != "auto" and self.scope != "global":
            raise PassSpecError(f"sparsify: normalize={self.normalize} applies to scope=global "
                                "only (one threshold across layers)")
        if self.min_features < 1:
            raise PassSpecError(f"sparsify: min_features={self.min_features} must be ≥ 1")

    @property
    def target(self) -> float:
        """The sparsity aimed at: ``sparsity``, 0.5 by default, ``1 − N/M`` for N:M."""
        nm = parse_pattern(self.pattern)
        if nm is not None:
            return 1.0 - nm[0] / nm[1]
        return 0.5 if self.sparsity is None else self.sparsity

    def run_fx(self, gm, calibration: Any = None) -> PassResult:
        require_canonical(gm)
        return self._run(gm, calibration)

    def run_onnx(self, model, calibration: Any = None) -> PassResult:
        return self._run(model, calibration)

    def _run(self, graph, calibration: Any) -> PassResult:
        start = time.perf_counter()
        no_inputs = calibration is None or isinstance(calibration, CalibrationTable)
        if self.activation_aware and no_inputs:
            raise PreconditionError(
                "sparsify: activation_aware=true needs calibration batches (raw inputs, not a "
                "CalibrationTable): optimize(graph, passes, calibration=batches), or set "
                "activation_aware=false")
        stats: dict[str, float] = {"linears_sparsified": 0, "skipped_shared": 0, "skipped_small": 0}
        chosen: list[tuple[LinearSite, np.ndarray]] = []
        for site in find_linears(graph, exclude=self.exclude):
            w = site.weight_nk(graph)
            if site.shared:  # Rule 5
                stats["skipped_shared"] += 1
            elif min(w.shape) < self.min_features:
                stats["skipped_small"] += 1
            else:
                chosen.append((site, w))
        acts = self._activations(graph, chosen, calibration)
        masks = self._masks(chosen, acts)
        nm = parse_pattern(self.pattern)
        rows, kept, total, dense, compressed, errors = [], 0, 0, 0, 0, []
        formats: dict[str, int] = {}
        for (site, w), keep in zip(chosen, masks):
            w_hat = np.where(keep, w, np.zeros((), w.dtype))
            if np.array_equal(w_hat, w):  # Rule 6
                continue
            sizes = storage_bytes(keep, _itemsize(graph, site, w), nm)
            fmt, size = smallest(sizes)
            sample = acts[site.x].sample() if site.x in acts else None
            error = relative_error(w, w_hat, sample)
            replace_weight(graph, site, w_hat, self.name, "sparse")  # Rule 1
            stats["linears_sparsified"] += 1
            kept, total = kept + int(keep.sum()), total + keep.size
            dense, compressed = dense + sizes["dense"], compressed + size
            errors.append(error)
            formats[fmt] = formats.get(fmt, 0) + 1
            rows.append({"layer": site.name, "shape": list(w.shape),
                         "sparsity": 1.0 - float(keep.mean()), "pattern": self.pattern,
                         "dense_bytes": sizes["dense"], "compressed_bytes": size,
                         "compressed_format": fmt, "output_error": error})
        stats.update(sparsity_achieved=1.0 - kept / total if total else 0.0, dense_bytes=dense,
                     compressed_bytes=compressed,
                     compressed_ratio=dense / compressed if compressed else 1.0,
                     output_error_mean=float(np.mean(errors)) if errors else 0.0,
                     error_on_calibration=float(bool(acts)))
        for fmt in sorted(formats):  # stats are numbers: the format is named in the key
            stats[f"format_{fmt}"] = formats[fmt]
        stats["seconds"] = time.perf_counter() - start
        return PassResult(graph, stats["linears_sparsified"] > 0, stats, layers=tuple(rows))

    def _activations(self, graph, chosen, calibration) -> dict[str, ActivationStats]:
        """Rule 4: ``Σx²`` and sample rows at every targeted layer's input."""
        if calibration is None or isinstance(calibration, CalibrationTable) or not chosen:
            return {}
        found = {site.x: ActivationStats(w.shape[1]) for site, w in chosen}

        def consume(name: str, array: np.ndarray) -> None:
            found[name].update(array)

        collect(graph, calibration, sorted(found), consume)
        return found

    def _masks(self, chosen, acts) -> list[np.ndarray]:
        """Rules 2-4: one keep-mask per chosen site."""
        scores = [importance(w, acts[site.x].norms if self.activation_aware else None)
                  for site, w in chosen]
        nm = parse_pattern(self.pattern)
        if nm is not None:
            return [nm_mask(s, *nm) for s in scores]
        if self.scope == "global":
            normalize = self.normalize == "mean" or (
                self.normalize == "auto" and self.activation_aware)
            return global_masks(scores, self.target, normalize=normalize)
        return [layer_mask(s, self.target, per_row=self.scope == "row") for s in scores]


def _itemsize(graph, site: LinearSite, w: np.ndarray) -> int:
    """Bytes per stored value (a bfloat16 FX weight reads as float32 but stores 2 bytes)."""
    from torch import fx

    from graphpress.graph.fx import get_tensor

    if isinstance(site.source, fx.Node):
        return get_tensor(graph, site.source).element_size()
    return w.dtype.itemsize

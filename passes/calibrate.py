"""Calibration: the ranges of a graph's activations on real inputs, as a checkable value.

:func:`calibrate` streams the target values over the batches (``_collect.collect``: an FX
Interpreter, or ONNX Runtime with the targets exposed as outputs in chunks), keeps bounded
streaming statistics per value (``_histogram.Accumulator``: min/max, optionally as a moving
average, a fixed-size histogram, non-finite count) and lets a method choose each range:
``minmax``, ``percentile``, ``entropy`` (KL) or ``mse`` (math in ``passes/_histogram.py``).
With ``symmetric=True`` a range ``(lo, hi)`` becomes ``(-m, m)``, ``m = max(|lo|, |hi|)``.

The result is a :class:`CalibrationTable`: a frozen value that can be saved to JSON, loaded,
re-decided with another method from the stored histograms (:meth:`CalibrationTable.with_method`)
and checked against the graph it is applied to (:meth:`CalibrationTable.check`).

Default targets (:func:`activation_targets`) are the float activations that feed the ops a
runtime quantizes (MatMul/Gemm/Conv; FX ``aten.linear/matmul/mm/bmm/addmm/convolution``), not
weights (values computed from constants only) and not mask/arithmetic paths.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from graphpress.graph.errors import PreconditionError
from graphpress.graph.kind import Graph, kind

from ._collect import collect
from ._histogram import METHODS, Accumulator, choose_range
from ._table_io import CalibrationFileError, load_table, save_table
from ._targets import activation_targets, graph_names

__all__ = [
    "ValueStats",
    "CalibrationTable",
    "CalibrationFileError",
    "calibrate",
    "activation_targets",
    "METHODS",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueStats:
    """Streaming statistics of one value over all batches.

    ``minimum``/``maximum`` are the min-max statistic (an exponential moving average of the
    per-batch extremes when a momentum was given); ``nonfinite`` counts the dropped ±inf/NaN
    and ``|x| ≥ drop_above`` entries; ``histogram`` holds counts over ``[hist_lo, hist_hi]``
    (the global finite extremes). ``channel_min``/``channel_max`` are per channel of the axis
    given to :func:`calibrate` (``channel_axis``), else None.
    """

    name: str
    count: int
    minimum: float
    maximum: float
    nonfinite: int
    histogram: tuple[float, ...] | None
    hist_lo: float
    hist_hi: float
    channel_min: tuple[float, ...] | None = None
    channel_max: tuple[float, ...] | None = None


@dataclass(frozen=True)
class CalibrationTable:
    """Chosen ranges and the statistics behind them, for a graph of one ``kind``."""

    kind: str
    method: str
    ranges: Mapping[str, tuple[float, float]]
    stats: Mapping[str, ValueStats]
    options: Mapping[str, float | str] = field(default_factory=dict)

    def range(self, name: str) -> tuple[float, float]:
        """The ``(lo, hi)`` chosen for ``name``; PreconditionError if it was not calibrated."""
        try:
            return self.ranges[name]
        except KeyError:
            raise PreconditionError(
                f"the calibration table has no range for {name!r}; calibrate with "
                f"targets including it (the table has {len(self.ranges)} values)"
            ) from None

    def check(self, graph: Graph, names: Iterable[str] | None = None) -> None:
        """Raise PreconditionError listing the table's values missing from ``graph`` and the
        requested ``names`` missing from the table (a stale table)."""
        if kind(graph) != self.kind:
            raise PreconditionError(
                f"the calibration table was made on a {self.kind} graph but is applied to a "
                f"{kind(graph)} graph; calibrate the graph you quantize"
            )
        present = graph_names(graph)
        absent = sorted(n for n in self.ranges if n not in present)
        unknown = sorted({n for n in names or () if n not in self.ranges})
        if absent or unknown:
            parts = []
            if absent:
                parts.append(f"{len(absent)} calibrated values are not in the graph: "
                             f"{_listing(absent)}")
            if unknown:
                parts.append(f"{len(unknown)} values needed are not in the table: "
                             f"{_listing(unknown)}")
            raise PreconditionError(
                "stale calibration table: " + "; ".join(parts)
                + ". Re-run calibrate() on this graph (after the passes that rename values)"
            )

    def with_method(self, method: str, **options: Any) -> CalibrationTable:
        """The same statistics with ranges chosen by ``method`` (no re-run of the model)."""
        fixed = sorted(set(options) - {"percentile", "symmetric", "bits"})
        if fixed:
            raise PreconditionError(
                f"with_method can change percentile, symmetric and bits, not {fixed}: these "
                "shape the stored statistics; calibrate again to change them"
            )
        merged = {**self.options, **options}
        _check_options(method, merged)
        ranges = {name: _decide(s, method, merged) for name, s in self.stats.items()}
        return replace(self, method=method, ranges=ranges, options=merged)

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON atomically (temporary file, then ``os.replace``)."""
        return save_table(self, path)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationTable:
        """Read a table written by :meth:`save`; CalibrationFileError if missing or corrupt."""
        return load_table(cls, ValueStats, path)


def calibrate(
    graph: Graph,
    batches: Iterable[Any],
    *,
    method: str = "minmax",
    targets: Iterable[str] | None = None,
    percentile: float = 99.99,
    bins: int = 2048,
    momentum: float | None = None,
    symmetric: bool = False,
    progress: bool = False,
    chunk_size: int = 64,
    bits: int = 8,
    channel_axis: int | None = None,
    drop_above: float = 1e30,
) -> CalibrationTable:
    """Run ``graph`` on ``batches`` and return the ranges of ``targets`` chosen by ``method``.

    ``targets`` are ONNX value names or FX node names (default :func:`activation_targets`).
    ``momentum`` (e.g. 0.9) averages the per-batch extremes exponentially; ``bits`` sets the
    levels entropy/mse optimise for; ``channel_axis`` also records per-channel extremes.
    """
    options: dict[str, Any] = {"percentile": float(percentile), "bins": int(bins),
                               "symmetric": bool(symmetric), "bits": int(bits),
                               "drop_above": float(drop_above)}
    if momentum is not None:
        options["momentum"] = float(momentum)
    if channel_axis is not None:
        options["channel_axis"] = int(channel_axis)
    _check_options(method, options)
    names = list(dict.fromkeys(activation_targets(graph) if targets is None else targets))
    if not names:
        raise PreconditionError(
            "nothing to calibrate: the graph has no float activations feeding MatMul/Gemm/Conv; "
            "pass targets=[...] naming the values to calibrate"
        )
    accumulators = {n: Accumulator(int(bins), momentum, channel_axis, float(drop_above))
                    for n in names}
    collect(graph, batches, names, lambda name, array: accumulators[name].add(array),
            chunk_size=chunk_size, progress=progress)
    stats = {name: _freeze(name, acc) for name, acc in accumulators.items()}
    empty = [n for n, s in stats.items() if s.count == 0]
    if empty:
        logger.warning("no finite values seen for %d targets: %s", len(empty), _listing(empty))
    ranges = {name: _decide(s, method, options) for name, s in stats.items()}
    return CalibrationTable(kind(graph), method, ranges, stats, options)


def _check_options(method: str, options: Mapping[str, Any]) -> None:
    if method not in METHODS:
        raise PreconditionError(f"unknown calibration method {method!r}; use one of {METHODS}")
    if not 0 < float(options.get("percentile", 99.99)) <= 100:
        raise PreconditionError("percentile must be in (0, 100], e.g. 99.99")
    if int(options.get("bins", 2048)) < 16:
        raise PreconditionError("bins must be at least 16 (2048 is the usual choice)")
    if not 2 <= int(options.get("bits", 8)) <= 16:
        raise PreconditionError("bits must be between 2 and 16")
    momentum = options.get("momentum")
    if momentum is not None and not 0 <= float(momentum) < 1:
        raise PreconditionError("momentum must be in [0, 1), e.g. 0.9, or None for plain min-max")


def _freeze(name: str, acc: Accumulator) -> ValueStats:
    def floats(a):
        return None if a is None else tuple(float(v) for v in a)

    return ValueStats(name, acc.count, float(acc.minimum), float(acc.maximum), acc.nonfinite,
                      floats(acc.hist), float(acc.lo), float(acc.hi),
                      floats(acc.channel_min), floats(acc.channel_max))


def _decide(stats: ValueStats, method: str, options: Mapping[str, Any]) -> tuple[float, float]:
    lo, hi = choose_range(method, stats.histogram, stats.hist_lo, stats.hist_hi, stats.minimum,
                          stats.maximum, percentile=float(options.get("percentile", 99.99)),
                          bits=int(options.get("bits", 8)))
    if options.get("symmetric"):
        m = max(abs(lo), abs(hi))
        return -m, m
    return float(lo), float(hi)


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


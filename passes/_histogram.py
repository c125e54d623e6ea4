"""Streaming statistics of one value and the range choosers of calibration (IR-free math).

**Accumulation.** Each batch ``x`` first loses its non-finite entries and those with
``|x| ≥ drop_above`` (default 1e30: the float32-min ``-3.4e38`` an attention mask adds to
masked scores); they are only counted. The finite rest updates

* the min-max statistic: ``m ← min(x)`` on the first batch, then ``m ← min(m, min(x))`` or, with a
  momentum ``μ``, the exponential moving average ``m ← μ·m + (1-μ)·min(x)`` (same for max);
* a histogram of ``bins`` equal bins over ``[lo, hi]``: when a batch leaves the range, the range
  widens to the new extremes and the old counts are re-binned proportionally (the cumulative
  count ``F`` is piecewise linear inside a bin; new bin counts are ``F(e'_{k+1}) - F(e'_k)``).
  Memory is ``O(bins)`` whatever the number of batches, and the final range is the global
  ``[min, max]``, exactly as if all data came in one batch.

**Range choosers** (``h`` the histogram, ``L`` the quantization levels, ``2^b - 1``):

* percentile ``p``: the quantiles ``(1-p)/2`` and ``1-(1-p)/2`` of the interpolated
  cumulative histogram (signed data), or ``[min, quantile p]`` for non-negative data.
* entropy (KL, TensorRT style): on the histogram of ``|x|``, for each candidate threshold ``T``
  (bin edge ``i ≥ L_h``, ``L_h = 2^(b-1) - 1`` for signed data, ``2^b - 1`` otherwise) the
  reference ``P`` is ``h[:i]`` with the outliers ``Σ h[i:]`` added to the last bin and ``Q`` is
  ``h[:i]`` merged into ``L_h`` groups, each spread evenly over its non-empty bins; choose the
  ``T`` minimising ``KL(P‖Q)``.
* mse: for each candidate ``T`` the clipped range ``[a, b] = [max(lo, -T), min(hi, T)]`` has step
  ``Δ = (b - a)/L``; the expected squared error over the histogram (bin centres ``c``) is
  ``Σ n·(c - clip(c, a, b))² + Σ_{a≤c≤b} n·Δ²/12`` (clipping + uniform rounding); minimise it.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

__all__ = ["Accumulator", "choose_range", "METHODS"]

logger = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")
_MAX_CANDIDATES = 512


class Accumulator:
    """Running min/max, non-finite count, bounded histogram and optional per-channel extremes."""

    def __init__(self, bins: int, momentum: float | None, axis: int | None, drop_above: float):
        self.bins, self.momentum, self.axis, self.drop_above = bins, momentum, axis, drop_above
        self.count = self.nonfinite = 0
        self.minimum = self.maximum = 0.0
        self.hist: np.ndarray | None = None
        self.lo = self.hi = 0.0
        self.channel_min: np.ndarray | None = None
        self.channel_max: np.ndarray | None = None

    def add(self, array: np.ndarray) -> None:
        x = np.asarray(array, dtype=np.float64)
        keep = np.isfinite(x) & (np.abs(x) < self.drop_above)
        if self.axis is not None and x.ndim:
            self._add_channels(x, keep)
        values = x[keep]
        self.nonfinite += int(x.size - values.size)
        if not values.size:
            return
        bmin, bmax = float(values.min()), float(values.max())
        first = self.count == 0
        self.count += int(values.size)
        if first:
            self.minimum, self.maximum = bmin, bmax
        elif self.momentum is not None:
            mu = self.momentum
            self.minimum = mu * self.minimum + (1 - mu) * bmin
            self.maximum = mu * self.maximum + (1 - mu) * bmax
        else:
            self.minimum, self.maximum = min(self.minimum, bmin), max(self.maximum, bmax)
        self._add_histogram(values, bmin, bmax)

    def _add_channels(self, x: np.ndarray, keep: np.ndarray) -> None:
        moved = np.moveaxis(np.where(keep, x, np.nan), self.axis, 0).reshape(x.shape[self.axis], -1)
        with warnings.catch_warnings():  # a channel with no finite value gives NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            cmin, cmax = np.nanmin(moved, axis=1), np.nanmax(moved, axis=1)
        if self.channel_min is None:
            self.channel_min, self.channel_max = cmin, cmax
        elif self.channel_min.shape != cmin.shape:
            raise ValueError(
                f"channel axis {self.axis} has {cmin.size} channels in this batch but "
                f"{self.channel_min.size} before"
            )
        else:
            self.channel_min = np.fmin(self.channel_min, cmin)
            self.channel_max = np.fmax(self.channel_max, cmax)

    def _add_histogram(self, values: np.ndarray, bmin: float, bmax: float) -> None:
        if self.hist is None:
            self.lo, self.hi = bmin, bmax
            self.hist = np.zeros(self.bins)
        elif bmin < self.lo or bmax > self.hi:
            lo, hi = min(self.lo, bmin), max(self.hi, bmax)
            self.hist = rebin(self.hist, self.lo, self.hi, lo, hi)
            self.lo, self.hi = lo, hi
        lo, width = self.lo, _width(self.lo, self.hi)
        index = ((values - lo) * (self.bins / width)).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.hist += np.bincount(index, minlength=self.bins)


def _width(lo: float, hi: float) -> float:
    """Histogram width; a constant value gets a tiny non-zero width."""
    return hi - lo if hi > lo else max(abs(lo), 1.0) * 1e-7


def _edges(lo: float, hi: float, bins: int) -> np.ndarray:
    return lo + _width(lo, hi) * np.arange(bins + 1) / bins


def rebin(hist: np.ndarray, lo: float, hi: float, new_lo: float, new_hi: float) -> np.ndarray:
    """Counts of ``hist`` over ``[lo, hi]`` moved onto the same number of bins over the new range."""
    cumulative = np.concatenate([[0.0], np.cumsum(hist)])
    new_cumulative = np.interp(_edges(new_lo, new_hi, hist.size), _edges(lo, hi, hist.size),
                               cumulative, left=0.0, right=cumulative[-1])
    return np.diff(new_cumulative)


def choose_range(method: str, hist, lo: float, hi: float, minimum: float, maximum: float, *,
                 percentile: float = 99.99, bits: int = 8) -> tuple[float, float]:
    """The ``(lo, hi)`` range ``method`` picks from the statistics of one value."""
    if method == "minmax" or hist is None or hi <= lo or not np.any(hist):
        return float(minimum), float(maximum)
    hist = np.asarray(hist, dtype=np.float64)
    if method == "percentile":
        return _percentile(hist, lo, hi, percentile)
    magnitude, top = _magnitudes(hist, lo, hi)
    if method == "entropy":
        levels = 2 ** (bits - 1) - 1 if lo < 0 else 2**bits - 1
        threshold = _entropy(magnitude, top, levels)
    elif method == "mse":
        threshold = _mse(hist, lo, hi, top, 2**bits - 1)
    else:
        raise ValueError(f"unknown calibration method {method!r}; use one of {METHODS}")
    return max(lo, -threshold), min(hi, threshold)


def _quantile(hist: np.ndarray, lo: float, hi: float, q: float) -> float:
    cumulative = np.concatenate([[0.0], np.cumsum(hist)])
    target = q * cumulative[-1]
    k = int(np.clip(np.searchsorted(cumulative, target, side="left"), 1, hist.size))
    inside = (target - cumulative[k - 1]) / hist[k - 1] if hist[k - 1] else 0.0
    edges = _edges(lo, hi, hist.size)
    return float(edges[k - 1] + inside * (edges[k] - edges[k - 1]))


def _percentile(hist: np.ndarray, lo: float, hi: float, percentile: float) -> tuple[float, float]:
    p = percentile / 100.0
    if lo >= 0:
        return lo, _quantile(hist, lo, hi, p)
    tail = (1.0 - p) / 2.0
    return _quantile(hist, lo, hi, tail), _quantile(hist, lo, hi, 1.0 - tail)


def _magnitudes(hist: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, float]:
    """The histogram of ``|x|`` over ``[0, max(|lo|, |hi|)]`` with as many bins."""
    if lo >= 0:
        return rebin(hist, lo, hi, 0.0, hi), hi
    top = max(-lo, hi)
    cumulative = np.concatenate([[0.0], np.cumsum(hist)])
    edges, t = _edges(lo, hi, hist.size), _edges(0.0, top, hist.size)
    below = np.interp(t, edges, cumulative) - np.interp(-t, edges, cumulative)
    return np.diff(below), top


def _candidates(start: int, stop: int) -> np.ndarray:
    return np.unique(np.linspace(start, stop, min(stop - start + 1, _MAX_CANDIDATES)).astype(int))


def _entropy(magnitude: np.ndarray, top: float, levels: int) -> float:
    bins = magnitude.size
    start = min(levels, bins)
    magnitude = magnitude.copy()
    magnitude[0] = 0.0  # values next to 0 quantize to 0 at any threshold (e.g. ReLU's spike)
    best, best_i = np.inf, bins
    for i in _candidates(start, bins):
        reference = magnitude[:i]
        p = reference.copy()
        p[-1] += magnitude[i:].sum()
        group = (np.arange(i) * start) // i
        nonzero = reference > 0
        sums = np.bincount(group, weights=reference, minlength=start)
        filled = np.bincount(group, weights=nonzero, minlength=start)
        q = np.where(nonzero, sums[group] / np.maximum(filled[group], 1), 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if p_sum <= 0 or q_sum <= 0:
            continue
        p, q = p / p_sum, q / q_sum
        mask = p > 0
        divergence = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if divergence < best:
            best, best_i = divergence, i
    return top * best_i / bins


def _mse(hist: np.ndarray, lo: float, hi: float, top: float, levels: int) -> float:
    edges = _edges(lo, hi, hist.size)
    centres = (edges[:-1] + edges[1:]) / 2
    steps = _candidates(1, hist.size)
    thresholds = top * steps / hist.size
    a = np.maximum(lo, -thresholds)[:, None]
    b = np.minimum(hi, thresholds)[:, None]
    clipped = np.clip(centres[None, :], a, b)
    delta = (b - a) / levels
    inside = (centres[None, :] >= a) & (centres[None, :] <= b)
    error = (hist * (centres - clipped) ** 2).sum(1) + (hist * inside).sum(1) * delta[:, 0] ** 2 / 12
    return float(thresholds[int(np.argmin(error))])

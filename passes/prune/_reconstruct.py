"""Least-squares refit of the consumers of pruned channels (``prune-channels:reconstruct=true``).

A linear consumer ``y = W·x + b`` (``W`` ``[N, C]``) loses the input channels ``R`` of a pruned
group; the plain cut computes ``W_K·x_K + b`` and errs by ``W_R·x_R`` on every row. The removed
channels are usually correlated with the kept ones, and their mean is a constant, so refitting
the kept columns and the bias on the calibration inputs wins most of that error back
(the "reconstruction" step of one-shot structured pruning):

    min over W'_K, Δ    Σ_rows ‖W·x − (W'_K·x_K + Δ)‖²  +  λ·‖W'_K − W_K‖²

With the augmented input Gram ``G = Σ x̃·x̃ᵀ`` (``x̃ = [x; 1]``, streamed by
:class:`~graphpress.passes.quantize._gptq.InputStats`) and ``S = K ∪ {1}`` the normal
equations are

    (G_SS + λ·D)·Θᵀ = G_S,C·Wᵀ + λ·D·Θ₀ᵀ,    Θ = [W'_K, Δ],  Θ₀ = [W_K, 0],  D = diag(1, …, 1, 0)

with ``λ = damping · mean(diag G_KK)`` (the bias is not damped; ``b`` cancels out, so ``Δ`` is
added to whatever bias the consumer has). The damping pulls towards the plain cut, never past
it: ``Θ₀`` is feasible at no penalty, so the refit's calibration error is at most the cut's.
That error, ``e(Θ) = tr(W·G_CC·Wᵀ) − 2·tr(Θ·G_S,C·Wᵀ) + tr(Θ·G_SS·Θᵀ)``, is reported as the
ratio ``e(Θ) / e(Θ₀)``.

A 2-D ungrouped convolution is the same problem on its input patches (:mod:`._patches`):
``x`` is a patch row of ``C·kh·kw`` values and removing a channel removes its ``kh·kw`` columns.
Only float weights that read the whole group (``offset 0``, ``C`` = the group's size) and
nothing else are refit; quantized and tied weights, grouped, transposed and 1-D/3-D
convolutions keep the plain cut.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from torch import fx

from ._fold_bias import fx_consumer, onnx_consumer
from ._importance import unit_channels
from ._patches import ConvGeometry, conv_geometry

__all__ = ["Refit", "Site", "refit", "refit_sites", "refit_consumers"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refit:
    """A refit consumer weight (stored layout, full size: the kept columns refit, the removed
    ones as they were), the bias increment ``Δ`` and the calibration error ratio."""

    weight: np.ndarray
    bias_delta: np.ndarray
    error_ratio: float


def _trace_quadratic(a: np.ndarray, b: np.ndarray) -> float:
    """``tr(a·b·aᵀ)``."""
    return float(np.sum((a @ b) * a))


def refit(weight: np.ndarray, in_axis: int, gram: np.ndarray, kept: np.ndarray,
          damping: float) -> Refit | None:
    """Refit the columns ``kept`` of a 2-D ``weight`` (input channels along ``in_axis``) and a
    bias increment on the augmented input Gram ``gram`` (``(C+1)²``, last index = constant 1);
    ``None`` when the calibration saw no rows or the cut loses nothing."""
    w = np.moveaxis(np.asarray(weight, np.float64), in_axis, 1)  # [N, C]
    channels = w.shape[1]
    if gram.shape != (channels + 1, channels + 1) or gram[channels, channels] <= 0:
        return None
    kept = np.asarray(kept, np.int64)
    rows = np.append(kept, channels)
    g_ss, g_sc = gram[np.ix_(rows, rows)], gram[rows, :channels]
    theta0 = np.concatenate([w[:, kept], np.zeros((w.shape[0], 1))], axis=1)
    base = _trace_quadratic(w, gram[:channels, :channels])
    cross = g_sc @ w.T  # [|S|, N]

    def error(theta: np.ndarray) -> float:
        return base - 2.0 * float(np.sum(theta.T * cross)) + _trace_quadratic(theta, g_ss)

    cut = error(theta0)
    if not cut > 1e-12 * max(base, 1e-30):
        return None
    damp = np.ones(len(rows))
    damp[-1] = 0.0
    lam = damping * float(np.mean(np.diag(g_ss)[:-1])) if len(kept) else 0.0
    lhs, rhs = g_ss + lam * np.diag(damp), cross + lam * damp[:, None] * theta0.T
    try:
        theta = np.linalg.solve(lhs, rhs).T
    except np.linalg.LinAlgError:  # singular without damping: the minimum-norm solution
        theta = np.linalg.lstsq(lhs, rhs, rcond=None)[0].T
    after = error(theta)
    if not np.all(np.isfinite(theta)) or after > cut:
        return None
    out = w.copy()
    out[:, kept] = theta[:, :-1]
    return Refit(np.moveaxis(out, 1, in_axis).astype(np.asarray(weight).dtype),
                 theta[:, -1], max(after, 0.0) / cut)


def _out_axis(node) -> int | None:
    info = fx_consumer(node) if isinstance(node, fx.Node) else onnx_consumer(node)
    return None if info is None else info[0]


@dataclass(frozen=True)
class Site:
    """A consumer to refit: its ``"in"`` use, the value it reads, the key of its input
    statistics (shared by linear layers reading one value; per node for convolutions), the
    width of the rows those statistics see and, for a convolution, its geometry."""

    use: object
    input: str
    key: str
    width: int
    geometry: ConvGeometry | None = None

    def rows(self, array: np.ndarray) -> np.ndarray:
        """The consumer's input as regression rows (patches for a convolution)."""
        return array if self.geometry is None else self.geometry.patches(array)


def refit_sites(shrinker, group) -> list[Site]:
    """The consumers of ``group`` that can be refit: a linear layer, or a 2-D ungrouped
    convolution, whose float weight is read by it alone and has exactly the group's channels
    along its input axis."""
    sites = []
    for use in group.uses:
        if use.role != "in" or use.offset != 0:
            continue
        array = shrinker.array(use)
        if array is None or array.ndim < 2 or not np.issubdtype(array.dtype, np.floating):
            continue
        node = shrinker.node(use.node)
        out_axis, target = _out_axis(node), shrinker.consumer_input(use)
        in_axis = use.axis % array.ndim
        if (out_axis is None or target is None or out_axis == in_axis
                or array.shape[in_axis] != group.size or not shrinker.sole_reader(use)):
            continue
        if array.ndim == 2:
            sites.append(Site(use, target[0], target[0], group.size))
            continue
        geometry = conv_geometry(node, array)
        if geometry is not None and (out_axis, in_axis) == (0, 1):
            sites.append(Site(use, target[0], f"{target[0]}@{use.node}",
                              group.size * geometry.taps, geometry))
    return sites


def refit_consumers(shrinker, group, keep_units, sites: list[Site], grams, damping: float,
                    deltas: dict) -> list[float]:
    """Refit every site of ``group`` for the kept units: the new weight replaces the old one
    (to be sliced by the shrink that follows) and ``Δ`` joins ``deltas`` (``{node: (use,
    out axis, Δ)}``, for :func:`~._fold_bias.apply_bias_deltas` after shrinking). Returns the
    error ratio of each refit consumer."""
    kept = unit_channels(keep_units, group.unit)
    ratios = []
    for site in sites:
        stats = grams.get(site.key)
        if stats is None:
            continue
        use, node = site.use, shrinker.node(site.use.node)
        weight = shrinker.array(use)
        if site.geometry is None:
            matrix, in_axis, columns = weight, use.axis % 2, kept
        else:  # [O, C, kh, kw] -> [O, C·kh·kw]: channel c owns columns c·taps … c·taps + taps-1
            taps = site.geometry.taps
            matrix, in_axis = weight.reshape(weight.shape[0], -1), 1
            columns = (kept[:, None] * taps + np.arange(taps)[None, :]).reshape(-1)
        result = refit(matrix, in_axis, stats.augmented_gram(), columns, damping)
        if result is None:
            continue
        shrinker.replace(use, result.weight.reshape(weight.shape))
        previous = deltas[node][2] if node in deltas else 0.0
        deltas[node] = (use, _out_axis(node), previous + result.bias_delta)
        ratios.append(result.error_ratio)
    return ratios

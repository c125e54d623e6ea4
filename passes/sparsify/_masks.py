"""IR-free sparsity masks and importance scores for linear weights ``W`` ``[N, K]`` (out × in).

A mask ``M ∈ {0, 1}^{N×K}`` (``True`` = keep) gives the pruned weight ``Ŵ = M ⊙ W``. Masks keep
the entries of largest *score* ``S``:

* **magnitude**: ``S_ij = |W_ij|``;
* **activation-aware** (Wanda, Sun et al. 2023): ``S_ij = |W_ij|·‖x_j‖₂`` where
  ``‖x_j‖₂ = (Σ_t x_tj²)^½`` over the calibration tokens ``t`` feeding the layer
  (:class:`ActivationStats`). Removing ``W_ij`` changes output ``i`` on token ``t`` by
  ``−W_ij·x_tj``, whose energy over the tokens is ``W_ij²·‖x_j‖²``: the score is the root of the
  output error that pruning this one weight causes.

Patterns (``p`` = target sparsity, the fraction of zeros):

* **per layer** (:func:`layer_mask`): the ``round(p·N·K)`` entries of smallest ``S`` are zeroed
  (``per_row``: ``round(p·K)`` in every row, Wanda's per-output comparison group);
* **global** (:func:`global_masks`): one threshold over all targeted layers together: the
  ``round(p·Σ N_l·K_l)`` smallest scores of the concatenation are zeroed, so the overall
  sparsity is exact while layers get different sparsities. ``normalize=True`` compares
  ``S/mean(S)`` (each layer's scores divided by that layer's mean score), making the threshold
  scale-free across layers of different magnitudes; ``normalize=False`` compares raw scores.
* **N:M semi-structured** (:func:`nm_mask`): along the input dimension ``K`` every group of
  ``M`` consecutive weights of a row keeps its ``N`` largest scores (sparsity ``1 − N/M``;
  2:4 is what NVIDIA's sparse tensor cores run). When ``K`` is not a multiple of ``M`` the row
  is padded with zero columns to ``⌈K/M⌉·M``; the pad counts as pruned, so the last group of
  ``r = K mod M`` real weights keeps ``min(N, r)`` of them and the padded matrix is a valid
  N:M matrix (achieved sparsity slightly below ``1 − N/M``).

Ties are broken deterministically (``numpy.argpartition`` on the flattened scores), so the
number of zeros is exact whatever the values.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

__all__ = [
    "parse_pattern",
    "importance",
    "prune_count",
    "layer_mask",
    "global_masks",
    "nm_mask",
    "ActivationStats",
    "relative_error",
]

logger = logging.getLogger(__name__)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``None`` for ``"unstructured"``, ``(n, m)`` for ``"n:m"`` with ``0 < n < m``."""
    if pattern == "unstructured":
        return None
    head, sep, tail = pattern.partition(":")
    try:
        n, m = int(head), int(tail)
    except ValueError:
        n = m = 0
    if not sep or not 0 < n < m:
        raise ValueError(f"pattern {pattern!r} must be 'unstructured' or 'N:M' with 0 < N < M, "
                         "e.g. 2:4 or 4:8")
    return n, m


def importance(w: np.ndarray, x_norm: np.ndarray | None = None) -> np.ndarray:
    """``|W|`` or, with per-input-feature activation norms ``x_norm`` ``[K]``, ``|W|·‖x‖``."""
    score = np.abs(np.asarray(w, np.float64))
    if x_norm is not None:
        score = score * np.asarray(x_norm, np.float64)[None, :]
    return score


def prune_count(size: int, sparsity: float) -> int:
    """How many of ``size`` entries a sparsity of ``sparsity`` zeroes: ``round(p·size)``."""
    return int(min(size, max(0, round(sparsity * size))))


def _drop_smallest(flat: np.ndarray, count: int) -> np.ndarray:
    keep = np.ones(flat.shape, bool)
    if count >= flat.size:
        keep[:] = False
    elif count > 0:
        keep[np.argpartition(flat, count - 1)[:count]] = False
    return keep


def layer_mask(score: np.ndarray, sparsity: float, *, per_row: bool = False) -> np.ndarray:
    """Keep-mask zeroing the ``round(p·size)`` smallest scores of the layer (or of each row)."""
    if not per_row:
        return _drop_smallest(score.ravel(), prune_count(score.size, sparsity)).reshape(score.shape)
    count = prune_count(score.shape[1], sparsity)
    keep = np.ones(score.shape, bool)
    if count >= score.shape[1]:
        keep[:] = False
    elif count > 0:
        idx = np.argpartition(score, count - 1, axis=1)[:, :count]
        np.put_along_axis(keep, idx, False, axis=1)
    return keep


def global_masks(scores: Sequence[np.ndarray], sparsity: float, *,
                 normalize: bool = False) -> list[np.ndarray]:
    """Keep-masks of all layers from one threshold over their concatenated scores."""
    if not scores:
        return []
    parts = []
    for s in scores:
        flat = s.ravel()
        if normalize:
            mean = float(flat.mean()) if flat.size else 0.0
            flat = flat / mean if mean > 0 else flat
        parts.append(flat)
    whole = np.concatenate(parts)
    keep = _drop_smallest(whole, prune_count(whole.size, sparsity))
    bounds = np.cumsum([0] + [s.size for s in scores])
    return [keep[a:b].reshape(s.shape) for a, b, s in zip(bounds[:-1], bounds[1:], scores)]


def nm_mask(score: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask with ``n`` kept in every group of ``m`` consecutive entries along ``K``."""
    rows, k = score.shape
    groups = -(-k // m)
    padded = np.full((rows, groups * m), -np.inf)  # the pad is never preferred to a real weight
    padded[:, :k] = score
    blocks = padded.reshape(rows, groups, m)
    idx = np.argpartition(-blocks, n - 1, axis=-1)[..., :n]
    keep = np.zeros(blocks.shape, bool)
    np.put_along_axis(keep, idx, True, axis=-1)
    return keep.reshape(rows, groups * m)[:, :k]


class ActivationStats:
    """Running ``Σ_t x_tj²`` per input feature ``j`` and a bounded sample of input rows."""

    def __init__(self, k: int, *, max_rows: int = 1024) -> None:
        self.sum_sq = np.zeros(k)
        self.rows = 0
        self.max_rows = max_rows
        self._sample: list[np.ndarray] = []
        self._sampled = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, self.sum_sq.shape[0])
        x = x[np.isfinite(x).all(axis=1)]
        self.sum_sq += np.einsum("tj,tj->j", x, x)
        self.rows += x.shape[0]
        room = self.max_rows - self._sampled
        if room > 0 and x.shape[0]:
            step = max(1, x.shape[0] // max(1, min(room, self.max_rows // 4)))
            take = x[::step][:room]
            self._sample.append(take.astype(np.float32))
            self._sampled += take.shape[0]

    @property
    def norms(self) -> np.ndarray:
        """``‖x_j‖₂`` over every calibration token seen."""
        return np.sqrt(self.sum_sq)

    def sample(self) -> np.ndarray:
        if not self._sample:
            return np.zeros((0, self.sum_sq.shape[0]), np.float32)
        return np.concatenate(self._sample)


def relative_error(w: np.ndarray, w_hat: np.ndarray, rows: np.ndarray | None = None) -> float:
    """``‖X(Ŵ − W)ᵀ‖_F / ‖XWᵀ‖_F`` on sample rows ``X``, or ``‖Ŵ − W‖_F / ‖W‖_F`` without."""
    w = np.asarray(w, np.float32)
    diff = np.asarray(w_hat, np.float32) - w  # exact for a mask: −W where pruned, 0 elsewhere
    if rows is not None and len(rows):
        x = np.asarray(rows, np.float32)
        num, den = np.linalg.norm(x @ diff.T), np.linalg.norm(x @ w.T)
    else:
        num, den = np.linalg.norm(diff), np.linalg.norm(w)
    return float(num / den) if den > 0 else float(num > 0)

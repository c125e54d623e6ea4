"""IR-free importance scores of the units of a channel group, and which units to keep.

A group of ``size`` coupled channels is cut into ``size // unit`` units (a channel, or a head
of ``unit = head_dim`` channels). Unit ``u`` of a use with ``offset`` is the index range
``[offset + u·unit, offset + (u+1)·unit)`` along the use's axis. Scores, higher = keep:

* **Magnitude** (``l1``/``l2``): for every weight of the group (``"out"`` and ``"in"`` uses with
  ≥ 2 dims; biases and norm parameters do not vote) the unit's slice norm, ``Σ|w|`` or
  ``√Σw²``. Each tensor's unit scores are divided by their mean over the units before they are
  summed, so one large tensor (a 4·d FFN weight) does not outvote the others and every tensor
  of the group has the same say.
* **Activation**: ``E[a_c²]·‖W_in[:, c]‖²`` summed over the unit's channels and the group's
  consumers, where ``a`` is the consumer's input (streamed from calibration batches with
  :class:`ChannelStats`): the expected squared contribution of the channel to what the
  consumers compute, ignoring cross terms. Without a consumer weight the factor is 1.
* **Taylor**: ``Σ|a_c·∂L/∂a_c|`` over positions and batches (first-order change of the loss
  when channel ``c`` is removed), accumulated with :meth:`ChannelStats.update_taylor`.

**Selection** (:func:`select_units`). Per group, keep ``units − round(ratio·units)``; with
``global_ranking`` all groups of one kind are ranked together on scores divided by their
group's mean, and the lowest ``round(ratio·Σ units)`` are removed. The kept count is then
rounded to a multiple of ``round_to`` (up per group, to the nearest globally; heads are whole
units already and take ``round_to = 1``) and is never 0: a group keeps at least one unit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

__all__ = [
    "ChannelStats",
    "channel_norms",
    "unit_sums",
    "magnitude_scores",
    "activation_scores",
    "select_units",
    "keep_count",
    "unit_channels",
    "IndexLedger",
]

logger = logging.getLogger(__name__)


def channel_norms(array: np.ndarray, axis: int, p: int) -> np.ndarray:
    """``Σ|x|`` (``p=1``) or ``Σx²`` (``p=2``) over every axis but ``axis``, float64."""
    x = np.moveaxis(np.asarray(array, np.float64), axis, 0).reshape(array.shape[axis], -1)
    return np.abs(x).sum(axis=1) if p == 1 else np.square(x).sum(axis=1)


def unit_sums(per_channel: np.ndarray, units: int, unit: int, offset: int = 0) -> np.ndarray:
    """Sum ``per_channel[offset + u·unit : offset + (u+1)·unit]`` for every unit ``u``."""
    window = np.asarray(per_channel, np.float64)[offset : offset + units * unit]
    if window.size != units * unit:
        raise ValueError(f"{units} units of {unit} from offset {offset} exceed the "
                         f"{per_channel.shape[0]} channels of the tensor")
    return window.reshape(units, unit).sum(axis=1)


def unit_channels(keep_units: Sequence[int], unit: int, offset: int = 0) -> np.ndarray:
    """Channel indices ``offset + u·unit + j`` of the kept units, ascending."""
    keep = np.sort(np.asarray(keep_units, np.int64))
    return (offset + keep[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)


def _normalised(scores: np.ndarray) -> np.ndarray:
    mean = float(scores.mean()) if scores.size else 0.0
    return scores / mean if mean > 0 else scores


def magnitude_scores(
    weights: Sequence[tuple[np.ndarray, int, int]], units: int, unit: int, p: int
) -> np.ndarray:
    """Per-unit ``Σ_t norm_t(u) / mean_u norm_t`` over ``weights`` = ``(array, axis, offset)``."""
    total = np.zeros(units)
    for array, axis, offset in weights:
        per_unit = unit_sums(channel_norms(array, axis, p), units, unit, offset)
        total += _normalised(np.sqrt(per_unit) if p == 2 else per_unit)
    return total


def activation_scores(
    pairs: Sequence[tuple[np.ndarray, np.ndarray | None]], units: int, unit: int
) -> np.ndarray:
    """``Σ_consumers Σ_{c∈u} s_c·w_c`` per unit for ``pairs`` of per-channel statistics ``s``
    (``E[a²]``, or Taylor sums) and weights ``w`` (the consumer's ``‖W[:, c]‖²``; ``None``: 1)."""
    total = np.zeros(units)
    for stat, weight in pairs:
        value = np.asarray(stat, np.float64)
        if weight is not None:
            value = value * np.asarray(weight, np.float64)
        total += unit_sums(value, units, unit)
    return total


class ChannelStats:
    """Streaming per-channel statistics of a value along one axis: ``Σa²``, ``Σ|a|``, count,
    and ``Σ|a·g|`` for Taylor scores."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.sq: np.ndarray | None = None
        self.abs: np.ndarray | None = None
        self.taylor: np.ndarray | None = None
        self.count = 0

    def _flat(self, array: np.ndarray) -> np.ndarray:
        x = np.asarray(array, np.float64)
        return np.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis])

    def update(self, array: np.ndarray) -> None:
        x = self._flat(array)
        sq, ab = np.square(x).sum(axis=0), np.abs(x).sum(axis=0)
        self.sq = sq if self.sq is None else self.sq + sq
        self.abs = ab if self.abs is None else self.abs + ab
        self.count += x.shape[0]

    def update_taylor(self, array: np.ndarray, grad: np.ndarray) -> None:
        # |Σ_positions a·g| per sample would need the sample axis; summing |a·g| over every
        # position is the common, sign-safe variant (Molchanov et al. 2017 use the mean).
        t = np.abs(self._flat(array) * self._flat(grad)).sum(axis=0)
        self.taylor = t if self.taylor is None else self.taylor + t

    @property
    def energy(self) -> np.ndarray:
        """``E[a²]`` per channel."""
        if self.sq is None:
            raise ValueError("no activations were recorded")
        return self.sq / max(self.count, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        if self.abs is None:
            raise ValueError("no activations were recorded")
        return self.abs / max(self.count, 1)


def keep_count(units: int, ratio: float, round_to: int, *, nearest: bool = False) -> int:
    """Units kept when removing ``ratio`` of ``units``, rounded to a multiple of ``round_to``
    (up, or to the nearest), at least 1 and at most ``units``."""
    keep = units - int(round(ratio * units))
    if round_to > 1 and keep % round_to:
        down = keep - keep % round_to
        keep = down + round_to if not nearest or keep - down >= round_to / 2 or down == 0 else down
    return int(min(max(keep, 1), units))


def select_units(
    scores: Sequence[np.ndarray],
    ratio: float,
    round_to: Sequence[int] | int = 1,
    *,
    global_ranking: bool = False,
) -> list[np.ndarray]:
    """Kept unit indices (ascending) of every group; the best-scored units are kept.

    ``round_to`` is one multiple for all groups or one per group. With ``global_ranking`` the
    groups (of one kind) share one ranking of mean-normalised scores.
    """
    scores = [np.asarray(s, np.float64) for s in scores]
    rounds = [round_to] * len(scores) if isinstance(round_to, int) else list(round_to)
    if global_ranking and scores:
        normed = [_normalised(s) for s in scores]
        flat = np.concatenate(normed)
        n_remove = int(round(ratio * flat.size))
        order = np.argsort(flat, kind="stable")
        removed = np.zeros(flat.size, bool)
        removed[order[:n_remove]] = True
        bounds = np.cumsum([0, *[s.size for s in scores]])
        counts = [int((~removed[a:b]).sum()) for a, b in zip(bounds[:-1], bounds[1:])]
        counts = [keep_count(s.size, 1 - c / s.size if s.size else 0.0, r, nearest=True)
                  for s, c, r in zip(scores, counts, rounds)]
    else:
        counts = [keep_count(s.size, ratio, r) for s, r in zip(scores, rounds)]
    return [np.sort(np.argsort(-s, kind="stable")[:k]) for s, k in zip(scores, counts)]


class IndexLedger:
    """Which original indices of each axis of a constant were removed so far, keyed by the
    constant actually sliced: a new (pruned) constant inherits the record of the one it
    replaces, an original constant starts empty. A second group slicing the same constant at
    the same reader (a concatenated consumer) thus finds its channels where they are now, while
    a group slicing the original through another reader (tied weights) is not shifted by the
    first group's removals.
    """

    def __init__(self) -> None:
        self._removed: dict[str, dict[int, np.ndarray]] = {}

    def keep(self, source: str, axis: int, dim: int,
             removed: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Current indices (of ``dim``) of ``source`` to keep when the original indices
        ``removed`` go along ``axis``, and the record the sliced copy carries (:meth:`adopt`)."""
        record = self._removed.get(source, {})
        prev = record.get(axis, np.zeros(0, np.int64))
        removed = np.asarray(removed, np.int64)
        current = removed - np.searchsorted(prev, removed)
        if current.size and (current.max() >= dim or np.isin(removed, prev).any()):
            raise ValueError(f"channels {removed.tolist()[:8]}... of {source!r} axis {axis} "
                             "are out of range or were removed already")
        history = {**record, axis: np.sort(np.concatenate([prev, removed]))}
        return np.setdiff1d(np.arange(dim), current).astype(np.int64), history

    def removed(self, source: str, axis: int) -> np.ndarray:
        """Original indices removed so far along ``axis`` of the constant ``source``."""
        return self._removed.get(source, {}).get(axis, np.zeros(0, np.int64))

    def adopt(self, new: str, history: dict[int, np.ndarray]) -> None:
        """``new`` (the sliced copy of a constant) carries ``history`` from :meth:`keep`."""
        self._removed[new] = history

"""Which channels rank ``r`` keeps, as inputs for the pruning shrinkers (IR-free).

A sharded group of ``U`` units keeps units ``[r·U/W, (r+1)·U/W)`` on rank ``r``: the same
contiguous ``1/W`` of every use's window. The shrinkers of ``passes/prune`` take a
:class:`ChannelGroup` with one ``unit`` for all uses, so a group whose uses hold different
windows (grouped-query attention: query/output windows are ``n_rep`` times the key/value ones)
becomes one sub-group per window, each with ``unit = window / U``; reshape entries (``"shape"``
uses) scale by ``kept / size = 1/W`` whatever the window, so they ride with the first one.
The vocabulary rows of rank ``r`` are ``[r·V/W, (r+1)·V/W)``.
"""

from __future__ import annotations

import logging

import numpy as np

from graphpress.graph.channels import ChannelGroup, ChannelUse

from ._tp_groups import TpGroup

__all__ = ["rank_slices", "vocab_rows"]

logger = logging.getLogger(__name__)


def rank_slices(group: TpGroup, rank: int, world: int) -> list[tuple[ChannelGroup, np.ndarray]]:
    """``(sub-group, kept units)`` pairs that slice ``group`` down to ``rank``'s units."""
    per_rank = group.units // world
    keep = np.arange(rank * per_rank, (rank + 1) * per_rank)
    by_window: dict[int, list[ChannelUse]] = {}
    shapes = []
    for u in group.uses:
        use = ChannelUse(u.node, u.tensor, u.axis, u.role, u.offset)
        if u.role == "shape":
            shapes.append(use)
        elif u.role not in ("stat", "range"):  # markers: nothing to slice
            by_window.setdefault(u.window, []).append(use)
    pairs = []
    for i, (window, uses) in enumerate(by_window.items()):
        extra = shapes if i == 0 else []
        sub = ChannelGroup(f"{group.id}#{window}", group.kind, window, window // group.units,
                           tuple(uses + extra), True)
        pairs.append((sub, keep))
    return pairs


def vocab_rows(vocab: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of the vocabulary rows rank ``rank`` holds."""
    per_rank = vocab // world
    return rank * per_rank, (rank + 1) * per_rank

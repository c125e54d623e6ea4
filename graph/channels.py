"""Coupled channel groups: which constants must be sliced together to remove one channel.

A *channel space* is one axis of one tensor, ``(value, axis)``. Operators relate the spaces of
their inputs and outputs (rules in :mod:`._channel_rules`, written once over the IR-free view
of :mod:`._channel_view`):

* **identity**: element-wise ops, activations, norms, residual adds, transposes and the
  batch axes of products map input axis ``i`` to output axis ``j`` one to one (union-find);
* **segment**: concat/split/slice place a part ``P`` at ``[offset, offset + |P|)`` of a whole;
* **factor**: a reshape that splits (or merges) an axis of ``H·D`` channels into ``H × D``
  (row-major: channel ``c = h·D + d``); attention's head axis is such an outer factor.

Constants read along a space are its *uses* (:class:`ChannelUse`); a producer's ``"out"`` use
makes a space a group. A whole's uses are pushed into its parts with their offsets, and a flat
space whose outer factor is a head axis joins that head axis's ``"heads"`` group (unit ``D``).
Pruning unit ``u`` of a group removes indices ``[u·unit, (u+1)·unit) + offset`` along ``axis``
of every use's tensor; for a ``"shape"`` use the entry at position ``axis`` of the reshape /
expand / split-sizes vector becomes ``old · kept // size`` (``-1``/``0`` entries and entries
read at run time from another tensor's shape never need a change; FX size lists have
``tensor=""`` and ``axis`` is the position in ``node``'s list argument). A constant may be read
by several nodes (exporters deduplicate equal constants), so slice per use: give ``node`` a
new constant. A group is not prunable when a member space reaches a graph input or output,
is reduced, softmaxed or indexed along the channels, meets an op without a rule, an axis of
unknown size, a GroupNorm or a depthwise conv (their group count is an attribute), or a split
into equal parts (never guessed). Unknown axes left by dynamic-shape exports are completed
from run-time ``Shape``/``Slice``/``Concat`` reshape targets where they can be read.

GQA: the kv heads are grouped *with* their query heads (one ``"heads"`` group per kv head
axis); the query side then needs a unit of ``n_rep·D`` against ``D`` on the key/value side,
which one ``unit`` cannot express, so such groups are reported with ``prunable=False``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ._channel_groups import assemble
from ._channel_rules import apply_rules
from ._channel_view import build_view

__all__ = ["ChannelUse", "ChannelGroup", "channel_groups"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelUse:
    """One constant read along a channel axis.

    ``node``: the operator node that reads ``tensor`` (FX ``fx.Node.name`` / ONNX node name);
    ``tensor``: the constant (FX ``get_attr`` target / ONNX initializer or ``Constant`` output
    name), ``""`` when the use is not a constant (an FX ``view`` size list: ``axis`` is then
    the position in ``node``'s size argument); ``axis``: the axis of ``tensor`` as stored;
    ``role``: ``"out"``, ``"in"``, ``"norm"``, ``"shape"``, ``"act"`` or ``"stat"`` (a marker,
    ``tensor=""``: a keep-dim mean/var or a weightless norm counts the channels, so removing
    even a zero channel changes its divisor); ``offset``: the first channel of the group inside
    ``tensor``'s axis.
    """

    node: str
    tensor: str
    axis: int
    role: str
    offset: int = 0


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are removed together: ``size`` channels in units of ``unit``.

    ``unit`` is 1 when the uses disagree on it (then ``prunable`` is False and ``reason``
    says which nodes read which block sizes; grouped-query attention, a decomposed GroupNorm
    or a flatten of conv channels into a linear).
    """

    name: str
    kind: str
    size: int
    unit: int
    uses: tuple[ChannelUse, ...]
    prunable: bool
    reason: str = ""


def channel_groups(graph) -> list[ChannelGroup]:
    """The coupled channel groups of an FX ``GraphModule`` (aten dialect from
    ``torch.export``) or an ``onnx_ir.Model``, in graph order of their first producer."""
    view = build_view(graph)
    relations = apply_rules(view)
    groups = [ChannelGroup(name, kind, size, unit, tuple(ChannelUse(*u) for u in uses),
                           prunable, reason)
              for name, kind, size, unit, uses, prunable, reason in assemble(view, relations)]
    logger.debug("%d channel groups (%d prunable)", len(groups), sum(g.prunable for g in groups))
    return groups

"""Megatron pairing from coupled channel groups: which groups a tensor-parallel plan shards.

A channel group of :func:`graphpress.graph.channel_groups` whose producers are linear layers
(``"out"`` uses) and whose consumers are linear layers (``"in"`` uses) is exactly a Megatron
pair: the producers are **column-parallel** (rank ``r`` computes units
``[r·U/W, (r+1)·U/W)`` of the ``U`` units, from the full input), everything between them is
per-channel so it runs on the local units, and the consumers are **row-parallel** (they read
only the local units, so each rank's output is a partial sum; ONE all-reduce per consumer
restores it). FFN groups have ``unit = 1`` (SwiGLU's gate and up are one group); attention
groups have ``unit = head_dim``. Every use holds a *window* of ``U · use.unit`` channels
(``ChannelGroup.units``, ``ChannelUse.unit``); under grouped-query attention (a ``"heads"``
group whose uses disagree on the unit: ``n_rep·head_dim`` for queries, ``head_dim`` for keys
and values) ``U`` is the kv-head count, and sharding keeps the same contiguous ``1/W`` of every
window: whole kv heads together with their query heads.

Quantized layers pair the same way (the channel analysis sees through them): their scales and
zero points are uses of their own, a block-quantized row-parallel weight needs every rank's
``K`` slice to be whole blocks, and a ``"range"`` use (dynamic quantization's run-time min/max
over the channels) becomes a min/max combination of the ranks' ranges.

A group stays **replicated** (with a reason) when ``U`` is not divisible by ``W``, the channel
analysis found blockers, a use is not a linear weight/bias/per-channel constant (a norm or
statistic across the channels, a non-linear producer), a consumer reads other channels besides
the group's, a reshape entry does not divide by ``W``, or a node would be row-parallel for one
group and column-parallel for another (chained groups: the larger group, by parameters, wins).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from graphpress.graph.channels import ChannelGroup, channel_groups

from ._tp_graph import GraphReader

__all__ = ["TpUse", "TpGroup", "plan_groups"]

logger = logging.getLogger(__name__)

_MARKERS = ("shape", "stat", "range")  # entries and markers: no slice of their own


@dataclass(frozen=True)
class TpUse:
    """A channel use with its ``window``: the channels of the group it holds along ``axis``."""

    node: str
    tensor: str
    axis: int
    role: str
    offset: int
    window: int


@dataclass(frozen=True)
class TpGroup:
    id: str
    kind: str
    units: int
    uses: tuple[TpUse, ...]
    columns: tuple[str, ...]
    rows: tuple[str, ...]
    params: int
    sharded: bool
    reason: str = ""

    def to_json(self) -> dict:
        return {"id": self.id, "kind": self.kind, "units": self.units, "sharded": self.sharded,
                "reason": self.reason, "columns": list(self.columns), "rows": list(self.rows),
                "params": self.params,
                "uses": [[u.node, u.tensor, u.axis, u.role, u.offset, u.window]
                         for u in self.uses]}

    @staticmethod
    def from_json(data: dict) -> TpGroup:
        return TpGroup(data["id"], data["kind"], data["units"],
                       tuple(TpUse(*u) for u in data["uses"]), tuple(data["columns"]),
                       tuple(data["rows"]), data["params"], data["sharded"], data["reason"])


def plan_groups(graph, world_size: int, reader: GraphReader | None = None) -> list[TpGroup]:
    """Every FFN/attention group of ``graph``, sharded over ``world_size`` ranks or not."""
    reader = reader or GraphReader(graph)
    groups = [_candidate(reader, g, world_size) for g in channel_groups(graph)
              if g.kind in ("ffn", "heads")]
    taken_rows: dict[str, str] = {}
    taken_cols: dict[str, str] = {}
    chosen: dict[str, TpGroup] = {}
    for group in sorted((g for g in groups if g.sharded), key=lambda g: -g.params):
        clash = next((taken_rows[n] for n in group.columns if n in taken_rows), None) or next(
            (taken_cols[n] for n in group.rows if n in taken_cols), None)
        if clash is not None:
            chosen[group.id] = _replicated(group, f"chained with sharded group {clash!r} (a "
                                                  "node cannot be row- and column-parallel)")
            continue
        taken_rows.update((n, group.id) for n in group.rows)
        taken_cols.update((n, group.id) for n in group.columns)
        chosen[group.id] = group
    result = [chosen.get(g.id, g) for g in groups]
    for g in result:
        if not g.sharded:
            logger.debug("tensor parallel keeps %s replicated: %s", g.id, g.reason)
    return result


def _replicated(group: TpGroup, reason: str) -> TpGroup:
    return TpGroup(group.id, group.kind, group.units, group.uses, group.columns, group.rows,
                   group.params, False, reason)


def _candidate(reader: GraphReader, group: ChannelGroup, world: int) -> TpGroup:
    units = group.units or group.size // max(group.unit, 1)
    unit_sizes = {u.unit for u in group.uses if u.role not in _MARKERS}
    uses = tuple(TpUse(u.node, u.tensor, u.axis, u.role, u.offset,
                       group.size if u.role in _MARKERS else u.unit * units) for u in group.uses)
    columns = tuple(dict.fromkeys(reader.layer_of(u.node, u.tensor).layer for u in uses
                                  if u.role == "out" and reader.layer_of(u.node, u.tensor)))
    rows = tuple(dict.fromkeys(reader.layer_of(u.node, u.tensor).layer for u in uses
                               if u.role == "in" and reader.layer_of(u.node, u.tensor)))
    params = sum(u.window * _other(reader.const_shape(u.node, u.tensor), u.axis)
                 for u in uses if u.role in ("out", "in", "act") and u.tensor)
    tp = TpGroup(group.name, group.kind, units, uses, columns, rows, params, True)
    problems = list(group.blockers)
    if len(unit_sizes) > 1 and group.kind != "heads":
        problems.append(f"its uses read {sorted(unit_sizes)} channels per unit")
    if units % world:
        problems.append(f"{units} units do not divide by world_size={world}")
    problems += _use_problems(reader, uses, units, world)
    if not columns or not rows:
        problems.append("no linear producer or no linear consumer")
    return _replicated(tp, "; ".join(dict.fromkeys(problems))) if problems else tp


def _use_problems(reader: GraphReader, uses, units: int, world: int) -> list[str]:
    problems = []
    for u in uses:
        shape = reader.const_shape(u.node, u.tensor)
        layer = reader.layer_of(u.node, u.tensor)
        if u.role in ("norm", "stat"):
            problems.append(f"{u.node} normalises or reduces across the channels")
        elif u.role == "range":
            if reader.range_of(u.node) is None:
                problems.append(f"{u.node} takes a run-time range over the channels that "
                                "cannot be combined over the ranks")
        elif u.role == "shape":
            entry = reader.shape_entry(u)
            if entry not in (None, -1, 0) and entry % world:
                problems.append(f"reshape entry {entry} of {u.node} does not divide by {world}")
        elif u.window <= 0 or u.window % units:
            problems.append(f"{u.node} reads the channels in a layout that is not one window")
        elif u.role == "out" and shape is not None and len(shape) >= 2 and layer is None:
            problems.append(f"producer {u.node} is not a linear layer")
        elif u.role == "in":
            k = None if shape is None else shape[u.axis]
            block = reader.block_size(layer.layer) if layer is not None else 1
            if layer is None:
                problems.append(f"consumer {u.node} is not a linear layer reading this weight")
            elif u.offset != 0 or k != u.window:
                problems.append(f"consumer {u.node} reads other channels besides this group")
            elif (u.window // world) % block:
                problems.append(f"{layer.layer} is quantized in blocks of {block} input "
                                f"channels; a rank's {u.window // world} are not whole blocks")
    return problems


def _other(shape, axis: int) -> int:
    if shape is None:
        return 0
    count = 1
    for i, d in enumerate(shape):
        if i != axis % len(shape):
            count *= d
    return count

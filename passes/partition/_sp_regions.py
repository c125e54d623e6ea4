"""Sequence-parallel regions: the per-token stretches between tensor-parallel collectives.

Starting from each collective point's output (a row-parallel output or the vocab-parallel
embedding), a region grows over per-token nodes (:mod:`._sp_view`) in both directions: forward
to users, backward to producers (a residual add reads the previous region's value, so a
decoder's whole residual stream is one region). It stops at:

* **entries**: collective points (their all-reduce becomes a reduce-scatter along the token
  axis), and values or constants from outside that carry the token axis (``scatter``: each
  rank keeps its slice, no communication; weights and values broadcast along that axis need
  nothing);
* **exits**: region values read by anything else (a column-parallel linear, an attention,
  a graph output): an all-gather along the token axis restores the whole sequence for them.

The token axis is the one before the hidden axis (``rank − 2``; 1 for ``[batch, seq,
hidden]``). A region is left as tensor parallelism (all-reduces) when it holds no per-token
node, when a point's own output leaves it at once (reduce-scatter then all-gather is just the
all-reduce), when its values disagree on the rank, or when a static sequence length does not
divide by the world size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ._sp_view import SpView

__all__ = ["Region", "find_regions"]

logger = logging.getLogger(__name__)

_OUTPUT = "<graph output>"


@dataclass
class Region:
    nodes: list[str] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)  # collective point nodes
    exits: dict[str, list[str]] = field(default_factory=dict)  # value -> outside readers
    scatters: list[str] = field(default_factory=list)  # outside values split per rank
    dim: int | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


def find_regions(view: SpView, points: set[str], tp_nodes: set[str], world: int) -> list[Region]:
    """One region per connected per-token component reached from a collective point."""
    regions, claimed = [], set()
    for point in sorted(points, key=list(view.nodes).index):
        seed = view.nodes[point].outs[0]
        if seed in claimed:
            continue
        region = _grow(view, seed, points, tp_nodes)
        claimed.update(region_values(view, region))
        _check(view, region, world)
        regions.append(region)
    return regions


def region_values(view: SpView, region: Region) -> set[str]:
    values = {v for n in region.nodes for v in view.nodes[n].outs}
    return values | {view.nodes[p].outs[0] for p in region.entries}


def _grow(view: SpView, seed: str, points: set[str], tp_nodes: set[str]) -> Region:
    region = Region()
    inside: set[str] = set()
    values: set[str] = set()
    queue: list[str] = []

    def add_value(key: str) -> None:
        if key not in values:
            values.add(key)
            queue.append(key)

    def add_node(name: str) -> None:
        inside.add(name)
        region.nodes.append(name)
        for out in view.nodes[name].outs:
            add_value(out)
        for key in view.nodes[name].ins:
            add_input(key)

    def add_input(key: str) -> None:
        if key in values:
            return
        producer = view.producer.get(key)
        if key in view.consts:  # weights need nothing; a constant with a token axis is split
            if key not in region.scatters:
                region.scatters.append(key)
        elif producer in points:
            region.entries.append(producer)
            add_value(key)
        elif producer is not None and producer not in tp_nodes and view.nodes[producer].per_token:
            if producer not in inside:
                add_node(producer)
        elif key not in region.scatters:
            region.scatters.append(key)

    region.entries.append(view.producer[seed])
    add_value(seed)
    while queue:
        key = queue.pop(0)
        for user in view.users.get(key, []):
            if user in inside:
                continue
            node = view.nodes[user]
            if node.per_token and user not in tp_nodes:
                add_node(user)
            else:
                region.exits.setdefault(key, []).append(user)
        if key in view.outputs:
            region.exits.setdefault(key, []).append(_OUTPUT)
    region.entries = list(dict.fromkeys(region.entries))
    return region


def _check(view: SpView, region: Region, world: int) -> None:
    seed_shape = view.shapes.get(view.nodes[region.entries[0]].outs[0])
    if seed_shape is None or len(seed_shape) < 2:
        region.reason = "the shape of the collective's output is unknown"
        return
    rank = len(seed_shape)
    region.dim = rank - 2
    length = seed_shape[region.dim]
    if not region.nodes:
        region.reason = "no per-token node between the collectives"
    elif any(view.producer.get(v) in region.entries for v in region.exits):
        region.reason = "a collective's output leaves the region unchanged (an all-reduce)"
    elif any(s is not None and len(s) != rank
             for n in region.nodes for s in [view.shapes.get(view.nodes[n].outs[0])]
             if not _statistic(s, rank)):
        region.reason = "the region's values disagree on their rank"
    elif isinstance(length, int) and length % world:
        region.reason = f"sequence length {length} does not divide by world_size={world}"
    region.scatters = [v for v in region.scatters if _carries_tokens(view.shapes.get(v), region)]


def _statistic(shape, rank: int) -> bool:
    """A keep-dim statistic ``[..., 1]`` or a scalar: broadcast, not a token value."""
    return shape is not None and (len(shape) == 0 or (len(shape) == rank and shape[-1] == 1))


def _carries_tokens(shape, region: Region) -> bool:
    if shape is None:
        return True  # unknown: split it to be safe
    axis = region.dim - (region.dim + 2 - len(shape))
    return axis >= 0 and shape[axis] != 1

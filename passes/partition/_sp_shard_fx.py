"""Materialise the sequence-parallel regions of ``shard-sequence-parallel`` in an FX shard.

For each region with a static sequence length ``S`` (``S/W`` tokens per rank, rank ``r`` holds
tokens ``[r·S/W, (r+1)·S/W)`` along the region's token axis):

* its entry points' partial sums go through ``reduce_scatter_tensor`` (sum, then rank ``r``
  keeps its token slice) instead of the all-reduce;
* values from outside that carry the token axis are sliced locally for the region's nodes
  (``aten.slice``), nothing is communicated;
* values leaving it are all-gathered along the token axis for their outside readers only;
  the region's own readers keep the slice.

Every region node then computes on ``S/W`` tokens; the numbers are those of the unsharded graph
(each token's computation is unchanged). A region whose length is unknown or not divisible keeps
its all-reduces.
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from graphpress.graph.fx import get_tensor

from ._fx_collectives import along, call

__all__ = ["sequence_parallel_fx"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten


def sequence_parallel_fx(gm: fx.GraphModule, sequence: dict, points: dict[str, fx.Node],
                         rank: int, world: int, group: str) -> list[str]:
    """Rewrite the usable regions; return the plan names of the points they took over."""
    graph, nodes = gm.graph, {n.name: n for n in gm.graph.nodes}
    handled = []
    for region in sequence["regions"]:
        if region["reason"] or not all(e in points for e in region["entries"]):
            continue
        dim = region["dim"]
        val = nodes[region["entries"][0]].meta.get("val")  # the unsharded point's output
        length = val.shape[dim] if isinstance(val, torch.Tensor) else None
        if not isinstance(length, int) or length % world:
            logger.debug("sequence-parallel region at %s keeps its all-reduces: sequence length "
                         "%s", region["entries"], length)
            continue
        inside = set(region["nodes"])
        size = length // world
        for name in region["entries"]:
            along(graph, points[name], "reduce_scatter", dim, world, group)
            handled.append(name)
        for name in region["scatters"]:
            _local_slice(gm, nodes[name], inside, rank * size, size)
        for name in region["exits"]:
            node = nodes[name]
            along(graph, node, "all_gather", node.meta["val"].dim() - 2, world, group,
                  keep=lambda user, inside=inside: user.name in inside)
    return handled


def _local_slice(gm: fx.GraphModule, node: fx.Node, inside: set[str], start: int,
                 size: int) -> None:
    graph = gm.graph
    readers = [u for u in node.users if u.name in inside]
    if not readers:
        return
    first = min(readers, key=_position(graph))
    value = get_tensor(gm, node) if node.op == "get_attr" else node.meta["val"]
    axis = value.dim() - 2
    with graph.inserting_before(first):
        part = call(graph, _aten.slice.Tensor, node, axis, start, start + size, like=first)
    for reader in readers:
        reader.replace_input_with(node, part)


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__

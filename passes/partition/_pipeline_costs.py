"""What ``partition-pipeline`` plans with, read off a :class:`graphpress.graph.costs.CostTable`.

Node ``i`` of the table (topological order) has

* ``flops[i]`` as the table counts them;
* ``memory[i]`` = bytes of the constants node ``i`` is the first reader of + bytes of its
  outputs that own their storage (not :attr:`CostTable.aliases`, i.e. not views) — the
  activations it allocates, summed rather than peaked so that the cost stays additive;

and cut ``j`` (after node ``j``) sends ``boundary[j]`` bytes: the sum over values *defined* at
or before ``j`` (graph inputs at ``-1``) and *last used* after ``j`` (graph outputs: after the
last node) — the values the splitter threads across it. ``boundary[j] = inf`` when such a
value is not a tensor (``torch.Size``, ``SymInt``, a tuple): that cut is forbidden.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from graphpress.graph.costs import CostTable, peak_live_bytes

__all__ = ["PipelineCosts", "pipeline_costs", "stage_rows"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineCosts:
    """Per-node costs and per-cut boundary bytes of one cost table (see the module docstring)."""

    table: CostTable
    flops: np.ndarray
    memory: np.ndarray
    boundary: np.ndarray
    defined: dict[str, int]  # value name -> index of its producer (-1: graph input)
    last_use: dict[str, int]  # value name -> index of its last reader (len(nodes): output)


def pipeline_costs(table: CostTable) -> PipelineCosts:
    nodes = table.nodes
    n = len(nodes)
    flops = np.array([float(node.flops) for node in nodes], dtype=np.float64)
    memory = np.zeros(n, dtype=np.float64)
    seen: set[str] = set()
    for i, node in enumerate(nodes):
        fresh = [c for c in node.constants if c not in seen]
        seen.update(fresh)
        memory[i] = sum(table.constant_bytes.get(c, 0) for c in fresh)
        memory[i] += sum(v.bytes for v in node.outputs if v.name not in table.aliases)
    infos = {v.name: v for v in table.inputs}
    defined = {v.name: -1 for v in table.inputs}
    for i, node in enumerate(nodes):
        for value in node.outputs:
            infos[value.name], defined[value.name] = value, i
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.inputs:
            last_use[name] = i
    for name in table.outputs:
        last_use[name] = n
    size = np.zeros(n, dtype=np.float64)  # difference arrays over cuts 0..n-2
    blocked = np.zeros(n, dtype=np.int64)
    for name, end in last_use.items():
        if name not in defined:
            continue
        first, last = max(defined[name], 0), min(end - 1, n - 2)
        if first > last:
            continue
        info = infos[name]
        if info.is_tensor:
            size[first] += info.bytes
            size[last + 1] -= info.bytes
        else:
            blocked[first] += 1
            blocked[last + 1] -= 1
    boundary = np.cumsum(size)[: max(n - 1, 0)]
    boundary[np.cumsum(blocked)[: max(n - 1, 0)] > 0] = math.inf
    return PipelineCosts(table, flops, memory, boundary, defined, last_use)


def stage_rows(
    costs: PipelineCosts, cuts: Sequence[int], stage_costs: Sequence[float]
) -> list[dict]:
    """One report row per stage: cost, flops, weight bytes, activation peak, bytes sent on."""
    table, n = costs.table, len(costs.table.nodes)
    ends = [*cuts, n - 1]
    rows = []
    for k, (start, end) in enumerate(zip([0, *(j + 1 for j in cuts)], ends)):
        members = table.nodes[start:end + 1]
        constants = {c for node in members for c in node.constants}
        rows.append({
            "layer": f"stage{k}",
            "cost": float(stage_costs[k]),
            "flops": int(costs.flops[start:end + 1].sum()),
            "weight_bytes": int(sum(table.constant_bytes.get(c, 0) for c in constants)),
            "activation_peak": int(peak_live_bytes(table, start, end + 1)),
            "boundary_bytes_out": int(costs.boundary[end]) if k < len(cuts) else 0,
            "nodes": end - start + 1,
        })
    return rows


"""What ``partition-pipeline`` plans with, read off a :class:`graphpress.graph.costs.CostTable`.

The planner places the table's nodes that are not constant-only
(:func:`graphpress.graph.costs.constant_only_nodes`): a constant-only chain (an FX
dequantisation chain, an ONNX ``Transpose`` of a weight) is re-created by
``export.split_stages`` in every stage that reads it, so it never crosses a boundary and its
costs belong to its readers. Planned node ``p`` (``order[p]`` in the table) has

* ``flops[p]``: its own FLOPs plus those of the constant-only nodes it is the first planned
  reader of (directly or through other constant-only nodes);
* ``memory[p]``: what a stage keeps resident for it: the bytes of the constants it is the first
  planned reader of (through constant-only chains too; a shared or tied weight once) plus its
  KV-cache share (``kv``, by node name: a causal attention layer's
  ``2·kv_heads·head_dim·bytes·batch·seq``, ``graph.memory.kv_cache_by_node``). Activations are
  transient and peak rather than add up, so they are reported per stage
  (``activation_peak``), not balanced;

and cut ``p`` (after planned node ``p``) sends ``boundary[p]`` bytes: the sum over values that
are not constant-only, *defined* at or before ``p`` (graph inputs at ``-1``) and *last read*
after ``p`` (graph outputs: after the last node) — the values the splitter threads across it.
``boundary[p] = inf`` when such a value is not a tensor (``torch.Size``, ``SymInt``, a tuple)
or is the output of an activation dequantisation (ONNX ``DequantizeLinear``, FX
``quantized_decomposed.dequantize_*``): that cut is forbidden. Keeping a dequantisation with
its reader lets ONNX Runtime fuse the Q/DQ pair into an integer kernel in the stage that runs
it, and the cut moves before the dequantisation, where the value is 4x smaller (int8).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from graphpress.graph.costs import CostTable, ValueInfo, constant_only_nodes, peak_live_bytes

__all__ = ["PipelineCosts", "pipeline_costs", "stage_rows"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineCosts:
    """Per planned node costs and per cut boundary bytes of one cost table (module doc)."""

    table: CostTable
    order: tuple[int, ...]  # table index of each planned node
    flops: np.ndarray
    memory: np.ndarray
    kv: np.ndarray  # the KV-cache part of ``memory``
    boundary: np.ndarray
    feeds: tuple[frozenset[int], ...]  # per planned node: constant-only table nodes it reads
    returned: frozenset[int]  # constant-only table nodes the graph outputs need
    infos: dict[str, ValueInfo]
    defined: dict[str, int]  # crossing value -> planned position of its producer (-1: input)
    last_use: dict[str, int]  # crossing value -> planned position of its last reader (m: output)


def pipeline_costs(table: CostTable, kv: Mapping[str, int] | None = None) -> PipelineCosts:
    nodes, kv = table.nodes, kv or {}
    names = constant_only_nodes(table)
    chains = frozenset(i for i, node in enumerate(nodes) if node.name in names)
    producer = {v.name: i for i, node in enumerate(nodes) for v in node.outputs}
    closure: dict[int, frozenset[int]] = {}  # constant-only nodes a node reads, transitively
    for i, node in enumerate(nodes):
        found = {producer[n] for n in node.inputs if producer.get(n) in chains}
        closure[i] = frozenset(found.union(*(closure[j] for j in found)))
    order = tuple(i for i in range(len(nodes)) if i not in chains)
    m = len(order)
    returned = {producer[n] for n in table.outputs if producer.get(n) in chains}
    returned = frozenset(returned.union(*(closure[j] for j in returned)))
    flops, memory, kv_part = (np.zeros(m, dtype=np.float64) for _ in range(3))
    seen_consts: set[str] = set()
    seen_chain: set[int] = set()
    for p, i in enumerate(order):
        reads = closure[i] | (returned if p == m - 1 else frozenset())  # outputs: after the last
        fresh_chain = sorted(reads - seen_chain)
        seen_chain.update(fresh_chain)
        flops[p] = nodes[i].flops + sum(nodes[j].flops for j in fresh_chain)
        consts = [c for j in (i, *fresh_chain) for c in nodes[j].constants]
        fresh = {c for c in consts if c not in seen_consts}
        seen_consts.update(fresh)
        kv_part[p] = kv.get(nodes[i].name, 0)
        memory[p] = sum(table.constant_bytes.get(c, 0) for c in fresh) + kv_part[p]
    infos = {v.name: v for v in table.inputs}
    defined = {v.name: -1 for v in table.inputs}
    for p, i in enumerate(order):
        for value in nodes[i].outputs:
            infos[value.name], defined[value.name] = value, p
    last_use: dict[str, int] = {}
    for p, i in enumerate(order):
        for name in nodes[i].inputs:
            if name in defined:
                last_use[name] = p
    for name in table.outputs:
        if name in defined:
            last_use[name] = m
    glued = {value.name for i in order if _dequantizes(nodes[i].op) for value in nodes[i].outputs}
    boundary = _boundary(m, defined, last_use, infos, glued)
    feeds = tuple(closure[i] for i in order)
    return PipelineCosts(table, order, flops, memory, kv_part, boundary, feeds, returned, infos,
                         defined, last_use)


def _dequantizes(op: str) -> bool:
    return op == "DequantizeLinear" or op.startswith("quantized_decomposed.dequantize")


def _boundary(m: int, defined: dict[str, int], last_use: dict[str, int],
              infos: dict[str, ValueInfo], glued: set[str]) -> np.ndarray:
    size = np.zeros(max(m, 1), dtype=np.float64)  # difference arrays over cuts 0..m-2
    blocked = np.zeros(max(m, 1), dtype=np.int64)
    for name, end in last_use.items():
        first, last = max(defined[name], 0), min(end - 1, m - 2)
        if first > last:
            continue
        info = infos[name]
        if info.is_tensor and name not in glued:
            size[first] += info.bytes
            size[last + 1] -= info.bytes
        else:
            blocked[first] += 1
            blocked[last + 1] -= 1
    boundary = np.cumsum(size)[: max(m - 1, 0)]
    boundary[np.cumsum(blocked)[: max(m - 1, 0)] > 0] = math.inf
    return boundary


def stage_members(costs: PipelineCosts, start: int, end: int, last: bool) -> list[int]:
    """Table indices of the nodes stage ``[start, end]`` (planned positions) runs, in graph
    order: its planned nodes and the constant-only nodes they read (the last stage also those
    the graph returns)."""
    found = {costs.order[p] for p in range(start, end + 1)}
    found.update(*costs.feeds[start:end + 1])
    if last:
        found.update(costs.returned)
    return sorted(found)


def stage_table(costs: PipelineCosts, start: int, end: int, last: bool) -> CostTable:
    """The cost table of stage ``[start, end]`` as ``split_stages`` materialises it: its nodes
    (:func:`stage_members`), the values it receives as inputs and the ones it sends on (or
    returns) as outputs."""
    table = costs.table
    members = tuple(table.nodes[i] for i in stage_members(costs, start, end, last))
    inputs = tuple(costs.infos[name] for name, d in costs.defined.items()
                   if d < start and costs.last_use.get(name, -1) >= start)
    outputs = [name for name, d in costs.defined.items()
               if start <= d <= end and costs.last_use.get(name, -1) > end]
    if last:
        made = {v.name for node in members for v in node.outputs}
        outputs += [name for name in table.outputs if name in made and name not in outputs]
    outputs += [v.name for v in inputs if costs.last_use.get(v.name, -1) > end]
    return CostTable(members, inputs, tuple(outputs), table.constant_bytes, table.aliases,
                     table.workspace)


def stage_rows(
    costs: PipelineCosts, cuts: Sequence[int], stage_costs: Sequence[float]
) -> list[dict]:
    """One report row per stage: cost, flops, resident bytes (weights, KV cache), activation
    peak, bytes sent on, node count — of the stage as materialised (shared constant-only
    chains in every stage that reads them)."""
    m = len(costs.order)
    ends = [*cuts, m - 1]
    rows = []
    for k, (start, end) in enumerate(zip([0, *(j + 1 for j in cuts)], ends)):
        sub = stage_table(costs, start, end, k == len(cuts))
        constants = {c for node in sub.nodes for c in node.constants}
        rows.append({
            "layer": f"stage{k}",
            "cost": float(stage_costs[k]),
            "flops": int(sub.flops),
            "weight_bytes": int(sum(costs.table.constant_bytes.get(c, 0) for c in constants)),
            "kv_cache_bytes": int(costs.kv[start:end + 1].sum()),
            "activation_peak": int(peak_live_bytes(sub)),
            "boundary_bytes_out": int(costs.boundary[end]) if k < len(cuts) else 0,
            "nodes": len(sub.nodes),
        })
    return rows

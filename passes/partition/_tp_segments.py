"""Cut one rank's ONNX model into segments at its collective points.

A node's *collective depth* is the most collective points on any path from the graph inputs
to it (a point's own output counts from the next depth on), so every node that reads a
partial value lies deeper than the point that made it, and independent points at the same
depth share one boundary (one batched collective). Nodes that read no graph input (constant
computations) take the smallest depth of their readers, so no constant crosses a boundary.

A segment is one ``(pipeline stage, depth)`` pair, in lexicographic order (the stage is
``graphpress.stage`` when ``partition-pipeline`` annotated the graph, else 0): ordering the
nodes by it (stable) keeps the graph topological (producers have a stage and a depth no larger
than their readers'), makes segments contiguous and nests them in pipeline stages, so a
pipeline stage runs a consecutive range of segments. Boundary ``k`` carries the collective of
the points in segment ``k``; a boundary between two stages with no point carries an empty one.
A point whose output is a graph output gets an ``Identity`` in the next segment so the output
leaves reduced.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from graphpress.export.shards import SEGMENT_KEY, Collective
from graphpress.graph.errors import UnsupportedGraphError
from graphpress.graph.onnx import mark, unique_name

__all__ = ["cut_segments", "STAGE_KEY"]

logger = logging.getLogger(__name__)

STAGE_KEY = "graphpress.stage"
PASS = "shard-tensor-parallel"


def cut_segments(model: ir.Model, points: dict[str, tuple[str, int | None]], taken: set[str],
                 shapes: dict) -> tuple[list[Collective], list[int]]:
    """Annotate ``graphpress.segment``, reorder the nodes; return the collective of every
    boundary and the pipeline stage of every segment. ``points`` maps a node name to its
    ``(kind, dim)``; ``shapes`` holds the original graph outputs' shapes."""
    graph = model.graph
    named = {(n.name or n.outputs[0].name): n for n in graph}
    kinds = {named[name]: kind for name, kind in points.items()}
    for node, kind in list(kinds.items()):
        out = node.outputs[0]
        if out.is_graph_output():
            _identity_output(graph, node, kind, taken, shapes)
    key = _keys(graph, kinds)
    order = {node: i for i, node in enumerate(graph)}
    keys = sorted(set(key.values()))
    index = {k: i for i, k in enumerate(keys)}
    nodes = sorted(graph, key=lambda n: (key[n], order[n]))
    graph.remove(list(graph))
    graph.extend(nodes)
    for node in nodes:
        node.metadata_props[SEGMENT_KEY] = str(index[key[node]])
    boundaries: dict[int, list[tuple[str, tuple]]] = {}
    for node, kind in kinds.items():
        if node.outputs[0].uses() or node.outputs[0].is_graph_output():
            boundaries.setdefault(index[key[node]], []).append((node.outputs[0].name, kind))
    collectives = []
    for k in range(len(keys) - 1):
        found = boundaries.get(k, [])
        variants = {kind for _, kind in found} or {("all_reduce", None)}
        if len(variants) != 1:
            raise UnsupportedGraphError(
                f"segment boundary {k} needs collectives of kinds {sorted(map(str, variants))}"
                "; shard() batches one kind per boundary")
        (kind, dim), = variants
        collectives.append(Collective(kind, tuple(name for name, _ in found), dim))
    return collectives, [stage_ for stage_, _ in keys]


def _identity_output(graph: ir.Graph, node: ir.Node, kind: tuple, taken: set[str],
                     shapes: dict) -> None:
    out = node.outputs[0]
    name = out.name
    out.name = unique_name(graph, f"{name}.tp_partial", taken)
    final = ir.Value(name=name, type=out.type, shape=shapes.get(name))
    if kind[0] == "all_gather":
        out.shape = None  # the local slice of the vocabulary: ORT infers it
    ident = mark(ir.node("Identity", [out], outputs=[final],
                         name=unique_name(graph, f"{name}.tp.output", taken)), PASS)
    if STAGE_KEY in node.metadata_props:
        ident.metadata_props[STAGE_KEY] = node.metadata_props[STAGE_KEY]
    graph.insert_after(node, ident)
    for i, value in enumerate(graph.outputs):
        if value is out:
            graph.outputs[i] = final


def _keys(graph: ir.Graph, points: dict) -> dict[ir.Node, tuple[int, int]]:
    """``(pipeline stage, collective depth)`` of every node; a node reading no graph input
    takes the smallest key of its readers."""
    key: dict[ir.Node, tuple[int, int]] = {}
    data: set[ir.Node] = set()
    stage = 0
    for node in graph:
        raw = node.metadata_props.get(STAGE_KEY)
        stage = int(raw) if raw is not None else stage  # unannotated: the previous node's
        depth = 0
        for value in node.inputs:
            if value is None:
                continue
            producer = value.producer()
            if value.is_graph_input() or producer in data:
                data.add(node)
            if producer is not None and producer in key:
                depth = max(depth, key[producer][1] + (1 if producer in points else 0))
        key[node] = (stage, depth)
    for node in reversed(list(graph)):
        if node not in data:
            readers = [key[u.node] for out in node.outputs for u in out.uses() if u.node in key]
            key[node] = min(readers, default=key[node])
    return key

"""ONNX side of :func:`graphpress.export.split_stages`: one ``onnx_ir.Model`` per stage.

Each stage starts from ``model.clone()`` (new nodes and values, the same tensor objects) so
nodes with subgraphs (``If``, ``Loop``) keep their outer-scope references. In the clone every
value entering the stage from an earlier one is replaced by a new graph input of the same
name, dtype and shape; graph inputs are the incoming values in order, graph outputs the
outgoing ones (a value that only passes through is both an input and an output of the stage,
which ONNX and ONNX Runtime accept, so names never change); then the other stages' nodes and
the initializers no kept node reads are removed. ``Constant`` nodes are constants: each stage
keeps the ones its nodes read. Constant-only nodes (``graph.costs.constant_only``: a
``Transpose`` of a weight, the ``Reshape``/``Cast`` feeding ``MatMulNBits``) ignore their
annotation: each stage keeps a copy of the ones its nodes (or the graph outputs) read. Opsets,
functions and model metadata are the source's. A boundary value the source leaves untyped
gets its type from ONNX shape inference on a copy.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graphpress.graph._costs_onnx import captured_values, is_constant_value
from graphpress.graph.analysis import dtype_name, op_name
from graphpress.graph.costs import ValueInfo, constant_only
from graphpress.graph.errors import UnsupportedGraphError
from graphpress.graph.onnx import subgraphs

from .stages import Stage, crossings, non_tensor_error, stage_indices

__all__ = ["split_onnx", "onnx_value_info"]

logger = logging.getLogger(__name__)


def onnx_value_info(value: ir.Value) -> ValueInfo:
    """Name, concrete shape (``None`` if symbolic), torch-style dtype and bytes of ``value``."""
    name = value.name or ""
    if value.type is not None and not isinstance(value.type, ir.TensorType):
        return ValueInfo(name, None, None, 0, False)
    dtype = dtype_name(value.dtype) if value.dtype is not None else None
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape.dims):
        return ValueInfo(name, None, dtype, 0, True)
    dims = tuple(int(d) for d in shape.dims)
    size = 0
    if value.dtype is not None and value.dtype != ir.DataType.STRING:
        size = int(np.ceil(int(np.prod(dims, dtype=np.int64)) * value.dtype.itemsize))
    return ValueInfo(name, dims, dtype, size, True)


def _is_constant_node(node: ir.Node) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not node.inputs


def _constant_only(nodes: list[ir.Node]) -> set[int]:
    """Indices of the nodes computed from constants alone (``constant_only``)."""
    producer = {id(v): i for i, n in enumerate(nodes) for v in n.outputs}

    def read(value: ir.Value) -> object:
        return None if is_constant_value(value) else producer.get(id(value), value)

    return constant_only((i, op_name(n), [read(v) for v in (*n.inputs, *captured_values(n))
                                          if v is not None])
                         for i, n in enumerate(nodes) if not _is_constant_node(n))


def _reads(node: ir.Node) -> list[ir.Value]:
    """Values ``node`` reads, including outer-scope values its subgraphs read."""
    found = [v for v in node.inputs if v is not None]
    for sub in subgraphs(node):
        for inner in sub:
            found.extend(_reads(inner))
    return found


def split_onnx(model: ir.Model, annotation: str) -> list[Stage]:
    graph = model.graph
    nodes = list(graph)
    chains = _constant_only(nodes)
    compute = [i for i, n in enumerate(nodes) if not _is_constant_node(n) and i not in chains]
    marks = [(nodes[i].name or f"{nodes[i].op_type}_{i}", nodes[i].metadata_props.get(annotation))
             for i in compute]
    stage_of = dict(zip(compute, stage_indices(marks, annotation)))
    count = max(stage_of.values(), default=0) + 1
    defined = {value: 0 for value in graph.inputs}
    defined.update((value, stage_of[i]) for i in compute for value in nodes[i].outputs)
    runs_in = {i: {stage_of[i]} for i in compute}  # the stages each node is kept in
    readers: dict[ir.Value, set[int]] = {}  # stages reading a value (count: a graph output)
    for value in graph.outputs:
        readers.setdefault(value, set()).add(count)
    for i in reversed(range(len(nodes))):  # readers first: a chain's stages are its readers'
        if i in chains:
            runs_in[i] = {min(k, count - 1) for v in nodes[i].outputs for k in readers.get(v, ())}
        for value in _reads(nodes[i]) if i in runs_in else ():
            readers.setdefault(value, set()).update(runs_in[i])
    live = crossings(list(defined), defined,
                     {v: max(s) for v, s in readers.items() if v in defined}, count)
    for k in range(1, count):
        for value in live[k]:
            if value.type is not None and not isinstance(value.type, ir.TensorType):
                raise non_tensor_error(value.name or "?", k, str(value.type))
    constant_readers = {  # Constant node -> stages that need it (a graph output: the last)
        i: {min(k, count - 1) for v in node.outputs for k in readers.get(v, ())}
        for i, node in enumerate(nodes) if i not in runs_in
    }
    source = [*graph.inputs, *(v for n in nodes for v in n.outputs)]
    types = _missing_types(model, [v for k in live for v in k])
    stages = []
    for k in range(count):
        takes = list(graph.inputs) if k == 0 else live[k]
        gives = list(graph.outputs) if k == count - 1 else live[k + 1]
        keep = {i for i, where in runs_in.items() if k in where}
        keep |= {i for i, needed in constant_readers.items() if k in needed}
        stage_model = _stage_model(model, source, k, takes, gives, keep)
        for value in (*stage_model.graph.inputs, *stage_model.graph.outputs):
            if value.type is None and value.name in types:
                value.type, value.shape = types[value.name]
        stages.append(Stage(k, stage_model,
                            tuple(onnx_value_info(v) for v in stage_model.graph.inputs),
                            tuple(onnx_value_info(v) for v in stage_model.graph.outputs)))
    logger.debug("split ONNX graph %r into %d stages", graph.name, count)
    return stages


def _missing_types(
    model: ir.Model, values: list[ir.Value]
) -> dict[str, tuple[ir.TypeProtocol, ir.Shape | None]]:
    """Type and shape of the boundary values the graph leaves untyped (a stage's inputs and
    outputs need one), from ONNX shape inference on a copy."""
    untyped = {v.name for v in values if v.type is None}
    if not untyped:
        return {}
    from onnx_ir.passes.common import ShapeInferencePass

    copy = model.clone()
    ShapeInferencePass(check_type=False, strict_mode=False)(copy)
    found = {v.name: (v.type, v.shape) for n in copy.graph for v in n.outputs
             if v.name in untyped and v.type is not None}
    if untyped - set(found):
        raise UnsupportedGraphError(
            f"values {sorted(untyped - set(found))} cross a stage boundary but have no type, and "
            "ONNX shape inference cannot find one; annotate their value_info before splitting")
    return found


def _stage_model(
    model: ir.Model, source: list[ir.Value], index: int, takes: list[ir.Value],
    gives: list[ir.Value], keep: set[int],
) -> ir.Model:
    clone = model.clone()
    new_graph = clone.graph
    # the clone lists inputs and nodes (and so their outputs) in the source's order
    mirror = dict(zip(source, [*new_graph.inputs, *(v for n in new_graph for v in n.outputs)]))
    mirror.update((model.graph.initializers[name], value)
                  for name, value in new_graph.initializers.items())
    inputs = []
    for value in takes:
        copy = mirror[value]
        if not copy.is_graph_input():
            fresh = ir.Value(name=copy.name, shape=copy.shape, type=copy.type)
            copy.replace_all_uses_with(fresh, replace_graph_outputs=True)
            mirror[value] = copy = fresh
        inputs.append(copy)
    outputs = [mirror[value] for value in gives]
    new_graph.inputs.clear()
    new_graph.inputs.extend(inputs)
    new_graph.outputs.clear()
    new_graph.outputs.extend(outputs)
    drop = [n for i, n in enumerate(new_graph) if i not in keep]
    for node in drop:
        _detach(node)
    new_graph.remove(drop, safe=True)
    for name, value in list(new_graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del new_graph.initializers[name]
    clone.metadata_props["graphpress.stage.index"] = str(index)
    return clone


def _detach(node: ir.Node) -> None:
    """Stop ``node`` (and the nodes of its subgraphs) from using any value."""
    for slot in range(len(node.inputs)):
        node.replace_input_with(slot, None)
    for sub in subgraphs(node):
        for inner in sub:
            _detach(inner)

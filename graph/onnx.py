"""Small helpers for mutating ``onnx_ir`` graphs with provenance.

Nodes and values a pass creates record the pass name in
``metadata_props["graphpress.pass"]`` (saved into the ONNX file) and get deterministic names
``<origin>.<pass-tag>.<role>``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

__all__ = [
    "PROVENANCE",
    "mark",
    "constant_array",
    "add_initializer",
    "unique_name",
    "value_names",
    "subgraphs",
    "inferred_tensor_types",
]

logger = logging.getLogger(__name__)

PROVENANCE = "graphpress.pass"


def mark(item: ir.Node | ir.Value, pass_name: str) -> ir.Node | ir.Value:
    """Record that ``pass_name`` created ``item`` (and, for a node, its outputs)."""
    item.metadata_props[PROVENANCE] = pass_name
    if isinstance(item, ir.Node):
        for value in item.outputs:
            value.metadata_props[PROVENANCE] = pass_name
    return item


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy array of ``value`` if it is an initializer or a ``Constant`` output."""
    if value is None or value.is_graph_input():
        return None  # an initializer that is also a graph input can be overridden: not constant
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.value.numpy()
    return None


def unique_name(graph: ir.Graph, name: str, taken: set[str] | None = None) -> str:
    """``name``, or ``name_1``, ``name_2``... if a value of the graph already uses it."""
    taken = taken if taken is not None else value_names(graph)
    candidate, index = name, 1
    while candidate in taken:
        candidate, index = f"{name}_{index}", index + 1
    taken.add(candidate)
    return candidate


def value_names(item: ir.Model | ir.Graph) -> set[str]:
    """Every value name used in a model (all its graphs) or in one graph, for O(1) unique
    naming with :func:`unique_name` / :func:`add_initializer` (pass the set as ``taken``)."""
    graphs = list(item.graphs()) if isinstance(item, ir.Model) else [item]
    names = {v.name for g in graphs for v in (*g.inputs, *g.initializers.values())}
    names.update(v.name for g in graphs for n in g for v in n.outputs if v.name)
    return names


def add_initializer(
    graph: ir.Graph, name: str, array: np.ndarray, pass_name: str, taken: set[str] | None = None
) -> ir.Value:
    """Register ``array`` as a new initializer named ``name`` (made unique); return its value.

    A pass adding many initializers passes ``taken`` (the names in use, updated here) so that
    each call is O(1) instead of scanning the graph.
    """
    unique = unique_name(graph, name, taken)
    # ir.Tensor directly: ir.tensor()'s protocol checks cost ~60 µs per call on long graphs
    value = ir.Value(name=unique, const_value=ir.Tensor(np.asarray(array), name=unique))
    value.shape = ir.Shape(array.shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    mark(value, pass_name)
    return value


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs held by ``node``'s attributes (``If`` branches, ``Loop``/``Scan`` bodies)."""
    found = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            found.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            found.extend(attr.value)
    return found


def inferred_tensor_types(model: ir.Model) -> dict[str, onnx.TypeProto]:
    """What ONNX shape inference gives the main graph's values, by name: the tensor types that
    carry a shape. Computed on a serialised copy (the model is not touched); empty when
    inference fails (a model over 2 GB, for one). Best effort: ORT infers shapes again."""
    try:
        proto = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model),
                                                  strict_mode=False, data_prop=True)
    except Exception as exc:
        logger.debug("ONNX shape inference failed: %s", exc)
        return {}
    return {info.name: info.type for info in proto.graph.value_info
            if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape")}

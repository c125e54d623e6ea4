"""ONNX adapter of the cost model: a :class:`CostTable` from an ``onnx_ir.Model``.

Shapes and dtypes come from the values themselves. When some operator output has none (a
model saved without ``value_info``, or contrib ops a pass added), ONNX shape inference runs on
a structural copy, the contrib matmuls ONNX does not know get their shapes from
``_onnx_rules.contrib_output_shape`` and inference runs once more; the caller's model is not
touched. ``Constant`` nodes are constants, not operator nodes. A node with subgraphs
(``If``/``Loop``/``Scan``) is one node that also reads the outer values its bodies capture.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import onnx_ir as ir

from . import _flops as F
from ._dims import DimBinder, Unbound, symbols_of
from ._onnx_rules import contrib_output_shape, onnx_flops
from .analysis import dtype_name, onnx_constants, op_name
from .costs import CostTable, NodeCost, ValueInfo, unbound_error
from .onnx import subgraphs

__all__ = ["onnx_costs", "is_constant_value", "captured_values"]

logger = logging.getLogger(__name__)


def onnx_costs(model: ir.Model, dims: Mapping[str, int] | None) -> CostTable:
    binder, graph = DimBinder(dims), model.graph
    known = _inferred(model)
    names: dict[int, str] = {}

    def name_of(value: ir.Value, fallback: str) -> str:
        return names.setdefault(id(value), value.name or fallback)

    def info(value: ir.Value, fallback: str) -> ValueInfo:
        name = name_of(value, fallback)
        shape, dtype = value.shape, value.dtype
        if (shape is None or dtype is None) and name in known:
            shape = shape if shape is not None else known[name][0]
            dtype = dtype if dtype is not None else known[name][1]
        is_tensor = not isinstance(value.type, (ir.SequenceType, ir.OptionalType))
        dname = dtype_name(dtype) if dtype is not None else None
        if shape is None:
            return ValueInfo(name, None, dname, 0, is_tensor)
        try:
            dims_ = binder.onnx_shape(shape)
        except Unbound:
            return ValueInfo(name, None, dname, 0, is_tensor)
        return ValueInfo(name, dims_, dname, _nbytes(dims_, dtype), is_tensor)

    def shape_of(value: ir.Value | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        if id(value) in names and names[id(value)] in infos:
            return infos[names[id(value)]].shape
        shape = value.shape or (value.const_value.shape if value.const_value is not None else None)
        try:
            return binder.onnx_shape(shape) if shape is not None else None
        except Unbound:
            return None

    missing = set()
    for value in graph.inputs:
        try:
            binder.onnx_shape(value.shape or ())
        except Unbound:
            missing |= {s for d in value.shape for s in symbols_of(d)} - set(binder.dims)
    if missing:
        raise unbound_error(missing, "ONNX model's input")
    inputs = tuple(info(v, f"input_{i}") for i, v in enumerate(graph.inputs))
    infos: dict[str, ValueInfo] = {v.name: v for v in inputs}
    nodes, aliases, labels = [], {}, set()
    for index, node in enumerate(graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            continue
        label = node.name or f"{node.op_type}_{index}"
        label = label if label not in labels else f"{label}_{index}"  # names must be unique
        labels.add(label)
        outs = tuple(info(v, f"{label}:{i}") for i, v in enumerate(node.outputs))
        infos.update((o.name, o) for o in outs)
        reads, consts = [], []
        for i, value in enumerate([*node.inputs, *captured_values(node)]):
            if value is None:
                continue
            target = consts if is_constant_value(value) else reads
            name = name_of(value, f"{label}:in{i}")
            if name not in target:
                target.append(name)
        if op_name(node) in F.ONNX_ALIAS and node.inputs and node.inputs[0] is not None:
            aliases[outs[0].name] = name_of(node.inputs[0], "")
        nodes.append(NodeCost(label, op_name(node), onnx_flops(node, shape_of), tuple(reads),
                              outs, tuple(consts)))
    constant_bytes = {name: int(t.nbytes) for name, t in onnx_constants(model).items()}
    outputs = tuple(name_of(v, f"output_{i}") for i, v in enumerate(graph.outputs))
    return CostTable(tuple(nodes), inputs, outputs, constant_bytes, aliases)


def _nbytes(shape: tuple[int, ...], dtype: ir.DataType | None) -> int:
    if dtype is None:
        return 0
    try:
        return math.ceil(math.prod(shape) * dtype.itemsize)
    except (TypeError, ValueError, AttributeError):  # strings: no fixed size
        return 0


def is_constant_value(value: ir.Value) -> bool:
    """An initializer that is no graph input, or the output of a ``Constant`` node."""
    if value.is_graph_input():
        return False
    if value.const_value is not None and value.is_initializer():
        return True
    producer = value.producer()
    return (producer is not None and producer.op_type == "Constant"
            and producer.domain in ("", "ai.onnx"))


def captured_values(node: ir.Node) -> list[ir.Value]:
    """Outer-scope values read inside ``node``'s subgraphs (nested ones too)."""
    inner, stack = [], list(subgraphs(node))
    while stack:
        graph = stack.pop()
        inner.append(graph)
        for n in graph:
            stack.extend(subgraphs(n))
    if not inner:
        return []
    owned = {id(g) for g in inner}
    found: dict[int, ir.Value] = {}
    for graph in inner:
        for n in graph:
            for value in n.inputs:
                if value is not None and value.graph is not None and id(value.graph) not in owned:
                    found.setdefault(id(value), value)
    return list(found.values())


def _inferred(model: ir.Model) -> dict[str, tuple[ir.Shape | None, ir.DataType | None]]:
    """Shapes/dtypes of main-graph values, inferred on a copy when some are missing."""
    def incomplete(graph: ir.Graph) -> bool:
        return any(v.shape is None or v.dtype is None
                   for n in graph if n.op_type != "Constant" for v in n.outputs)

    if not incomplete(model.graph):
        return {}
    from onnx_ir.passes.common import ShapeInferencePass

    copy = model.clone()
    infer = ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)
    for _ in range(2):
        infer(copy)
        filled = False
        for node in copy.graph:
            out = node.outputs[0] if node.outputs else None
            if out is None or out.shape is not None:
                continue
            found = contrib_output_shape(node, lambda v: v.shape if v is not None else None)
            if found is not None:
                out.shape, out.dtype, filled = ir.Shape(found[0]), found[1], True
        if not filled or not incomplete(copy.graph):
            break
    result = {}
    for node in copy.graph:
        for value in node.outputs:
            if value.name:
                result[value.name] = (value.shape, value.dtype)
    logger.debug("inferred shapes of %d values on a copy", len(result))
    return result

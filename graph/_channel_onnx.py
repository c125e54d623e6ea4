"""ONNX adapter of the channel view: ``onnx_ir`` nodes as normalised ops.

Only reads: op types, attributes, value shapes, constant shapes and small integer constants
(reshape targets, split sizes, slice bounds, axes). Initializers that are not graph inputs and
``Constant`` outputs are constants; a ``Transpose`` of a constant is looked through, and so is
the ``DequantizeLinear`` of one; quantized layers are normalised by :mod:`._channel_onnx_quant`.
"""

from __future__ import annotations

import onnx_ir as ir

from ._channel_onnx_quant import dequantized, quant_op
from ._channel_onnx_read import (
    array_of,
    dims_of,
    entries_of,
    inferred_dims,
    input_of,
    ints_of,
    is_const,
    through_transpose,
)
from ._channel_view import Const, Entry, Op, View
from .analysis import op_name
from .onnx import subgraphs

__all__ = ["onnx_view"]

_UNARY = {"Relu", "Gelu", "Sigmoid", "Tanh", "Erf", "Neg", "Abs", "Exp", "Log", "Sqrt",
          "Reciprocal", "Identity", "Dropout", "Cast", "CastLike", "LeakyRelu", "Elu", "Selu",
          "Softplus", "HardSigmoid", "HardSwish", "Mish", "Clip", "Sin", "Cos", "Floor", "Ceil",
          "Round", "Sign", "Not", "IsNaN", "IsInf", "Softsign", "Celu", "Relu6", "FastGelu"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Equal", "Less", "Greater",
           "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "Sum"}
_REDUCE = {"ReduceMean": True, "ReduceSum": False, "ReduceMax": False, "ReduceMin": False,
           "ReduceProd": False, "ReduceL1": False, "ReduceL2": False, "ReduceSumSquare": False,
           "ReduceLogSumExp": False, "ReduceLogSum": False}


def _axes(node: ir.Node, index: int) -> list[int] | None:
    if len(node.inputs) > index and node.inputs[index] is not None:
        return ints_of(node.inputs[index])
    attr = node.attributes.get_ints("axes", None)
    return None if attr is None else list(attr)


def _input(value: ir.Value | None, reader: str, names: dict[int, str]):
    return dequantized(value, names) or input_of(value, reader, names)


def _convert(node: ir.Node, names: dict[int, str]) -> tuple[str, list, dict]:  # noqa: C901
    t, a, me = node.op_type, node.attributes, names[id(node)]
    ins = [_input(v, me, names) for v in node.inputs]
    quantized = quant_op(node, ins, me)
    if quantized is not None:
        return quantized
    if node.domain not in ("", "ai.onnx"):
        return "other", ins, {}
    if t in _UNARY:
        return "unary", ins[:1], {}
    if t in _BINARY:
        return "binary", ins, {"add": t in ("Add", "Sub", "Sum")}
    if t == "MatMul" or (t == "Gemm" and not a.get_int("transA", 0)):
        x, w = ins[0], ins[1]
        if isinstance(x, str) and isinstance(w, Const) and len(w.shape) == 2 and (
                a.get_float("alpha", 1.0) == 1.0 and a.get_float("beta", 1.0) == 1.0):
            nk = t == "Gemm" and a.get_int("transB", 0)
            w = w if nk else w.reversed()
            return "linear", [x, w, ins[2] if len(ins) > 2 else None], {}
        if t == "MatMul" and isinstance(x, str) and isinstance(w, str):
            return "matmul", ins, {}
        return "other", ins, {}
    if t == "Reshape":
        return "reshape", ins[:1], {"target": entries_of(node.inputs[1], me, names),
                                    "aux": ins[1:2]}
    if t in ("Flatten", "Squeeze", "Unsqueeze"):
        return "reshape", ins[:1], {"target": None}
    if t == "Transpose":
        perm = a.get_ints("perm", None)
        rank = len(dims_of(node.inputs[0]) or ())
        return "transpose", ins, {"perm": tuple(perm) if perm is not None
                                  else tuple(range(rank))[::-1]}
    if t == "Expand":
        return "expand", ins[:1], {"target": entries_of(node.inputs[1], me, names),
                                   "aux": ins[1:2]}
    if t == "Concat":
        return "concat", ins, {"axis": a.get_int("axis", 0)}
    if t == "Split":
        # sizes in the old ``split`` attribute (opset < 13) cannot be rewritten: blocked
        sizes = ints_of(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
            else None
        name = node.inputs[1].name if len(node.inputs) > 1 and node.inputs[1] is not None else ""
        entries = None if sizes is None else [Entry(v, me, name, k)
                                              for k, v in enumerate(sizes)]
        return "split", ins[:1], {"axis": a.get_int("axis", 0), "sizes": entries,
                                  "aux": ins[1:2]}
    if t == "Slice":
        bounds = [ints_of(v) if v is not None else None for v in node.inputs[1:5]]
        starts, ends, axes, steps = bounds + [None] * (4 - len(bounds))
        if starts is None or ends is None or len(starts) != 1 or (axes is not None and len(axes) != 1):
            return "other", ins[:1], {"aux": ins[1:5]}
        return "slice", ins[:1], {"axis": axes[0] if axes else 0, "start": starts[0],
                                  "end": ends[0], "step": steps[0] if steps else 1,
                                  "aux": ins[1:5]}
    if t == "Gather":
        axis = a.get_int("axis", 0)
        if isinstance(ins[0], Const) and axis == 0 and len(ins[0].shape) == 2:
            return "embedding", ins[:2], {}
        index = array_of(node.inputs[1])
        if index is not None and index.ndim == 0:
            return "select", ins[:1], {"axis": axis}
        return "gather", ins[:2], {"axis": axis}
    if t == "LayerNormalization":
        rank = len(dims_of(node.inputs[0]) or ())
        axis = a.get_int("axis", -1) % max(rank, 1)
        return "layernorm", (ins + [None, None])[:3], {"axes": [k - rank for k in range(axis, rank)]}
    if t == "BatchNormalization":
        return "batchnorm", ins[:5], {}
    if t == "InstanceNormalization":
        return "batchnorm", ins[:3] + [None, None], {}
    if t == "GroupNormalization":
        return "groupnorm", ins[:3], {}
    if t in ("Conv", "ConvTranspose"):
        return "conv", (ins + [None])[:3], {"groups": a.get_int("group", 1),
                                             "transposed": t == "ConvTranspose"}
    if t in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"):
        return "pool", ins[:1], {}
    if t in _REDUCE:
        axes = _axes(node, 1)
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            return "other", ins, {}
        return "reduce", ins[:1], {"axes": axes or None, "keepdim": bool(a.get_int("keepdims", 1)),
                                   "mean": _REDUCE[t], "what": t}
    if t in ("Softmax", "LogSoftmax"):
        return "softmax", ins, {"axis": a.get_int("axis", -1)}
    if t in ("Shape", "Size"):
        return "shape", [], {}
    return "other", ins, {}


def _outer_values(node: ir.Node) -> list[str]:
    """Main-graph values read inside ``node``'s subgraphs (If/Loop/Scan bodies)."""
    bodies = subgraphs(node)
    defined: set[int] = set()
    read: list[ir.Value] = []
    stack = list(bodies)
    while stack:
        body = stack.pop()
        defined.update(id(v) for v in (*body.inputs, *body.initializers.values()))
        for inner in body:
            defined.update(id(v) for v in inner.outputs)
            read.extend(v for v in inner.inputs if v is not None)
            stack.extend(a.value for a in inner.attributes.values()
                         if a.type == ir.AttributeType.GRAPH)
            stack.extend(g for a in inner.attributes.values()
                         if a.type == ir.AttributeType.GRAPHS for g in a.value)
        read.extend(body.outputs)
    return list(dict.fromkeys(v.name for v in read if id(v) not in defined))


def onnx_view(model: ir.Model) -> View:
    """The normalised channel view of an ONNX model's main graph."""
    g = model.graph
    ops: list[Op] = []
    shapes: dict[str, tuple | None] = {}
    for value in g.inputs:
        shapes[value.name] = dims_of(value)
    names = {id(node): node.name or f"{node.op_type}_{index}" for index, node in enumerate(g)}
    missing = any(v.shape is None for node in g for v in node.outputs)
    inferred = inferred_dims(model) if missing else {}
    for node in g:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            continue
        if node.op_type == "Transpose" and through_transpose(node.outputs[0]) is not None:
            continue  # looked through by its consumers
        if node.op_type == "DequantizeLinear" and dequantized(node.outputs[0], names):
            continue  # so is the dequantization of a constant
        kind, ins, attrs = _convert(node, names)
        outer = _outer_values(node)
        if outer:  # a subgraph reads these from the main graph: no rule can follow them
            kind, ins = "other", ins + outer
        for value in node.outputs:
            shapes[value.name] = dims_of(value) or inferred.get(value.name)
        ops.append(Op(names[id(node)], kind, ins, [v.name for v in node.outputs], attrs, op_name(node)))
    order = {names[id(node)]: k for k, node in enumerate(g)}
    return View(ops, shapes, [v.name for v in g.inputs if not is_const(v)],
                [v.name for v in g.outputs], order)

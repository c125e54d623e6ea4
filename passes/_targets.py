"""Which values calibration looks at by default, and which names a graph has.

A runtime quantizes the inputs of MatMul/Gemm/Conv (and the adds it fuses into them); their
float activation inputs are the values whose ranges matter. A value is a *weight*, not an
activation, when it is computed from constants only (initializers, ``Constant`` nodes,
FX ``get_attr``, and anything derived from those alone, e.g. a transposed weight). Mask and
arithmetic paths (the additive attention mask, position-id arithmetic) never feed these ops
directly, so they are left out without special cases.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import torch
from torch import fx

from graphpress.graph.kind import Graph, kind

__all__ = ["activation_targets", "graph_names", "ONNX_QUANTIZABLE", "FX_QUANTIZABLE"]

logger = logging.getLogger(__name__)

#: ONNX op type -> positions of the inputs that may be activations.
ONNX_QUANTIZABLE = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (0, 1), "ConvTranspose": (0, 1)}

_aten = torch.ops.aten
#: aten overload packet -> positions of the inputs that may be activations.
FX_QUANTIZABLE = {
    _aten.linear: (0, 1), _aten.matmul: (0, 1), _aten.mm: (0, 1), _aten.bmm: (0, 1),
    _aten.addmm: (1, 2), _aten.baddbmm: (1, 2), _aten.convolution: (0, 1),
    _aten.conv1d: (0, 1), _aten.conv2d: (0, 1), _aten.conv3d: (0, 1),
    _aten.conv_transpose1d: (0, 1), _aten.conv_transpose2d: (0, 1),
    _aten.conv_transpose3d: (0, 1),
}

_ONNX_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def activation_targets(graph: Graph) -> list[str]:
    """Float activations feeding quantizable ops, in graph order (ONNX value or FX node names)."""
    return _fx_targets(graph) if kind(graph) == "fx" else _onnx_targets(graph)


def graph_names(graph: Graph) -> set[str]:
    """Every name a calibration table may refer to: FX node names, or ONNX value names."""
    if kind(graph) == "fx":
        return {node.name for node in graph.graph.nodes}
    names = {v.name for v in graph.graph.inputs} | set(graph.graph.initializers)
    for node in ir.traversal.RecursiveGraphIterator(graph.graph):
        names.update(v.name for v in node.outputs if v.name)
    return names


def _onnx_targets(model: ir.Model) -> list[str]:
    graph = model.graph
    constant: set[str] = set(graph.initializers)
    for node in graph:
        inputs = [v for v in node.inputs if v is not None]
        if node.op_type == "Constant" or (inputs and all(v.name in constant for v in inputs)):
            constant.update(v.name for v in node.outputs)
    targets: dict[str, None] = {}
    for node in graph:
        positions = ONNX_QUANTIZABLE.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        for i in positions or ():
            value = node.inputs[i] if i < len(node.inputs) else None
            if value is None or value.name in constant:
                continue
            if value.dtype is None or value.dtype in _ONNX_FLOATS:
                targets[value.name] = None
    return list(targets)


def _fx_targets(gm: fx.GraphModule) -> list[str]:
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "get_attr" or (node.op == "call_function" and inputs
                                     and all(n in constant for n in inputs)):
            constant.add(node)
    targets: dict[str, None] = {}
    for node in gm.graph.nodes:
        packet = getattr(node.target, "overloadpacket", None)
        positions = FX_QUANTIZABLE.get(packet) if node.op == "call_function" else None
        for i in positions or ():
            arg = node.args[i] if i < len(node.args) else None
            if not isinstance(arg, fx.Node) or arg in constant:
                continue
            val = arg.meta.get("val")
            if val is None or (isinstance(val, torch.Tensor) and val.dtype.is_floating_point):
                targets[arg.name] = None
    return list(targets)

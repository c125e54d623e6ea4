"""The per-token view of a graph that sequence parallelism reads (FX and ONNX).

A node is *per-token* when every output token depends only on the same token of its inputs:
element-wise arithmetic and activations, casts and copies, dropout, and reductions over the
last (hidden) axis only: ``layer_norm``/``LayerNormalization`` over one axis, RMS norms, a
keep-dim ``mean``/``ReduceMean`` over the last axis. Values are keyed by name (FX node name,
ONNX value name); constants (``get_attr``, initializers, ``Constant`` outputs) are marked so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx_ir as ir
import torch
from torch import fx

from graphpress.graph.analysis import op_name
from graphpress.graph.fx import get_tensor

from .._rewrite import onnx_const
from ._tp_graph import GraphReader

__all__ = ["SpNode", "SpView", "sp_view"]

logger = logging.getLogger(__name__)

_ELEMENTWISE = {
    "aten.add", "aten.sub", "aten.mul", "aten.div", "aten.pow", "aten.rsqrt", "aten.sqrt",
    "aten.neg", "aten.exp", "aten.tanh", "aten.gelu", "aten.silu", "aten.relu", "aten.sigmoid",
    "aten.erf", "aten.reciprocal", "aten._to_copy", "aten.to", "aten.clone", "aten.alias",
    "aten.contiguous", "aten.dropout", "aten._assert_tensor_metadata", "getitem",
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Exp", "Tanh", "Gelu",
    "Sigmoid", "Relu", "Erf", "Cast", "Identity", "Dropout", "Sum",
    "com.microsoft::Gelu", "com.microsoft::FastGelu"}
_NORMS = {"aten.layer_norm", "aten.native_layer_norm", "aten.rms_norm", "LayerNormalization",
          "RMSNormalization", "SimplifiedLayerNormalization",
          "com.microsoft::SimplifiedLayerNormalization", "com.microsoft::SkipLayerNormalization",
          "com.microsoft::SkipSimplifiedLayerNormalization"}
_MEANS = {"aten.mean", "ReduceMean"}


@dataclass
class SpNode:
    name: str
    op: str
    ins: list[str]  # data and constant inputs (value keys), in order
    outs: list[str]
    per_token: bool
    norm: bool  # a normalisation or keep-dim statistic (its module gets SequenceParallel)
    module: str | None


@dataclass
class SpView:
    nodes: dict[str, SpNode]
    producer: dict[str, str]
    users: dict[str, list[str]] = field(default_factory=dict)
    shapes: dict[str, tuple | None] = field(default_factory=dict)
    consts: set[str] = field(default_factory=set)
    inputs: set[str] = field(default_factory=set)
    outputs: set[str] = field(default_factory=set)


def sp_view(graph, reader: GraphReader | None = None) -> SpView:
    reader = reader or GraphReader(graph)
    view = SpView({}, {})
    if reader.kind == "fx":
        _fx(graph, reader, view)
    else:
        _onnx(graph, reader, view)
    for node in view.nodes.values():
        for key in node.ins:
            view.users.setdefault(key, []).append(node.name)
        for key in node.outs:
            view.producer[key] = node.name
    return view


def _fx(gm: fx.GraphModule, reader: GraphReader, view: SpView) -> None:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        view.shapes[node.name] = tuple(val.shape) if isinstance(val, torch.Tensor) else None
        if node.op == "get_attr":
            view.consts.add(node.name)
            tensor = get_tensor(gm, node)
            view.shapes[node.name] = None if tensor is None else tuple(tensor.shape)
        elif node.op == "placeholder":
            view.inputs.add(node.name)
        elif node.op == "output":
            view.outputs.update(n.name for n in node.all_input_nodes)
        elif node.op == "call_function":
            name = op_name(node)
            norm = (name in _NORMS and len(node.args) > 1 and len(node.args[1]) == 1) or (
                name in _MEANS and _last_axis_fx(node))  # normalized_shape: the hidden axis
            per_token = name in _ELEMENTWISE or norm
            view.nodes[node.name] = SpNode(node.name, name, [n.name for n in node.all_input_nodes],
                                           [node.name], per_token, norm,
                                           reader.module_of(node.name))


def _last_axis_fx(node: fx.Node) -> bool:
    dims = node.args[1] if len(node.args) > 1 else None
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    rank = val.dim() if isinstance(val, torch.Tensor) else None
    return bool(keep) and isinstance(dims, (list, tuple)) and len(dims) == 1 and (
        dims[0] == -1 or (rank is not None and dims[0] == rank - 1))


def _onnx(model: ir.Model, reader: GraphReader, view: SpView) -> None:
    graph = model.graph
    view.inputs.update(v.name for v in graph.inputs)
    view.outputs.update(v.name for v in graph.outputs)
    for name, value in graph.initializers.items():
        if not value.is_graph_input() and value.const_value is not None:
            view.consts.add(name)
            view.shapes[name] = tuple(value.const_value.shape)
    for node in graph:
        for value in node.outputs:
            view.shapes[value.name] = None if value.shape is None else tuple(
                d if isinstance(d, int) else None for d in value.shape)
        name, key = op_name(node), node.name or node.outputs[0].name
        if name == "Constant":
            view.consts.update(v.name for v in node.outputs)
            array = onnx_const(node.outputs[0])
            view.shapes[node.outputs[0].name] = None if array is None else array.shape
            continue
        norm = (name in _NORMS and node.attributes.get_int("axis", -1) in (-1, _rank(node) - 1)) \
            or (name in _MEANS and _last_axis_onnx(node))
        view.nodes[key] = SpNode(key, name, [v.name for v in node.inputs if v is not None],
                                 [v.name for v in node.outputs], name in _ELEMENTWISE or norm,
                                 norm, reader.module_of(key))


def _rank(node: ir.Node) -> int:
    shape = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
    return len(shape) if shape is not None else 0


def _last_axis_onnx(node: ir.Node) -> bool:
    if not node.attributes.get_int("keepdims", 1):
        return False
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1:
        array = onnx_const(node.inputs[1])
        axes = None if array is None else [int(a) for a in array.reshape(-1)]
    return axes is not None and len(axes) == 1 and axes[0] in (-1, _rank(node) - 1)

"""Fold constant input channels of a PADDED convolution into one ones-channel.

A padded convolution sees a constant input channel ``k_c`` as ``k_c`` inside the image and 0 in
the padding, so its contribution is not a bias but a fixed map that varies near the border:

    Σ_c W[:, c] ⋆ (k_c · 1_image)  =  S ⋆ 1_image,      S[o, …] = Σ_c k_c · W[o, c, …]

(``_fold_bias.contribution(..., spatial=True)``). The constant channels go and ONE channel of
ones joins the input instead: ``conv(cat([x, 1_image]), cat([W, S], in_axis))``. ``1_image`` is
built at run time from the input's first channel (all ones, same size), so the rewrite is
exact for any input size, and the convolution stays one node (a batch norm after it still
folds). The new weight ``<weight>.foldpruned.map`` keeps the old one's origin so the channel
group's slicing still finds it; the ones channel (last) is never sliced.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import torch
from torch import fx

from graphpress.graph.fx import add_tensor, get_tensor, mark
from graphpress.graph.onnx import add_initializer, unique_name
from graphpress.graph.onnx import mark as mark_onnx

from .._rewrite import onnx_const

__all__ = ["add_ones_channel_fx", "add_ones_channel_onnx"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten


def _extended(weight: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return np.concatenate([weight, kernel[:, None].astype(weight.dtype)], axis=1)


def add_ones_channel_fx(gm: fx.GraphModule, node: fx.Node, kernel: np.ndarray,
                        pass_name: str) -> tuple[fx.Node, fx.Node]:
    """Rebind ``node`` (a convolution) to ``cat([x, ones])`` and ``[W | S]``; returns
    (old weight node, new weight node)."""
    x, weight = node.args[0], node.args[1]
    tensor = get_tensor(gm, weight)
    new = torch.from_numpy(np.ascontiguousarray(_extended(
        tensor.detach().float().numpy(), kernel))).to(tensor.dtype)
    graph = gm.graph
    with graph.inserting_before(node):
        const = mark(graph.get_attr(add_tensor(gm, f"{weight.target}.foldpruned.map", new)),
                     pass_name)
        first = mark(graph.call_function(_aten.slice.Tensor, (x, 1, 0, 1)), pass_name)
        ones = mark(graph.call_function(_aten.ones_like.default, (first,)), pass_name)
        joined = mark(graph.call_function(_aten.cat.default, ([x, ones], 1)), pass_name)
    node.args = (joined, const, *node.args[2:])
    return weight, const


def add_ones_channel_onnx(model: ir.Model, node: ir.Node, kernel: np.ndarray, pass_name: str,
                          taken: set[str]) -> tuple[ir.Value, ir.Value]:
    """The ONNX form (``Slice`` → ``Shape`` → ``ConstantOfShape(1)`` → ``Concat`` into the
    ``Conv``); returns (old weight, new weight)."""
    graph, x, weight = model.graph, node.inputs[0], node.inputs[1]
    array = onnx_const(weight)
    base = f"{weight.name}.foldpruned.map"

    def value(role: str, dtype=None) -> ir.Value:
        made = ir.Value(name=unique_name(graph, f"{base}.{role}", taken))
        made.type = ir.TensorType(dtype) if dtype is not None else x.type
        return made

    def init(role: str, data: np.ndarray) -> ir.Value:
        return add_initializer(graph, f"{base}.{role}", data, pass_name, taken)

    first, shape, ones, joined = (value("first"), value("shape", ir.DataType.INT64),
                                  value("ones"), value("input"))
    one = np.array([0], np.int64)
    nodes = [
        ir.node("Slice", [x, init("starts", one), init("ends", one + 1), init("axes", one + 1)],
                outputs=[first]),
        ir.node("Shape", [first], outputs=[shape]),
        ir.node("ConstantOfShape", [shape], outputs=[ones],
                attributes={"value": ir.tensor(np.ones(1, array.dtype))}),
        ir.node("Concat", [x, ones], outputs=[joined], attributes={"axis": 1}),
    ]
    for i, made in enumerate(nodes):
        made.name = unique_name(graph, f"{base}.node{i}", taken)
        mark_onnx(made, pass_name)
    graph.insert_before(node, nodes)
    new = add_initializer(graph, base, _extended(array, kernel), pass_name, taken)
    node.replace_input_with(0, joined)
    node.replace_input_with(1, new)
    return weight, new

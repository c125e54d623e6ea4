"""Fold constant input channels of a linear or convolution consumer into its bias.

If input channel ``c`` of a consumer ``y = W ⋆ x + b`` always carries the constant ``k_c``,
then ``y = W_{:,¬C} ⋆ x_{¬C} + (b + Σ_{c∈C} k_c · Σ_spatial W_{:, c})``: the channels go from
the input and the weight, and their contribution joins the bias (exact for a linear layer and
for a convolution without padding; with padding the border sees zeros instead of ``k_c``, so
only ``k_c = 0`` is exact there). :func:`contribution` is the IR-free part; the FX and ONNX
helpers bind a NEW bias (``<weight>.<tag>.bias``, ``foldpruned`` unless the caller names
another tag), adding one where there was none
(FX ``aten.add``, ONNX ``Add`` after a ``MatMul``).
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

from .._rewrite import drop_unused_constants, onnx_const, remove_dead_fx

__all__ = ["contribution", "fx_consumer", "onnx_consumer", "add_bias_fx", "add_bias_onnx",
           "apply_bias_deltas"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_FX_CONV = {_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default,
            _aten.convolution.default}


def contribution(weight: np.ndarray, in_axis: int, out_axis: int, channels: np.ndarray,
                 values: np.ndarray, *, spatial: bool = False) -> np.ndarray:
    """``Σ_c values_c · W[.., c, ..]`` summed over every axis but ``out_axis`` (float64), or
    with ``spatial`` only over ``in_axis``: the ``[O, *kernel]`` kernel of one input channel."""
    w = np.take(np.asarray(weight, np.float64), channels, axis=in_axis)
    shape = [1] * w.ndim
    shape[in_axis] = -1
    w = (w * np.asarray(values, np.float64).reshape(shape)).sum(axis=in_axis)
    out = out_axis - (out_axis > in_axis)
    if spatial:
        return np.moveaxis(w, out, 0)
    return np.moveaxis(w, out, 0).reshape(w.shape[out], -1).sum(axis=1)


def fx_consumer(node: fx.Node) -> tuple[int, bool] | None:
    """(out axis of the stored weight, padded?) of a foldable FX consumer, else ``None``."""
    if node.target is _aten.linear.default:
        return 0, False
    if node.target in (_aten.addmm.default, _aten.mm.default, _aten.matmul.default):
        weight = node.args[2 if node.target is _aten.addmm.default else 1]
        return (1, False) if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
    if node.target in _FX_CONV:
        transposed = node.target is _aten.convolution.default and node.args[6]
        groups = node.args[8 if node.target is _aten.convolution.default else 6] if len(
            node.args) > (8 if node.target is _aten.convolution.default else 6) else 1
        padding = node.args[4] if len(node.args) > 4 else 0
        padded = any(p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding]))
        return None if transposed or groups != 1 else (0, padded)
    return None


def onnx_consumer(node: ir.Node) -> tuple[int, bool] | None:
    """(out axis of the weight, padded?) of a foldable ONNX consumer, else ``None``."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul":
        return 1, False
    if node.op_type == "Gemm" and not node.attributes.get_int("transA", 0):
        return (0 if node.attributes.get_int("transB", 0) else 1), False
    if node.op_type == "Conv" and node.attributes.get_int("group", 1) == 1:
        pads = node.attributes.get_ints("pads", None) or []
        auto = node.attributes.get_string("auto_pad", "NOTSET")
        return 0, any(p != 0 for p in pads) or auto in ("SAME_UPPER", "SAME_LOWER")
    return None


def add_bias_fx(gm: fx.GraphModule, node: fx.Node, delta: np.ndarray, pass_name: str,
                tag: str = "foldpruned") -> tuple[fx.Node | None, fx.Node]:
    """Make ``node`` (linear/conv/addmm/mm/matmul) compute ``+ delta`` on its output channels;
    returns the old bias ``get_attr`` (``None`` if there was none) and the new one
    (``<weight>.<tag>.bias``)."""
    index = 0 if node.target is _aten.addmm.default else 2
    old = node.args[index] if len(node.args) > index else None
    weight = node.args[2 if node.target is _aten.addmm.default else 1]
    dtype = get_tensor(gm, weight).dtype if isinstance(weight, fx.Node) else torch.float32
    base = get_tensor(gm, old) if isinstance(old, fx.Node) else None
    if isinstance(old, fx.Node) and base is None:
        raise ValueError(f"the bias of {node.name} is not a constant")
    total = delta if base is None else base.detach().double().numpy() + delta
    name = f"{getattr(weight, 'target', node.name)}.{tag}.bias"
    with gm.graph.inserting_before(node):
        bias = mark(gm.graph.get_attr(add_tensor(gm, name, torch.from_numpy(
            np.ascontiguousarray(total)).to(dtype))), pass_name)
    if node.target in (_aten.mm.default, _aten.matmul.default):
        with gm.graph.inserting_after(node):
            add = mark(gm.graph.call_function(_aten.add.Tensor, (node, bias)), pass_name)
        node.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
        if "val" in node.meta:
            add.meta["val"] = node.meta["val"]
        return None, bias
    args = [*node.args, *[None] * (index + 1 - len(node.args))]
    args[index] = bias
    node.args = tuple(args)
    return (old if isinstance(old, fx.Node) else None), bias


def add_bias_onnx(model: ir.Model, node: ir.Node, delta: np.ndarray, pass_name: str,
                  taken: set[str], tag: str = "foldpruned") -> list[tuple[ir.Value, ir.Value]]:
    """Make ``node`` (MatMul/Gemm/Conv) compute ``+ delta``; returns (old, new) biases."""
    graph, weight = model.graph, node.inputs[1]
    dtype = onnx_const(weight).dtype
    name = f"{weight.name}.{tag}.bias"
    if node.op_type in ("Gemm", "Conv"):
        index = 2
        old = node.inputs[index] if len(node.inputs) > index else None
        base = onnx_const(old) if old is not None else None
        scale = 1.0
        if node.op_type == "Gemm":
            delta = delta * node.attributes.get_float("alpha", 1.0)
            scale = node.attributes.get_float("beta", 1.0)
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        total = delta if base is None else base.astype(np.float64) * scale + delta
        if len(node.inputs) <= index:
            node.resize_inputs(index + 1)
        new = add_initializer(graph, name, total.astype(dtype), pass_name, taken)
        node.replace_input_with(index, new)
        return [(old, new)] if old is not None else []
    out = node.outputs[0]
    users = out.uses()
    add = users[0].node if len(users) == 1 and not out.is_graph_output() else None
    if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx"):
        slot = 1 - users[0].idx
        base = onnx_const(add.inputs[slot])
        if base is not None and base.ndim <= 1:
            old = add.inputs[slot]
            new = add_initializer(graph, name, (base.astype(np.float64) + delta).astype(
                base.dtype), pass_name, taken)
            add.replace_input_with(slot, new)
            return [(old, new)]
    bias = add_initializer(graph, name, delta.astype(dtype), pass_name, taken)
    new_out = ir.Value(name=unique_name(graph, f"{out.name}.{tag}.out", taken),
                       type=out.type, shape=out.shape)
    plus = ir.node("Add", [out, bias], outputs=[new_out],
                   name=unique_name(graph, f"{node.name or out.name}.{tag}.add", taken))
    graph.insert_after(node, mark_onnx(plus, pass_name))
    for use in list(out.uses()):
        if use.node is not plus:
            use.node.replace_input_with(use.idx, new_out)
    for i, value in enumerate(graph.outputs):  # a graph output keeps its name
        if value is out:
            keep = out.name
            out.name = unique_name(graph, f"{keep}.{tag}.pre", taken)
            new_out.name = keep
            graph.outputs[i] = new_out
    return []


def apply_bias_deltas(graph, shrinker, deltas: dict, pass_name: str,
                      tag: str = "foldpruned") -> None:
    """Add ``delta`` to the bias of every consumer in ``deltas`` = ``{node: (use, out_axis,
    delta over the ORIGINAL output channels)}``, once the groups are shrunk: the delta loses the
    rows the consumer's weight lost (another group may have pruned its outputs), and the bias
    it joins, or the one it becomes, inherits the old bias's name for later shrinking."""
    for node, (use, out_axis, delta) in deltas.items():
        delta = np.delete(np.asarray(delta, np.float64), shrinker.removed(use, out_axis))
        if isinstance(node, fx.Node):
            old, new = add_bias_fx(graph, node, delta, pass_name, tag)
            if old is not None:
                shrinker.origin[new] = shrinker.origin.get(old, old.target)
                remove_dead_fx(graph, [old])
        else:
            for old, new in add_bias_onnx(graph, node, delta, pass_name, shrinker.taken, tag):
                new.meta["prune.origin"] = old.meta.get("prune.origin", old.name)
                drop_unused_constants([old])

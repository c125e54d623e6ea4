"""fold-batchnorm: fold an inference batch norm into the convolution or linear layer before it.

Per output channel ``c``: ``w'_c = w_c·γ_c/√(σ²_c+ε)`` and ``b'_c = (b_c−μ_c)·γ_c/√(σ²_c+ε)+β_c``
(``_numerics.fold_batchnorm``, float64, cast back). The layer keeps its node and is rebound to
the new weight and bias tensors; the batch norm node goes, and weights nobody uses any more go
with it. The layer must be the batch norm's only producer on that path (its output has no other
use), so nothing else observes the un-normalised values.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
import torch
from torch import fx
from torch.fx.operator_schemas import normalize_function

from graphpress.graph.fx import add_tensor, get_tensor, mark
from graphpress.graph.onnx import add_initializer, unique_name
from graphpress.graph.onnx import mark as mark_onnx

from .._numerics import fold_batchnorm
from .._rewrite import (
    bypass_onnx,
    drop_unused_constants,
    onnx_const,
    remove_dead_fx,
    require_canonical,
    value_names,
)
from ..base import Pass, PassResult
from ..registry import register

__all__ = ["FoldBatchNorm"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_FX_LAYERS = {_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default,
              _aten.conv1d.padding, _aten.conv2d.padding, _aten.conv3d.padding,
              _aten.convolution.default, _aten.linear.default}
_FX_BATCHNORMS = {_aten.batch_norm.default, _aten.native_batch_norm.default,
                  _aten._native_batch_norm_legit_no_training.default}


@register
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold an inference batch norm into the convolution or linear layer that feeds it.

    **Rules**
      1. FX ``aten.conv{1,2,3}d``/``convolution`` (not transposed) or ``aten.linear`` with a
         2-D output, followed by ``aten.batch_norm``/``native_batch_norm`` (training false) or
         ``_native_batch_norm_legit_no_training`` (only its result 0 used).
      2. ONNX ``Conv``; ``Gemm`` (weight channel axis 1, or 0 with ``transB``; the new bias
         absorbs ``beta`` and ``beta`` becomes 1); ``MatMul`` with a 2-D output, optionally
         followed by ``Add`` of a constant bias; then ``BatchNormalization`` with
         ``training_mode=0`` and only output 0 used.
      3. Only when the layer's output (and the ``Add``'s) has no other use and is not a graph
         output, and the weight, bias and batch-norm parameters are constants.
      4. The layer gets new weight/bias tensors ``<weight>.bnfold.weight`` and
         ``<weight>.bnfold.bias``; a bias-less ONNX MatMul gets a new ``Add``. The batch norm
         goes away; tensors left unused are removed.

    **Requires** an FX graph in the aten dialect. **Ensures** the graph's interface is unchanged.
    """

    name: ClassVar[str] = "fold-batchnorm"

    def requires(self, graph) -> None:
        require_canonical(graph)

    def run_fx(self, gm: fx.GraphModule) -> PassResult:
        folded, stale = 0, []
        for bn in [n for n in gm.graph.nodes if n.target in _FX_BATCHNORMS]:
            match = _match_fx(gm, bn)
            if match is None:
                continue
            layer, bias, params, eps = match
            weight = layer.args[1]
            with torch.no_grad():
                tensors = [None if n is None else get_tensor(gm, n) for n in (weight, bias, *params)]
                new = fold_batchnorm(*tensors, eps, axis=0)
            with gm.graph.inserting_before(layer):  # Rule 4
                nodes = [mark(gm.graph.get_attr(add_tensor(gm, f"{weight.target}.bnfold.{role}", t)),
                              self.name) for role, t in zip(("weight", "bias"), new)]
            if isinstance(weight.meta.get("val"), torch.Tensor):
                nodes[0].meta["val"] = weight.meta["val"]
                nodes[1].meta["val"] = weight.meta["val"].new_empty(new[1].shape)
            args = [*layer.args, *[None] * (3 - len(layer.args))]
            args[1], args[2] = nodes
            layer.args = tuple(args)
            for user in list(bn.users) if bn.target is not _aten.batch_norm.default else ():
                if user.args[1] == 0:  # tuple-returning variants: getitem(bn, i)
                    user.replace_all_uses_with(layer)
                gm.graph.erase_node(user)
            bn.replace_all_uses_with(layer)
            gm.graph.erase_node(bn)
            stale.extend(n for n in (weight, bias, *params) if n is not None)
            folded += 1
        _, attrs = remove_dead_fx(gm, stale)
        if folded:
            gm.recompile()
        return PassResult(gm, folded > 0, {"batchnorms_folded": folded, "attributes_removed": attrs})

    def run_onnx(self, model: ir.Model) -> PassResult:
        folded, stale, taken = 0, {}, value_names(model)
        for graph in list(model.graphs()):
            for bn in list(graph):
                match = _match_onnx(bn) if bn.op_type == "BatchNormalization" else None
                if match is None:
                    continue
                layer, add, bias, axis, params, eps = match
                weight = layer.inputs[1]
                beta = layer.attributes.get_float("beta", 1.0) if layer.op_type == "Gemm" else 1.0
                old_bias = None if bias is None else onnx_const(bias) * beta
                new_w, new_b = fold_batchnorm(onnx_const(weight), old_bias, *params, eps, axis=axis)
                inits = [add_initializer(graph, f"{weight.name}.bnfold.{role}", array, self.name, taken)
                         for role, array in (("weight", new_w), ("bias", new_b))]
                layer.replace_input_with(1, inits[0])  # Rule 4
                if add is not None:
                    add.replace_input_with(list(add.inputs).index(bias), inits[1])
                    out = add.outputs[0]
                elif layer.op_type == "MatMul":
                    y = layer.outputs[0]
                    out = ir.Value(name=unique_name(graph, f"{y.name}.bnfold.out", taken),
                                   type=y.type, shape=y.shape)
                    node = ir.node("Add", [y, inits[1]], outputs=[out], name=unique_name(
                        graph, f"{layer.name or y.name}.bnfold.add", taken))
                    graph.insert_after(layer, mark_onnx(node, self.name))
                else:
                    layer.resize_inputs(3)
                    layer.replace_input_with(2, inits[1])
                    if layer.op_type == "Gemm":
                        layer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
                    out = layer.outputs[0]
                stale.update((v, None) for v in (weight, bias, *bn.inputs[1:]) if v is not None)
                bypass_onnx(bn, bn.outputs[0], out)
                folded += 1
        drop_unused_constants(stale)
        return PassResult(model, folded > 0, {"batchnorms_folded": folded})


def _match_fx(gm: fx.GraphModule, bn: fx.Node):
    """(layer, bias node, [γ, β, μ, σ²] nodes, eps) if ``bn`` folds into its input (Rules 1, 3)."""
    call = normalize_function(bn.target, bn.args, bn.kwargs, normalize_to_only_use_kwargs=True)
    kw = call.kwargs if call is not None else {"training": True}
    layer = kw.get("input")
    if kw.get("training") or not isinstance(layer, fx.Node) or layer.target not in _FX_LAYERS:
        return None
    if len(layer.users) != 1 or len(layer.args) < 2 or "bias" in layer.kwargs:
        return None
    if layer.target is _aten.convolution.default and layer.args[6]:
        return None  # transposed convolution: output channels are not axis 0
    val = layer.meta.get("val")
    if layer.target is _aten.linear.default and (val is None or val.dim() != 2):
        return None  # batch norm normalises dim 1, the features only for 2-D inputs
    if any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in bn.users
           if bn.target is not _aten.batch_norm.default):
        return None
    weight, bias = layer.args[1], layer.args[2] if len(layer.args) > 2 else None
    params = [kw["weight"], kw["bias"], kw["running_mean"], kw["running_var"]]
    for i, node in enumerate((weight, bias, *params)):
        if (node is not None or i in (0, 4, 5)) and not _is_fx_const(gm, node):
            return None
    if get_tensor(gm, weight).shape[0] != get_tensor(gm, params[2]).shape[0]:
        return None
    return layer, bias, params, kw["eps"]


def _is_fx_const(gm: fx.GraphModule, node: object) -> bool:
    return isinstance(node, fx.Node) and get_tensor(gm, node) is not None


def _match_onnx(bn: ir.Node):
    """(layer, add, bias value, channel axis, [γ, β, μ, σ²], eps) if ``bn`` folds (Rules 2, 3)."""
    if bn.domain not in ("", "ai.onnx") or bn.attributes.get_int("training_mode", 0):
        return None
    if any(v.uses() or v.is_graph_output() for v in bn.outputs[1:]):
        return None
    params = [onnx_const(v) for v in bn.inputs[1:5]]
    layer, add = _single_producer(bn.inputs[0], bn.graph), None
    if layer is None or any(p is None or p.ndim != 1 for p in params):  # not spatial=0 (opset<9)
        return None
    bias = layer.inputs[2] if len(layer.inputs) > 2 else None
    if layer.op_type == "Add":
        for index in (0, 1):
            inner = _single_producer(layer.inputs[index], bn.graph)
            other = layer.inputs[1 - index]
            if inner is not None and inner.op_type == "MatMul" and onnx_const(other) is not None:
                add, bias, layer = layer, other, inner
                break
    if layer.op_type == "Conv":
        axis = 0
    elif layer.op_type == "Gemm":
        axis = 0 if layer.attributes.get_int("transB", 0) else 1
    elif layer.op_type == "MatMul" and _rank(layer.outputs[0], layer.inputs[0]) == 2:
        axis = 1
    else:
        return None
    weight = onnx_const(layer.inputs[1])
    if layer.domain not in ("", "ai.onnx") or weight is None or weight.ndim < 2:
        return None
    if weight.shape[axis] != params[2].shape[0]:
        return None
    bias_array = None if bias is None else onnx_const(bias)
    if bias is not None and (bias_array is None or bias_array.ndim > 2):  # keep the rank 2
        return None
    return layer, add, bias, axis, params, bn.attributes.get_float("epsilon", 1e-5)


def _single_producer(value: ir.Value | None, graph: ir.Graph) -> ir.Node | None:
    if value is None or value.is_graph_output() or len(value.uses()) != 1:
        return None
    producer = value.producer()
    return producer if producer is not None and producer.graph is graph else None


def _rank(*values: ir.Value) -> int | None:
    for value in values:
        if value.shape is not None:
            return len(value.shape)
    return None

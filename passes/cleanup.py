"""Cleanup passes: dead-code elimination and identity elimination.

Both run in time linear in the graph size. Dead code is removed by one reverse sweep in
topological order (``_rewrite.remove_dead_fx`` / ``remove_dead_onnx``): removing a node can
only make earlier nodes dead, which the same sweep reaches later. An identity is an operator
whose result equals one input (same values, dtype, device, layout and, in FX, strides); one
forward sweep redirects its uses to that input, so chains of identities collapse. ONNX graph
outputs keep their names: the producer's output is renamed, or the node stays when that is
impossible (the input is a graph input, an initializer or an outer-scope value).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
import torch
from torch import fx

from graphpress.graph.fx import replace_node

from ._rewrite import (
    bypass_onnx,
    inference_dropout,
    onnx_const,
    remove_dead_fx,
    remove_dead_onnx,
    require_canonical,
)
from .base import Pass, PassResult
from .registry import register

__all__ = ["EliminateDeadCode", "EliminateIdentity"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_ALIASES = {_aten.alias.default, _aten.detach.default, _aten.lift_fresh_copy.default,
            _aten.clone.default, _aten.contiguous.default, _aten._to_copy.default}


@register
@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    """Remove nodes whose results are never used, and weights nothing refers to any more.

    **Rules**
      1. A node none of whose results is used (by a node, a subgraph or a graph output) is
         removed if it is pure. FX: not ``node.is_impure()`` (placeholders, ``_guards_fn``,
         ``_assert_*`` and random ops stay), an inference dropout counts as pure. ONNX: every
         node with at least one output (ONNX operators are side-effect free).
      2. FX: the attribute of a removed ``get_attr`` is deleted when no remaining node refers
         to it. ONNX: an initializer without uses that is neither a graph input nor output is
         removed.
      3. ONNX subgraphs are cleaned with the same rules before the nodes above them; a removed
         node releases the outer values its subgraphs used.

    **Requires** an FX graph in the aten dialect. **Ensures** the graph's inputs and outputs
    are unchanged (names included).
    """

    name: ClassVar[str] = "dce"

    def requires(self, graph) -> None:
        require_canonical(graph)

    def run_fx(self, gm: fx.GraphModule) -> PassResult:
        nodes, attrs = remove_dead_fx(gm, list(gm.graph.nodes))
        if nodes:
            gm.recompile()
        return PassResult(gm, nodes > 0, {"nodes_removed": nodes, "attributes_removed": attrs})

    def run_onnx(self, model: ir.Model) -> PassResult:
        nodes, inits = remove_dead_onnx(model.graph)
        stats = {"nodes_removed": nodes, "initializers_removed": inits}
        return PassResult(model, bool(nodes or inits), stats)


def _meta_key(node: object) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return (tuple(map(str, val.shape)), val.dtype, val.device, val.layout,
            tuple(map(str, val.stride())))


@register
@dataclass(frozen=True)
class EliminateIdentity(Pass):
    """Bypass operators whose result equals their input.

    **Rules**
      1. FX ``aten.dropout``/``feature_dropout``/``alpha_dropout`` with ``train=False`` or
         ``p=0``; ONNX ``Dropout`` without ``training_mode`` (or a constant false one, or a
         constant ratio 0) whose mask output is unused.
      2. FX ``aten.alias``/``detach``/``lift_fresh_copy``/``clone``/``contiguous``/
         ``_to_copy``/``to.*`` whose result has the input's shape, dtype, device, layout and
         strides (``meta["val"]``), only when the graph mutates nothing (a copy may protect
         an in-place update) and not when it would return a graph input or weight directly.
      3. ONNX ``Identity``; ``Cast`` to the input's dtype; ``CastLike`` to the input's dtype.
      4. ONNX graph outputs keep their names (the producer's output is renamed); when the
         input is a graph input, an initializer, an outer-scope value or another output, the
         node stays.

    **Requires** an FX graph in the aten dialect. **Ensures** the graph's inputs and outputs
    are unchanged (names included).
    """

    name: ClassVar[str] = "eliminate-identity"

    def requires(self, graph) -> None:
        require_canonical(graph)

    def run_fx(self, gm: fx.GraphModule) -> PassResult:
        nodes = list(gm.graph.nodes)
        mutates = any(
            isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable
            for n in nodes if n.op == "call_function"
        )
        removed = 0
        for node in nodes:
            if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            source = node.args[0]
            if inference_dropout(node):  # Rule 1
                replace_node(node, source)
                removed += 1
            elif (node.target in _ALIASES or getattr(node.target, "overloadpacket", None)
                  is _aten.to) and not mutates:  # Rule 2
                key = _meta_key(node)
                returned = source.op in ("placeholder", "get_attr") and any(
                    u.op == "output" for u in node.users)
                if key is not None and key == _meta_key(source) and not returned:
                    replace_node(node, source)
                    removed += 1
        if removed:
            gm.recompile()
        return PassResult(gm, removed > 0, {"identities_removed": removed})

    def run_onnx(self, model: ir.Model) -> PassResult:
        removed = sum(self._onnx_graph(graph) for graph in list(model.graphs()))
        return PassResult(model, removed > 0, {"identities_removed": removed})

    def _onnx_graph(self, graph: ir.Graph) -> int:
        removed = 0
        for node in graph:
            if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
                continue
            source, output = node.inputs[0], node.outputs[0]
            if _onnx_identity(node) and bypass_onnx(node, output, source):  # Rules 1, 3, 4
                removed += 1
        return removed


def _const_scalar(value: ir.Value | None) -> object:
    array = onnx_const(value)
    return None if array is None or array.size != 1 else array.item()


def _onnx_identity(node: ir.Node) -> bool:
    source = node.inputs[0]
    if node.op_type == "Identity":
        return True
    if node.op_type == "Cast":
        to = node.attributes.get("to")
        return to is not None and source.dtype is not None and to.value == source.dtype
    if node.op_type == "CastLike":
        return source.dtype is not None and node.inputs[1].dtype == source.dtype
    if node.op_type != "Dropout":
        return False
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return False
    is_test = node.attributes.get("is_test")  # opset < 7
    if is_test is not None:
        return bool(is_test.value)
    ratio = node.inputs[1] if len(node.inputs) > 1 else None
    training = node.inputs[2] if len(node.inputs) > 2 else None
    return training is None or _const_scalar(training) is False or _const_scalar(ratio) == 0

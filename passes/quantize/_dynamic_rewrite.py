"""The ONNX rewrite of ``quantize-dynamic``: find what to quantize (a plan), then apply it.

Planning is read-only and is also what ``QuantizeDynamic.ensures`` re-runs on the result (no
plan left means nothing quantizable stayed float). Applying creates every new weight once per
source weight and role, inserts the new nodes before the node they replace, hands over the
replaced output's name (graph outputs keep theirs) and removes the old nodes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphpress.graph.onnx import PROVENANCE, add_initializer, mark, unique_name

from .._rewrite import onnx_const, remove_node_onnx
from .dynamic import MS, QuantizeDynamic, quantize_blocks, quantize_int8

__all__ = ["Plan", "Rewriter"]

logger = logging.getLogger(__name__)

_DEFAULT = ("", "ai.onnx")


@dataclass
class Plan:
    node: ir.Node
    kind: str  # "matmul" | "gather"
    weight: ir.Value
    transpose: bool = False
    bias: ir.Value | None = None
    add: ir.Node | None = None  # Rule 2: the Add fused as bias
    via: ir.Node | None = None  # Rule 4b: the Transpose between a tied table and the LM head


def _float_const(value: ir.Value | None) -> np.ndarray | None:
    array = onnx_const(value)
    return array if array is not None and array.dtype == np.float32 else None


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None or attr.is_ref() else attr.value


class Rewriter:
    """Per-run state of QuantizeDynamic on one graph (top level; subgraphs are left alone)."""

    def __init__(self, pass_: QuantizeDynamic, graph: ir.Graph, taken: set[str]) -> None:
        self.pass_, self.graph, self.taken = pass_, graph, taken
        self.cache: dict[tuple[ir.Value, str], list[ir.Value | None]] = {}
        self.sources: dict[ir.Value, None] = {}
        self._pending: list[ir.Node] = []  # float Transposes left unused (Rule 4b)

    # -- planning -------------------------------------------------------------------------
    def plan(self) -> list[Plan]:
        found = [p for p in map(self._match, self.graph) if p is not None]
        planned = {(id(p.node), p.weight) for p in found}
        keep = []
        for p in found:  # Rule 5: every use of the weight must be quantized
            if self._all_planned(p.weight, planned) and not p.weight.is_graph_output():
                keep.append(p)
        return keep

    @staticmethod
    def _all_planned(weight: ir.Value, planned: set) -> bool:
        """Every use is a planned node, or a Transpose read only by planned nodes (Rule 4b)."""
        for node, _ in weight.uses():
            if (id(node), weight) in planned:
                continue
            out = node.outputs[0] if node.op_type == "Transpose" else None
            if out is None or out.is_graph_output() or not all(
                    (id(n), weight) in planned for n, _ in out.uses()):
                return False
        return True

    def _match(self, node: ir.Node) -> Plan | None:
        if node.domain not in _DEFAULT or node.op_type not in ("MatMul", "Gemm", "Gather"):
            return None
        if node.op_type == "Gather" and not self.pass_.embeddings:
            return None
        index = 0 if node.op_type == "Gather" else 1
        if len(node.inputs) <= index or node.inputs[index] is None:
            return None
        weight = node.inputs[index]
        via = self._tied_transpose(node, weight)
        if via is not None:
            weight = via.inputs[0]
        array = _float_const(weight)
        if array is None or array.ndim != 2 or array.size < self.pass_.min_elements:
            return None  # Rule 1: tiny weights stay float
        if weight.metadata_props.get(PROVENANCE) == QuantizeDynamic.name:
            return None  # our own scales
        if self.pass_._excluded(node.name, weight.name):  # Rule 5
            return None
        if node.op_type == "Gather":  # Rule 4
            return Plan(node, "gather", weight) if _attr(node, "axis", 0) == 0 else None
        n = array.shape[0] if _attr(node, "transB", 0) or via is not None else array.shape[1]
        if node.op_type == "Gemm":  # Rule 3
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
                return None
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            if bias is not None and (_attr(node, "beta", 1.0) != 1.0 or not self._vector(bias, n)):
                return None
            return Plan(node, "matmul", weight, bool(_attr(node, "transB", 0)), bias)
        plan = Plan(node, "matmul", weight, via=via)
        if via is not None:
            plan.transpose = True
        out = node.outputs[0]
        uses = out.uses()
        if len(uses) == 1 and not out.is_graph_output():  # Rule 2
            add, _ = uses[0]
            if add.op_type == "Add" and add.domain in _DEFAULT and add.graph is node.graph:
                other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
                if other is not out and self._vector(other, n):
                    plan.bias, plan.add = other, add
        return plan

    def _tied_transpose(self, node: ir.Node, weight: ir.Value) -> ir.Node | None:
        """The ``Transpose(E)`` a ``MatMul`` reads, ``E`` a constant table an embedding
        ``Gather`` also reads (Rule 4b; per-channel ``DynamicQuantizeMatMul`` only)."""
        producer = weight.producer()
        p = self.pass_
        if (node.op_type != "MatMul" or producer is None or producer.op_type != "Transpose"
                or producer.domain not in _DEFAULT or not p.embeddings or p.block_size
                or not p.per_channel or not p.symmetric):
            return None
        perm = _attr(producer, "perm", None)
        table = producer.inputs[0]
        array = _float_const(table)
        if array is None or array.ndim != 2 or (perm is not None and list(perm) != [1, 0]):
            return None
        gathers = [n for n, i in table.uses() if n.op_type == "Gather" and i == 0]
        return producer if gathers else None

    @staticmethod
    def _vector(value: ir.Value | None, n: int) -> bool:
        array = _float_const(value)
        return array is not None and array.size == n and array.ndim <= 2 and array.shape[-1] == n

    # -- applying -------------------------------------------------------------------------
    def apply(self, plans: list[Plan]) -> dict[str, float]:
        stats = {"matmuls_quantized": 0, "gathers_quantized": 0, "biases_fused": 0}
        for plan in plans:
            if plan.kind == "gather":
                self._gather(plan)
                stats["gathers_quantized"] += 1
            else:
                self._matmul(plan)
                stats["matmuls_quantized"] += 1
                stats["biases_fused"] += plan.bias is not None
        for trans in dict.fromkeys(self._pending):
            if not trans.outputs[0].uses() and not trans.outputs[0].is_graph_output():
                remove_node_onnx(trans)
        return stats

    def _init(self, name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, name, array, QuantizeDynamic.name, self.taken)

    def _weights(self, weight: ir.Value, role: str) -> list[ir.Value | None]:
        key = (weight, role)
        if key not in self.cache:  # Rule 5: once per weight and role
            p = self.pass_
            array = _float_const(weight)
            base = f"{weight.name}.qdyn" + ("" if role in ("matmul", "gather") else f".{role}")
            if role == "gather":
                q, scale, zero = quantize_int8(array, axis=0, symmetric=True)
                scale = scale.reshape(-1, 1)
            else:
                array = array.T if role == "matmul_t" else array
                if p.block_size:
                    q, scale, zero = quantize_blocks(array, p.block_size, symmetric=p.symmetric)
                else:
                    q, scale, zero = quantize_int8(array, axis=1 if p.per_channel else None,
                                                   symmetric=p.symmetric)
            self.cache[key] = [self._init(f"{base}.q", q), self._init(f"{base}.scale", scale),
                               None if zero is None else self._init(f"{base}.zero", zero)]
            self.sources[weight] = None
        return self.cache[key]

    def _node(self, op: str, inputs, before: ir.Node, name: str, domain: str = "",
              attributes=()) -> ir.Node:
        node = ir.Node(domain, op, inputs, attributes, name=name, num_outputs=1)
        node.outputs[0].name = self._unique(f"{name}.out")
        self.graph.insert_before(before, node)
        mark(node, QuantizeDynamic.name)
        return node

    def _unique(self, name: str) -> str:
        return unique_name(self.graph, name, self.taken)

    def _tied(self, plan: Plan) -> list[ir.Value | None]:
        """Rule 4b: ``Transpose`` of the int8 per-row table and its scales as a vector."""
        q, scale, _ = self._weights(plan.weight, "gather")
        key = (plan.weight, "tied")
        if key not in self.cache:
            flat = self._init(f"{plan.weight.name}.qdyn.scale_n", scale.const_value.numpy().ravel())
            trans = self._node("Transpose", [q], plan.via, f"{plan.weight.name}.qdyn.t",
                               attributes=[ir.AttrInt64s("perm", [1, 0])])
            trans.outputs[0].dtype = ir.DataType.INT8
            trans.outputs[0].shape = ir.Shape(q.shape[::-1])
            self.cache[key] = [trans.outputs[0], flat, None]
        self._pending.append(plan.via)
        return self.cache[key]

    def _matmul(self, plan: Plan) -> None:
        node = plan.node
        if plan.via is not None:
            q, scale, zero = self._tied(plan)
        else:
            q, scale, zero = self._weights(plan.weight,
                                           "matmul_t" if plan.transpose else "matmul")
        bias = plan.bias
        if bias is not None:  # Rule 2/3: DynamicQuantizeMatMul takes a length-N vector
            array = _float_const(bias)
            if array.ndim != 1:
                bias = self._init(f"{bias.name}.qdyn.bias", array.reshape(-1))
            self.sources[plan.bias] = None
        if self.pass_.block_size:  # Rule 1, block-wise
            k, n = _float_const(plan.weight).shape[::-1 if plan.transpose else 1]
            attrs = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", 8),
                     ir.AttrInt64("block_size", self.pass_.block_size),
                     ir.AttrInt64("accuracy_level", 4)]
            new = self._node("MatMulNBits", [node.inputs[0], q, scale, zero, None, bias], node,
                             f"{node.name}.qdyn", MS, attrs)
        else:
            new = self._node("DynamicQuantizeMatMul", [node.inputs[0], q, scale, zero, bias],
                             node, f"{node.name}.qdyn", MS)
        last = plan.add or node
        self._replace(last.outputs[0], new.outputs[0])
        if plan.add is not None:
            remove_node_onnx(plan.add)
        remove_node_onnx(node)

    def _gather(self, plan: Plan) -> None:
        node, ids = plan.node, plan.node.inputs[1]
        q, scale, _ = self._weights(plan.weight, "gather")
        rows = self._node("Gather", [q, ids], node, f"{node.name}.qdyn.rows",
                          attributes=[ir.AttrInt64("axis", 0)])
        cast = self._node("Cast", [rows.outputs[0]], node, f"{node.name}.qdyn.cast",
                          attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)])
        scales = self._node("Gather", [scale, ids], node, f"{node.name}.qdyn.scales",
                            attributes=[ir.AttrInt64("axis", 0)])
        mul = self._node("Mul", [cast.outputs[0], scales.outputs[0]], node, f"{node.name}.qdyn")
        rows.outputs[0].dtype = ir.DataType.INT8
        cast.outputs[0].dtype = scales.outputs[0].dtype = ir.DataType.FLOAT
        self._replace(node.outputs[0], mul.outputs[0])
        remove_node_onnx(node)

    def _replace(self, old: ir.Value, new: ir.Value) -> None:
        """Redirect uses of ``old`` to ``new``, which takes over ``old``'s name and type."""
        new.dtype, new.shape = old.dtype, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        name, old.name = old.name, None
        self.taken.discard(new.name)
        new.name = name

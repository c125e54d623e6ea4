"""ONNX rewriting for static quantization: Q/DQ pairs on activations, int8 weights + DQ.

* Activation ``x`` feeding a quantized layer: ``q = QuantizeLinear(x, s, z)``,
  ``x̂ = DequantizeLinear(q, s, z)``; every quantized consumer reads ``x̂`` (one pair per
  value; ONNX Runtime duplicates a shared ``DequantizeLinear`` per consumer when it fuses).
* Constant weight ``W``: a new integer initializer ``W.qdq.q`` and
  ``Ŵ = DequantizeLinear(W.qdq.q, s, z, axis)`` (per channel along the output axis, or per
  tensor); the layer reads ``Ŵ``. A weight shared by several layers is quantized once.
* Tied table ``E`` (``Gather(E, ids)`` and ``MatMul(x, Transpose(E))``): one int8 per-row
  ``E.qdq.q``; the Gather dequantizes the gathered rows by their row scales, the LM head reads
  ``DequantizeLinear(Transpose(E.qdq.q), axis=1)`` (ORT folds the constant Transpose).
* Embedding ``Gather(T, ids)``: ``DequantizeLinear(Gather(T.qdq.q, ids), s, z)`` with a
  per-tensor scale, so only the gathered rows are dequantized at run time.

16-bit (De)QuantizeLinear needs opset 21; on older opsets the ``com.microsoft`` versions that
ONNX Runtime provides are used instead. Every created node/value is marked with the pass name.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graphpress.graph.onnx import add_initializer, mark, unique_name

from .._rewrite import onnx_const, remove_node_onnx, value_names
from ._qparams import QParams, quantize_weight
from .placement import Layer, tied_table

__all__ = ["OnnxQDQ"]

logger = logging.getLogger(__name__)

_DTYPES = {"uint8": ir.DataType.UINT8, "int8": ir.DataType.INT8, "int16": ir.DataType.INT16}


class OnnxQDQ:
    """Per-run state of inserting Q/DQ into one ONNX model (caches shared values)."""

    def __init__(self, model: ir.Model, pass_name: str, *, per_channel: bool,
                 symmetric_weights: bool) -> None:
        self.model, self.graph, self.pass_name = model, model.graph, pass_name
        self.per_channel, self.symmetric = per_channel, symmetric_weights
        self.taken = value_names(model)
        self.activations: dict[tuple[ir.Value, str], ir.Value] = {}
        self.weights: dict[ir.Value, ir.Value] = {}
        self.tables: dict[ir.Value, tuple] = {}
        self.weight_bytes = 0

    # ------------------------------------------------------------------ helpers
    def _domain(self, dtype: str) -> str:
        if dtype == "int16" and self.model.opset_imports.get("", 0) < 21:
            self.model.opset_imports.setdefault("com.microsoft", 1)
            return "com.microsoft"
        return ""

    def _params(self, origin: str, params: QParams) -> tuple[ir.Value, ir.Value]:
        scale = add_initializer(self.graph, f"{origin}.qdq.scale", params.scale, self.pass_name,
                                self.taken)
        zero = add_initializer(self.graph, f"{origin}.qdq.zero_point", params.zero_point,
                               self.pass_name, self.taken)
        return scale, zero

    def _node(self, op: str, inputs, name: str, dtype: ir.DataType, shape, *, domain: str = "",
              axis: int | None = None) -> ir.Node:
        attrs = [ir.AttrInt64("axis", axis)] if axis is not None else []
        out_name = self._unique(f"{name}")
        output = ir.Value(name=out_name, type=ir.TensorType(dtype), shape=shape)
        node = ir.Node(domain, op, inputs, attrs, outputs=[output], name=out_name)
        return mark(node, self.pass_name)

    def _unique(self, name: str) -> str:
        return unique_name(self.graph, name, self.taken)

    # ------------------------------------------------------------------ rewrites
    def activation(self, layer: Layer, position: int, params: QParams) -> None:
        """Quantize-dequantize input ``position`` of ``layer`` (shared per value and type)."""
        node = layer.node
        value = node.inputs[position]
        key = (value, f"{params.dtype}:{float(params.scale)}:{int(params.zero_point)}")
        if key not in self.activations:
            origin = value.name or f"{layer.name}.input{position}"
            scale, zero = self._params(origin, params)
            domain = self._domain(params.dtype)
            quant = self._node("QuantizeLinear", [value, scale, zero], f"{origin}.qdq.q",
                               _DTYPES[params.dtype], value.shape, domain=domain)
            dequant = self._node("DequantizeLinear", [quant.outputs[0], scale, zero],
                                 f"{origin}.qdq.dq", ir.DataType.FLOAT, value.shape,
                                 domain=domain)
            self.graph.insert_before(node, [quant, dequant])
            self.activations[key] = dequant.outputs[0]
        node.replace_input_with(position, self.activations[key])

    def _per_row(self, table_value: ir.Value):
        """The int8 per-row table ``E.qdq.q`` shared by a tied embedding and LM head."""
        if table_value not in self.tables:
            q, params = quantize_weight(onnx_const(table_value), axis=0, symmetric=self.symmetric)
            origin = table_value.name
            init = add_initializer(self.graph, f"{origin}.qdq.q", q, self.pass_name, self.taken)
            self.tables[table_value] = (init, params, *self._params(origin, params))
            self.weight_bytes += q.nbytes + params.scale.nbytes + params.zero_point.nbytes
        return self.tables[table_value]

    def tied_head(self, layer: Layer) -> None:
        """``MatMul(x, Transpose(E))`` → ``MatMul(x, DequantizeLinear(Transpose(E.qdq.q), axis=1))``."""
        node = layer.node
        trans = node.inputs[1].producer()
        table_value = tied_table(node.inputs[1])
        if table_value not in self.weights:
            init, params, scale, zero = self._per_row(table_value)
            shape = ir.Shape(init.shape[::-1])
            t = self._node("Transpose", [init], f"{table_value.name}.qdq.t", ir.DataType.INT8,
                           shape)
            t.attributes["perm"] = ir.AttrInt64s("perm", [1, 0])
            dq = self._node("DequantizeLinear", [t.outputs[0], scale, zero],
                            f"{table_value.name}.qdq.dq_t", ir.DataType.FLOAT, shape, axis=1)
            self.graph.insert_before(node, [t, dq])
            self.weights[table_value] = dq.outputs[0]
        node.replace_input_with(1, self.weights[table_value])
        if not trans.outputs[0].uses() and not trans.outputs[0].is_graph_output():
            remove_node_onnx(trans)

    def weight(self, layer: Layer) -> None:
        """Replace the constant weight of ``layer`` by int8 + DequantizeLinear."""
        if layer.op == "matmul_t":
            return self.tied_head(layer)
        node, position = layer.node, layer.weight
        value = node.inputs[position]
        if value not in self.weights:
            array = onnx_const(value)
            axis = layer.axis if self.per_channel else None
            q, params = quantize_weight(array, axis=axis, symmetric=self.symmetric)
            origin = value.name or f"{layer.name}.weight"
            init = add_initializer(self.graph, f"{origin}.qdq.q", q, self.pass_name, self.taken)
            scale, zero = self._params(origin, params)
            dequant = self._node("DequantizeLinear", [init, scale, zero], f"{origin}.qdq.dq",
                                 ir.DataType.FLOAT, ir.Shape(array.shape),
                                 axis=None if params.axis is None else params.axis)
            self.graph.insert_before(node, [dequant])
            self.weights[value] = dequant.outputs[0]
            self.weight_bytes += q.nbytes + params.scale.nbytes + params.zero_point.nbytes
        node.replace_input_with(position, self.weights[value])

    def embedding(self, layer: Layer) -> None:
        """``Gather(T, ids)`` → ``DequantizeLinear(Gather(T.qdq.q, ids))`` (per tensor)."""
        node = layer.node
        table_value, ids = node.inputs
        if self.symmetric and any(tied_table(n.outputs[0]) is table_value
                                  for n, _ in table_value.uses() if n.op_type == "Transpose"):
            return self._tied_embedding(layer)
        table = onnx_const(table_value)
        q, params = quantize_weight(table, axis=None, symmetric=self.symmetric)
        origin = table_value.name or f"{layer.name}.table"
        init = add_initializer(self.graph, f"{origin}.qdq.q", q, self.pass_name, self.taken)
        scale, zero = self._params(origin, params)
        old = node.outputs[0]
        gather = self._node("Gather", [init, ids], f"{origin}.qdq.rows", ir.DataType.INT8,
                            old.shape, axis=0)
        dequant = self._node("DequantizeLinear", [gather.outputs[0], scale, zero],
                             f"{origin}.qdq.dq", ir.DataType.FLOAT, old.shape)
        self.graph.insert_before(node, [gather, dequant])
        self._rebind(node, dequant.outputs[0])
        self.weight_bytes += q.nbytes

    def _tied_embedding(self, layer: Layer) -> None:
        """Tied table: ``Cast(Gather(E.qdq.q, ids)) · Gather(scale[V, 1], ids)`` (per row)."""
        node = layer.node
        table_value, ids = node.inputs
        init, params, _, _ = self._per_row(table_value)
        column = add_initializer(self.graph, f"{table_value.name}.qdq.row_scale",
                                 params.scale.reshape(-1, 1), self.pass_name, self.taken)
        old = node.outputs[0]
        origin = table_value.name
        rows = self._node("Gather", [init, ids], f"{origin}.qdq.rows", ir.DataType.INT8,
                          old.shape, axis=0)
        cast = self._node("Cast", [rows.outputs[0]], f"{origin}.qdq.cast", ir.DataType.FLOAT,
                          old.shape)
        cast.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT)
        scales = self._node("Gather", [column, ids], f"{origin}.qdq.row_scales",
                            ir.DataType.FLOAT, None, axis=0)
        mul = self._node("Mul", [cast.outputs[0], scales.outputs[0]], f"{origin}.qdq.dq",
                         ir.DataType.FLOAT, old.shape)
        self.graph.insert_before(node, [rows, cast, scales, mul])
        self._rebind(node, mul.outputs[0])

    def _rebind(self, node: ir.Node, new: ir.Value) -> None:
        old = node.outputs[0]
        if old.is_graph_output():  # keep the interface name
            name, old.name = old.name, None
            new.name = name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        self.graph.remove(node, safe=True)


def output_error(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """Relative squared error ``Σ‖y − ŷ‖² / Σ‖y‖²`` over float outputs."""
    num = den = 0.0
    for ref, out in zip(reference, candidate):
        if ref.dtype.kind != "f":
            continue
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        num += float(((ref64 - out64) ** 2).sum())
        den += float((ref64**2).sum())
    return num / max(den, 1e-30)

"""ONNX rewriting for static quantization: Q/DQ pairs on activations, int8 weights + DQ.

* Activation ``x`` feeding a quantized layer: ``q = QuantizeLinear(x, s, z)``,
  ``x̂ = DequantizeLinear(q, s, z)``; every quantized consumer reads ``x̂`` (one pair per
  value; ONNX Runtime duplicates a shared ``DequantizeLinear`` per consumer when it fuses).
* Constant weight ``W``: a new integer initializer ``W.qdq.q`` and
  ``Ŵ = DequantizeLinear(W.qdq.q, s, z, axis)`` (per channel along the output axis, or per
  tensor); the layer reads ``Ŵ``. A weight shared by several layers is quantized once.
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

from .._rewrite import onnx_const, value_names
from ._qparams import QParams, quantize_weight
from .placement import Layer

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

    def weight(self, layer: Layer) -> None:
        """Replace the constant weight of ``layer`` by int8 + DequantizeLinear."""
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
        new = dequant.outputs[0]
        if old.is_graph_output():  # keep the interface name
            name, old.name = old.name, None
            new.name = name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        self.graph.remove(node, safe=True)
        self.weight_bytes += q.nbytes


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

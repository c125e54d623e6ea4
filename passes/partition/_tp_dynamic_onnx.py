"""Row-parallel ``DynamicQuantizeMatMul`` on an ONNX shard: the activation range made global.

``com.microsoft::DynamicQuantizeMatMul(A, B, b_scale, b_zp, bias)`` quantizes ``A`` per tensor
by its own range (ONNX Runtime: ``lo = min(min A, 0)``, ``hi = max(max A, 0)``,
``s = hi == lo ? 1 : (hi − lo)/255``, ``z = round_half_even(clip(0 − lo/s, 0, 255))``) and then
computes ``s·b_scale·Σ_k (a − z)(b − b_zp) + bias``. A row-parallel rank holds only its slice of
``A``'s channels, so its own range would differ from the unsharded one. The node is rewritten
into the same arithmetic with the range made global: ``ReduceMin``/``ReduceMax`` of the local
``A`` (each combined over the ranks by :func:`combine`), the scale and zero point above in
plain ONNX ops, ``QuantizeLinear`` and ``com.microsoft::MatMulIntegerToFloat`` (the kernel
``DynamicQuantizeMatMul`` itself runs after quantizing). The new product keeps the node's name,
so it stays the group's all-reduce point.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from graphpress.graph.onnx import add_initializer, mark, unique_name

__all__ = ["global_range_matmul"]

logger = logging.getLogger(__name__)

PASS = "shard-tensor-parallel"
MS = "com.microsoft"


def global_range_matmul(graph: ir.Graph, node: ir.Node, taken: set[str],
                        combine: Callable[[ir.Node, str], str]) -> list[str]:
    """Rewrite ``node`` (see the module docstring); ``combine(reduce_node, "min"|"max")``
    makes a local min/max global and returns its collective point. Returns the points."""
    a, b = node.inputs[0], node.inputs[1]
    b_scale = node.inputs[2]
    b_zero = node.inputs[3] if len(node.inputs) > 3 else None
    bias = node.inputs[4] if len(node.inputs) > 4 else None
    base = f"{node.name}.tp"
    made: list[ir.Node] = []

    def add(op: str, inputs, role: str, domain: str = "", **attrs) -> ir.Value:
        out = ir.Value(name=unique_name(graph, f"{base}.{role}", taken))
        made.append(mark(ir.node(op, list(inputs), attributes=attrs, domain=domain,
                                 outputs=[out], name=unique_name(graph, f"{base}.{role}.node",
                                                                 taken)), PASS))
        return out

    def const(role: str, array) -> ir.Value:
        return add_initializer(graph, f"{base}.{role}", np.asarray(array), PASS, taken)

    lo = add("ReduceMin", [a], "min", keepdims=0)
    hi = add("ReduceMax", [a], "max", keepdims=0)
    lo.dtype = hi.dtype = a.dtype or ir.DataType.FLOAT
    zero, one = const("zero", np.float32(0)), const("one", np.float32(1))
    lo0 = add("Min", [lo, zero], "lo")
    hi0 = add("Max", [hi, zero], "hi")
    step = add("Div", [add("Sub", [hi0, lo0], "span"), const("levels", np.float32(255))], "step")
    scale = add("Where", [add("Equal", [hi0, lo0], "flat"), one, step], "scale")
    shift = add("Neg", [add("Div", [lo0, scale], "ratio")], "shift")
    clipped = add("Clip", [shift, zero, const("top", np.float32(255))], "clipped")
    zp = add("Cast", [add("Round", [clipped], "rounded")], "zero_point", to=ir.DataType.UINT8)
    codes = add("QuantizeLinear", [a, scale, zp], "codes")
    old = node.outputs[0]
    out = add("MatMulIntegerToFloat", [codes, b, scale, b_scale, zp, b_zero, bias], "product",
              MS)
    product = made[-1]
    graph.insert_before(node, made)
    out.dtype, out.shape = old.dtype, old.shape
    old.replace_all_uses_with(out)
    for i, value in enumerate(graph.outputs):
        if value is old:
            graph.outputs[i] = out
    name, value_name = node.name, old.name
    graph.remove(node, safe=True)
    product.name, out.name = name, value_name
    return [combine(lo.producer(), "min"), combine(hi.producer(), "max")]  # all readers exist

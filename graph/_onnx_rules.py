"""ONNX FLOP rules of the cost model, and output shapes of the contrib matmuls that ONNX shape
inference does not know (``MatMulNBits``, ``DynamicQuantizeMatMul``...).

Attention ops (best effort, shapes as ONNX Runtime documents them):

- ``com.microsoft::MultiHeadAttention``: query ``[B, Sq, H·D]``; key ``[B, Sk, H·D]`` or
  ``[B, H, Sk, D]``; the total key length from ``present_key`` when known;
- ``com.microsoft::GroupQueryAttention``: query ``[B, S, H·D]``, ``present_key [B, Hkv, T, D]``;
- ``com.microsoft::Attention``: input ``[B, S, Din]`` projected by weights ``[Din, 3·H·D]``
  (counted as a matmul) then attention over ``S`` (plus ``past``);
- ``Attention`` (opset 23): ``Q [B, Hq, Sq, D]`` or ``[B, Sq, Hq·D]``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import onnx_ir as ir

from . import _flops as F
from .analysis import op_name

__all__ = ["onnx_flops", "contrib_output_shape"]

logger = logging.getLogger(__name__)

Shape = tuple[int, ...] | None


def _attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return int(attr.value) if attr is not None else default


def onnx_flops(node: ir.Node, shape: Callable[[ir.Value | None], Shape]) -> int:
    """FLOPs of one ONNX node; ``shape(value)`` gives a bound shape or ``None``."""
    op = op_name(node)
    if op in F.ONNX_ZERO or not node.outputs:
        return 0
    ins = list(node.inputs)
    get = lambda i: shape(ins[i]) if i < len(ins) else None  # noqa: E731
    out = F.numel(shape(node.outputs[0]))
    if op in F.ONNX_MATMUL:
        a = get(F.ONNX_MATMUL[op])
        if op.endswith(("MatMulNBits", "MatMulBnb4")):
            k = _attr(node, "K")
        elif not a:
            return 0
        elif op == "Gemm" or op.endswith("QGemm"):
            k = a[0] if _attr(node, "transA") else a[-1]
        elif op.endswith("FusedMatMul") and _attr(node, "transA") and len(a) > 1:
            k = a[-2]
        else:
            k = a[-1]
        return F.matmul_flops(shape(node.outputs[0]), k)
    if op in F.ONNX_CONV:
        weight = get(F.ONNX_CONV[op])
        if op == "ConvTranspose":
            return F.conv_flops(F.numel(get(0)), weight)
        return F.conv_flops(out, weight)
    if op in F.ONNX_ATTENTION:
        return _attention(node, op, get, lambda i: shape(node.outputs[i])
                          if i < len(node.outputs) else None)
    if op in F.ONNX_NORM:
        return F.NORM_FLOPS_PER_ELEMENT * out
    if op in F.ONNX_REDUCE:
        return F.numel(get(0))
    if op in F.ONNX_POOL:
        kernel = node.attributes.get("kernel_shape")
        return out * (math.prod(kernel.value) if kernel is not None else 1)
    return out


def _attention(node: ir.Node, op: str, get: Callable, out: Callable) -> int:
    y = out(0)
    if not y or len(y) < 3 and op != "Attention":
        return 0
    if op.endswith("GroupQueryAttention"):
        heads = _attr(node, "num_heads")
        present, past, s = out(1), get(3), y[1]
        total = present[2] if present else s + (past[2] if past else 0)
        return _scores_flops(y[0] * heads * s, total, y[-1] // max(heads, 1))
    if op.endswith("MultiHeadAttention"):
        heads = max(_attr(node, "num_heads"), 1)
        q, k, present, past = get(0), get(1), out(1), get(6)
        if present:
            total = present[2]
        elif k and len(k) in (3, 5):
            total = k[1] + (past[2] if past else 0)
        elif k and len(k) == 4:
            total = k[2]
        else:
            total = y[1]
        d_qk = q[-1] // heads if q and len(q) == 3 else (q[-1] if q else y[-1] // heads)
        return _scores_flops(y[0] * heads * y[1], total, d_qk, y[-1] // heads)
    if op.endswith("::Attention"):
        heads = max(_attr(node, "num_heads"), 1)
        x, w, present, past = get(0), get(1), out(1), get(4)
        proj = 2 * F.numel(x) * w[-1] if x and w else 0
        total = present[3] if present else y[1] + (past[3] if past else 0)
        return proj + _scores_flops(y[0] * heads * y[1], total, y[-1] // heads)
    q, k, v = get(0), get(1), get(2)  # opset-23 Attention
    if not q or not k or not v:
        return 0
    present = out(1)
    if len(q) == 4:
        total = present[2] if present else k[2]
        return _scores_flops(F.numel(q[:-1]), total, q[-1], v[-1])
    heads = max(_attr(node, "q_num_heads"), 1)
    kv_heads = max(_attr(node, "kv_num_heads"), 1)
    total = present[2] if present else k[1]
    return _scores_flops(q[0] * heads * q[1], total, q[-1] // heads, v[-1] // kv_heads)


def _scores_flops(rows: int, keys: int, d: int, dv: int | None = None) -> int:
    """``rows = B·H·Sq`` query rows over ``keys`` keys: QKᵀ, softmax, PV."""
    scores = rows * keys
    return 2 * scores * (d + (dv if dv is not None else d)) + scores


def contrib_output_shape(
    node: ir.Node, shape: Callable[[ir.Value | None], Sequence | None]
) -> tuple[list, ir.DataType] | None:
    """Output 0's shape and dtype for contrib matmuls ONNX shape inference leaves unknown."""
    op = op_name(node)
    a = shape(node.inputs[0]) if node.inputs else None
    if a is None or node.inputs[0].dtype is None:
        return None
    if op.endswith(("::MatMulNBits", "::MatMulBnb4")):
        return [*a[:-1], _attr(node, "N")], node.inputs[0].dtype
    if op.endswith(("::DynamicQuantizeMatMul", "::MatMulIntegerToFloat")) and len(node.inputs) > 1:
        b = shape(node.inputs[1])
        if b is not None:
            dtype = node.inputs[2].dtype if len(node.inputs) > 2 and node.inputs[2] else None
            return [*a[:-1], b[-1]], dtype or ir.DataType.FLOAT
    return None

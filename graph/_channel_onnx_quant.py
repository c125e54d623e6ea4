"""Quantized ONNX layers in the channel view (see :mod:`._channel_view`).

* ``DequantizeLinear(q, scale[, zero_point], axis)`` of a constant ``q`` (or of a ``Transpose``
  of one) is looked through like a transpose: its readers see a :class:`Const` of ``q``
  (``storage="int"``) with the scale and zero point as companions along ``axis`` when they
  are per-channel (a per-tensor scale is shared by every channel and never sliced). Blocked
  dequantization (``block_size``) is not looked through.
* ``QuantizeLinear``/``DequantizeLinear`` of an activation with per-tensor parameters are
  element-wise; per-channel ones along the last axis are a broadcast of their constants.
* ``com.microsoft::DynamicQuantizeMatMul(A, B, b_scale[, b_zero_point][, bias])`` is a linear
  layer on ``B`` ``[K, N]`` with per-column companions and a ``"range"`` use on ``A`` (it
  quantizes ``A`` per tensor by its run-time min/max).
* ``com.microsoft::MatMulNBits(A, B, scales[, zero_points][, g_idx][, bias])`` is a linear layer
  whose weight is the packed ``B`` (a constant or the ``Reshape`` of one) with the logical shape
  ``[N, K]`` (``storage="nbits"``); its scales and zero points are found again from the node
  (:func:`nbits_operands`) by whoever slices it. ``accuracy_level=4`` quantizes ``A`` per block
  of ``K``, which a block-aligned split keeps whole, so it needs no range use.
* ``ReduceMin``/``ReduceMax`` over every axis are ``"range"`` ops (dynamic quantization's
  run-time range, as exported from FX).
"""

from __future__ import annotations

import math

import onnx_ir as ir

from ._channel_onnx_read import const_shape, input_of, ints_of, is_const
from ._channel_view import Companion, Const

__all__ = ["dequantized", "quant_op", "nbits_operands", "NBits"]

_DEFAULT = ("", "ai.onnx")
_MS = "com.microsoft"
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def _is_qdq(node: ir.Node | None) -> bool:
    return node is not None and node.op_type in _QDQ and node.domain in (*_DEFAULT, _MS)


def _size(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def dequantized(value: ir.Value | None, names: dict[int, str]) -> Const | None:
    """The integer constant ``value`` dequantizes (with per-channel companions), or ``None``."""
    node = value.producer() if value is not None else None
    if not _is_qdq(node) or node.op_type != "DequantizeLinear" or (
            node.attributes.get_int("block_size", 0)):
        return None
    me = names[id(node)]
    base = input_of(node.inputs[0], me, names)
    params = [v for v in node.inputs[1:3] if v is not None]
    if not isinstance(base, Const) or base.storage or not all(is_const(v) for v in params):
        return None
    companions = []
    if _size(const_shape(params[0])) > 1:
        axis = node.attributes.get_int("axis", 1) % len(base.shape)
        for v in params:
            shape = const_shape(v)
            if shape != (base.shape[axis],):
                return None
            companions.append(Companion(v.name, me, axis, 0))
    return Const(base.tensor, base.reader, base.shape, base.perm, tuple(companions), "int")


def _activation_qdq(node: ir.Node, ins: list) -> tuple[str, list, dict] | None:
    x, params = ins[0], [c for c in ins[1:3] if c is not None]
    if not isinstance(x, str) or not params or not all(isinstance(c, Const) for c in params):
        return None
    if all(_size(c.shape) == 1 for c in params):
        return "unary", [x], {}
    axis, rank = node.attributes.get_int("axis", 1), _rank(node)
    last = axis == -1 or (rank > 0 and axis == rank - 1)
    if last and all(len(c.shape) == 1 for c in params):  # per channel of the last axis
        return "binary", [x, *params], {"add": False}
    return None


def _rank(node: ir.Node) -> int:
    shape = node.inputs[0].shape
    return -1 if shape is None else len(shape)


def _dynamic_matmul(node: ir.Node, ins: list, me: str) -> tuple[str, list, dict] | None:
    x, w = ins[0], ins[1]
    if not isinstance(x, str) or not isinstance(w, Const) or len(w.shape) != 2 or w.storage:
        return None
    n = w.shape[1]
    companions = []
    for index in (2, 3):  # b_scale, b_zero_point: per tensor or per column n
        value = node.inputs[index] if len(node.inputs) > index else None
        if value is None:
            continue
        if not is_const(value):
            return None
        shape = const_shape(value)
        if _size(shape) > 1:
            if shape != (n,):
                return None
            companions.append(Companion(value.name, me, 1, 0))
    weight = Const(w.tensor, w.reader, w.shape, w.perm, tuple(companions), "int").reversed()
    bias = ins[4] if len(ins) > 4 else None
    return "linear", [x, weight, bias], {"range": True}


class NBits:
    """The operands of one ``MatMulNBits``: packed codes ``codes`` (a constant, read by
    ``reshape`` when the node reads ``Reshape(codes, shape)``), ``scales`` (maybe behind the
    ``Cast`` node ``cast``), ``zero_points`` (or ``None``) and the attributes."""

    def __init__(self, node: ir.Node) -> None:
        a = node.attributes
        self.node = node
        self.n, self.k = a.get_int("N"), a.get_int("K")
        self.bits, self.block = a.get_int("bits", 4), a.get_int("block_size")
        b = node.inputs[1]
        producer = b.producer() if not is_const(b) else None
        self.reshape = producer if producer is not None and producer.op_type == "Reshape" else None
        self.codes = self.reshape.inputs[0] if self.reshape is not None else b
        scales = node.inputs[2]
        producer = scales.producer() if not is_const(scales) else None
        self.cast = producer if producer is not None and producer.op_type == "Cast" else None
        self.scales = self.cast.inputs[0] if self.cast is not None else scales
        self.zero_points = node.inputs[3] if len(node.inputs) > 3 else None
        self.bias = node.inputs[5] if len(node.inputs) > 5 else None

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block)

    def valid(self) -> bool:
        g_idx = self.node.inputs[4] if len(self.node.inputs) > 4 else None
        if g_idx is not None or not is_const(self.codes) or not is_const(self.scales):
            return False
        if self.reshape is not None and ints_of(self.reshape.inputs[1]) is None:
            return False
        if self.zero_points is not None and not is_const(self.zero_points):
            return False
        return _size(const_shape(self.codes)) == self.n * self.blocks * self.block * self.bits // 8


def nbits_operands(node: ir.Node) -> NBits | None:
    """:class:`NBits` of a ``MatMulNBits`` node whose operands are all constants."""
    if node.op_type != "MatMulNBits" or node.domain != _MS or len(node.inputs) < 3:
        return None
    try:
        found = NBits(node)
    except (TypeError, ValueError, AttributeError):  # a missing N/K/block_size attribute
        return None
    return found if found.valid() else None


def _nbits_matmul(node: ir.Node, ins: list, me: str) -> tuple[str, list, dict] | None:
    found = nbits_operands(node)
    if found is None or not isinstance(ins[0], str):
        return None
    weight = Const(found.codes.name, me, (found.n, found.k), (0, 1), (), "nbits")
    bias = ins[5] if len(ins) > 5 else None
    return "linear", [ins[0], weight, bias], {}


def quant_op(node: ir.Node, ins: list, me: str) -> tuple[str, list, dict] | None:
    """The normalised op of a quantization-related node, or ``None`` (not one of them)."""
    t = node.op_type
    if _is_qdq(node):
        return _activation_qdq(node, ins)
    if node.domain == _MS and t == "DynamicQuantizeMatMul":
        return _dynamic_matmul(node, ins, me)
    if node.domain == _MS and t == "MatMulNBits":
        return _nbits_matmul(node, ins, me)
    if node.domain in _DEFAULT and t in ("ReduceMin", "ReduceMax") and isinstance(ins[0], str):
        axes = node.inputs[1] if len(node.inputs) > 1 else None
        everything = (ints_of(axes) == [] if axes is not None else
                      node.attributes.get_ints("axes", None) is None)
        if everything and not node.attributes.get_int("noop_with_empty_axes", 0):
            return "range", ins[:1], {}
    return None


"""Read the shape arithmetic that exporters emit, so a pass can prove what a ``Reshape`` does.

The dynamo exporter builds ``Reshape`` targets at run time: ``Concat`` of constants and of
``Slice(Shape(x), a, b)`` pieces. :func:`shape_items` resolves such a 1-D shape tensor into
*items*, one per output entry: an ``int`` constant or a ``(value, axis)`` pair meaning "the
size of ``value`` along ``axis``". :func:`dim_token` turns an item, or a dimension of a value's
static shape, into a token that compares equal only when the two sizes are provably equal
(same int, same named symbol, or the same axis of the same value).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from ._rewrite import onnx_const

__all__ = ["Token", "dim_token", "reshape_tokens", "shape_items", "value_tokens"]

logger = logging.getLogger(__name__)

#: ("int", n) | ("sym", name) | ("axis", id(value), axis)
Token = tuple


def dim_token(value: ir.Value, axis: int) -> Token:
    """The token of ``value``'s size along ``axis`` (static shape first)."""
    shape = value.shape
    if shape is not None and 0 <= axis < len(shape):
        dim = shape[axis]
        if isinstance(dim, int):
            return ("int", dim)
        if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
            return ("sym", dim.value)
    return ("axis", id(value), axis)


def value_tokens(value: ir.Value) -> list[Token] | None:
    """Tokens of every axis of ``value``, or None when its rank is unknown."""
    if value.shape is None:
        return None
    return [dim_token(value, axis) for axis in range(len(value.shape))]


def _attr_int(node: ir.Node, name: str, default: int | None) -> int | None:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def shape_items(value: ir.Value | None, depth: int = 0) -> list | None:
    """Resolve a 1-D int64 shape tensor into items (ints and ``(value, axis)``), or None."""
    if value is None or depth > 16:
        return None
    const = onnx_const(value)
    if const is not None:
        return [int(x) for x in const.reshape(-1)] if const.ndim <= 1 else None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op == "Concat":
        parts = [shape_items(v, depth + 1) for v in node.inputs]
        return None if any(p is None for p in parts) else [i for p in parts for i in p]
    if op == "Shape":
        source = node.inputs[0]
        if source is None or source.shape is None:
            return None
        rank = len(source.shape)
        start, end = _attr_int(node, "start", 0), _attr_int(node, "end", rank)
        return [(source, axis) for axis in range(rank)][start:end]
    if op in ("Squeeze", "Unsqueeze", "Identity"):  # a 0-d or 1-element piece keeps its items
        items = shape_items(node.inputs[0], depth + 1)
        return items if items is not None and len(items) == 1 else None
    if op == "Slice":
        return _slice(node, depth)
    return None


def _slice(node: ir.Node, depth: int) -> list | None:
    items = shape_items(node.inputs[0], depth + 1)
    inputs = list(node.inputs[1:5])
    bounds = [onnx_const(v) if v is not None else None for v in inputs]
    if any(v is not None and b is None for v, b in zip(inputs, bounds)):
        return None  # a bound read at run time
    if items is None or bounds[0] is None or bounds[1] is None:
        return None
    if len(bounds) > 2 and bounds[2] is not None and [int(a) for a in bounds[2]] not in ([0], [-1]):
        return None
    step = int(bounds[3][0]) if len(bounds) > 3 and bounds[3] is not None else 1
    start, end = int(bounds[0][0]), int(bounds[1][0])
    n = len(items)
    start, end = max(-n - 1, min(start, n)), max(-n - 1, min(end, n))  # clamp INT64 sentinels
    return items[start:end:step]


def _item_token(item) -> Token:
    if isinstance(item, int):
        return ("int", item)
    value, axis = item
    return dim_token(value, axis)


def reshape_tokens(node: ir.Node) -> list[Token | None] | None:
    """Tokens of a ``Reshape``'s output axes (``None`` where unknown, e.g. a ``-1``).

    The output's static shape is used when every axis is known; otherwise the target's items
    (a ``0`` copies the input's axis unless ``allowzero``).
    """
    out = node.outputs[0]
    tokens = value_tokens(out)
    if tokens is not None and all(t[0] != "axis" for t in tokens):
        return tokens
    items = shape_items(node.inputs[1])
    if items is None:
        return tokens
    allowzero = _attr_int(node, "allowzero", 0)
    result: list[Token | None] = []
    for index, item in enumerate(items):
        if item == -1:
            result.append(None)
        elif item == 0 and not allowzero:
            result.append(dim_token(node.inputs[0], index))
        else:
            result.append(_item_token(item))
    return result

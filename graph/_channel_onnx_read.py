"""Reading helpers of the ONNX channel adapter: constants (initializers, ``Constant`` nodes in
any of their ``value*`` forms, transposes of them), small integer vectors, and reshape/expand
targets as :class:`Entry` lists (constant entries, run-time reads of another value's axis
through ``Shape``/``Slice``/``Gather``/``Concat``, or unknown)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._channel_view import Const, Entry
from .onnx import constant_array, inferred_tensor_types

__all__ = ["array_of", "const_shape", "dims_of", "entries_of", "inferred_dims", "input_of",
           "ints_of", "is_const", "through_transpose"]


def _dims(shape: ir.Shape) -> tuple:
    return tuple(d if isinstance(d, int) else (str(d.value) if d.value is not None else None)
                 for d in shape)


def dims_of(value: ir.Value | None) -> tuple | None:
    return None if value is None or value.shape is None else _dims(value.shape)


def inferred_dims(model: ir.Model) -> dict[str, tuple]:
    """Shapes ONNX shape inference gives the main graph's values, for models saved without
    them (hand-built or stripped); the model is not touched, and nothing is found when
    inference fails."""
    return {name: _dims(ir.serde.deserialize_type_proto_for_shape(type_proto))
            for name, type_proto in inferred_tensor_types(model).items()}


def array_of(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer or ``Constant`` (any of its ``value*`` attributes)."""
    array = constant_array(value)
    node = value.producer() if array is None and value is not None else None
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return array
    for key in ("value_int", "value_ints", "value_float", "value_floats"):
        attr = node.attributes.get(key)
        if attr is not None:
            return np.asarray(attr.value, dtype=np.int64 if "int" in key else np.float32)
    return None


def is_const(value: ir.Value | None) -> bool:
    if value is None or value.is_graph_input():
        return False
    return value.const_value is not None or array_of(value) is not None


def const_shape(value: ir.Value) -> tuple[int, ...]:
    if value.const_value is not None:
        return tuple(int(d) for d in value.const_value.shape)
    return tuple(int(d) for d in array_of(value).shape)


def through_transpose(value: ir.Value | None) -> tuple[ir.Value, tuple[int, ...], ir.Node] | None:
    """``(constant, perm, transpose node)`` if ``value`` is a ``Transpose`` of a constant."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    source = node.inputs[0]
    if not is_const(source):
        return None
    rank = len(const_shape(source))
    perm = node.attributes.get_ints("perm", None)
    return source, tuple(perm) if perm is not None else tuple(range(rank))[::-1], node


def input_of(value: ir.Value | None, reader: str, names: dict[int, str]):
    if value is None:
        return None
    if is_const(value):
        shape = const_shape(value)
        return Const(value.name, reader, shape, tuple(range(len(shape))))
    through = through_transpose(value)
    if through is not None:
        source, perm, node = through
        shape = const_shape(source)
        return Const(source.name, names[id(node)], tuple(shape[p] for p in perm), perm)
    return value.name


def ints_of(value: ir.Value | None, depth: int = 0) -> list[int] | None:
    """A small integer vector: a constant, or reshapes/casts/concats of constants (unfolded
    exports compute axes and targets so)."""
    array = array_of(value)
    if array is not None:
        return [int(v) for v in np.asarray(array).reshape(-1)]
    node = value.producer() if value is not None else None
    if node is None or depth > 8 or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in ("Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten"):
        return ints_of(node.inputs[0], depth + 1)
    if node.op_type == "Concat":
        pieces = [ints_of(v, depth + 1) for v in node.inputs]
        return None if any(p is None for p in pieces) else [v for p in pieces for v in p]
    return None


def entries_of(value: ir.Value | None, reader: str, names: dict[int, str],
             depth: int = 0) -> list[Entry] | None:
    """Entries of a 1-D int64 shape vector: constants (rewritable where they are stored),
    run-time reads of another value's axis (``follow``), or unknown."""
    if value is None or depth > 12:
        return None
    if array_of(value) is not None:
        return [Entry(v, reader, value.name, k) for k, v in enumerate(ints_of(value))]
    node = value.producer()
    me = names.get(id(node)) if node is not None else None
    t = node.op_type if node is not None and node.domain in ("", "ai.onnx") else ""
    if t == "Shape":
        rank = len(dims_of(node.inputs[0]) or ())
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", rank)
        axes = range(rank)[slice(start, end)]
        if is_const(node.inputs[0]) or not rank:
            return [Entry(None) for _ in axes] if rank else None
        return [Entry(None, follow=(node.inputs[0].name, a)) for a in axes]
    if t == "Concat":  # an entry stored in a piece is rewritten at the caller's position
        pieces = [entries_of(v, me, names, depth + 1) for v in node.inputs]
        if any(p is None for p in pieces):
            return None
        return [Entry(e.value, reader, value.name, k, e.follow) if e.reader == me and e.tensor
                else e for k, e in enumerate(e for p in pieces for e in p)]
    if t in ("Squeeze", "Unsqueeze", "Cast", "Identity", "Reshape"):
        return entries_of(node.inputs[0], me, names, depth + 1)
    if t == "Expand" and ints_of(node.inputs[1]) == [1]:
        base = entries_of(node.inputs[0], me, names, depth + 1)
        return base if base is not None and len(base) == 1 else None
    if t in ("Slice", "Gather"):
        base = entries_of(node.inputs[0], me, names, depth + 1)
        picked = _pick(node, base)
        if picked is not None:
            return picked
    shape = dims_of(value)
    if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
        return None
    return [Entry(None) for _ in range(shape[0])]


def _pick(node: ir.Node, base: list[Entry] | None) -> list[Entry] | None:
    """``Slice``/``Gather`` of a shape vector with constant bounds or indices."""
    if base is None:
        return None
    if node.op_type == "Gather":
        index = ints_of(node.inputs[1])
        if index is None or node.attributes.get_int("axis", 0) != 0:
            return None
        return [base[i] for i in index] if all(-len(base) <= i < len(base) for i in index) \
            else None
    bounds = [ints_of(v) if v is not None else None for v in node.inputs[1:5]]
    starts, ends, axes, steps = bounds + [None] * (4 - len(bounds))
    if starts is None or ends is None or len(starts) != 1 or axes not in (None, [0], [-1]) or (
            steps not in (None, [1])):
        return None
    return base[slice(starts[0], ends[0])]

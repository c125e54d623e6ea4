"""ONNX side of structured pruning: physically slice every use of a channel group.

Given a :class:`~graphpress.graph.channels.ChannelGroup` and the kept unit indices, every
use's tensor loses the removed channels along its axis (``np.take`` of the kept index: the
indices outside the group's window ``[offset, offset + size)`` stay, so a concatenated
consumer keeps the other groups' channels). The result is a NEW initializer
``<tensor>.<tag>`` (``tag`` = ``"prune"`` unless the caller names another, e.g. ``"tp"``) bound
to the use's node (or to the ``Transpose`` that feeds it); the old
tensor is dropped once nothing reads it. Uses whose tensor is not a constant (activations,
``Concat``/``Gelu`` outputs) need no slicing: their shapes follow.

Shape uses (role ``"shape"``) scale the number they encode by ``kept / size``: a ``Reshape``
target ``[B, S, 12, 32]`` becomes ``[B, S, 9, 32]`` and ``[B, S, 384]`` becomes ``[B, S, 288]``
when 3 of 12 heads of 32 go; ``-1`` and ``0`` (inferred / copied) stay. The target may be a
constant or a ``Concat`` of 1-D pieces (a fresh ``Concat`` with a new piece is made for this
``Reshape`` only, since one target is often shared by every layer); ``Split`` sizes and
``num_heads`` attributes scale the same way.

A ``MatMulNBits`` weight is sliced as a whole (codes, scales, zero points, ``N``/``K``;
:mod:`._shrink_nbits_onnx`), by output rows or by whole blocks of input channels.

The shapes recorded on the values between producers and consumers go stale; they are
cleared and re-inferred once at the end (``onnx.shape_inference`` on a serialised copy).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graphpress.graph.errors import UnsupportedGraphError
from graphpress.graph.onnx import (
    add_initializer,
    inferred_tensor_types,
    mark,
    unique_name,
    value_names,
)

from .._rewrite import drop_unused_constants, onnx_const
from ._importance import IndexLedger, unit_channels
from ._shrink_nbits_onnx import reads_codes, shrink_nbits

__all__ = ["OnnxShrinker", "removed_channels", "scale_count", "TAG"]

logger = logging.getLogger(__name__)

TAG = "prune"


def removed_channels(group, keep_units, offset: int) -> np.ndarray:
    """Original indices (along a use's axis, from ``offset``) of the units not kept."""
    units = group.size // group.unit
    return unit_channels(np.setdiff1d(np.arange(units), keep_units), group.unit, offset)


def scale_count(value: int, kept: int, size: int) -> int:
    """A shape number that encodes ``size`` channels (or a multiple/fraction), rescaled."""
    if value in (-1, 0):
        return value
    if (value * kept) % size:
        raise UnsupportedGraphError(
            f"shape constant {value} does not scale with {kept}/{size} kept channels; prune "
            "whole units (heads) or exclude this group")
    return value * kept // size


class OnnxShrinker:
    """Shrinks groups of one ``onnx_ir.Model`` in place; call :meth:`finish` at the end."""

    def __init__(self, model: ir.Model, pass_name: str, tag: str = TAG) -> None:
        self.model, self.graph, self.pass_name, self.tag = model, model.graph, pass_name, tag
        self.taken = value_names(model)
        self.nodes: dict[str, ir.Node] = {n.name: n for n in self.graph if n.name}
        for node in self.graph:  # unnamed nodes by their first output's name
            if not node.name and node.outputs:
                self.nodes.setdefault(node.outputs[0].name, node)
        self.stale: dict[ir.Value, None] = {}
        self.touched: dict[ir.Value, None] = {}
        self.ledger = IndexLedger()
        self.shapes: dict[tuple[int, tuple[int, ...]], ir.Value] = {}  # shared targets stay shared

    def node(self, name: str) -> ir.Node:
        found = self.nodes.get(name)
        if found is None:
            raise UnsupportedGraphError(f"no ONNX node named {name!r}: the channel groups were "
                                        "computed on another graph")
        return found

    def _input(self, node: ir.Node, tensor: str) -> tuple[ir.Node, int] | None:
        """(node, input index) holding the value first named ``tensor`` (maybe behind a
        ``Transpose``/``Identity``/``Cast`` of a constant)."""
        for i, value in enumerate(node.inputs):
            if value is not None and tensor in (value.name, value.meta.get("prune.origin")):
                return node, i
        for value in node.inputs:
            inner = value.producer() if value is not None else None
            if inner is not None and inner.op_type in ("Transpose", "Identity", "Cast"):
                found = self._input(inner, tensor)
                if found is not None:
                    return found
        return None

    def array(self, use) -> np.ndarray | None:
        """The constant a use names, as numpy (``None`` for computed values)."""
        found = self._input(self.node(use.node), use.tensor) if use.tensor else None
        return None if found is None else onnx_const(found[0].inputs[found[1]])

    def consumer_input(self, use) -> tuple[str, int] | None:
        """(value name, channel axis) of the data input of an ``"in"`` use's node."""
        node = self.node(use.node)
        if node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
            return None
        if node.op_type == "MatMul" or (node.op_type == "Gemm"
                                        and not node.attributes.get_int("transA", 0)):
            return node.inputs[0].name, -1
        if node.op_type == "Conv":
            return node.inputs[0].name, 1
        return None

    def removed(self, use, axis: int) -> np.ndarray:
        """Original indices removed so far along ``axis`` of the constant ``use`` reads."""
        found = self._input(self.node(use.node), use.tensor) if use.tensor else None
        return (self.ledger.removed(found[0].inputs[found[1]].name, axis) if found
                else np.zeros(0, np.int64))

    def sole_reader(self, use) -> bool:
        """Whether the constant of ``use`` is read by the use's node alone (not tied)."""
        node = self.node(use.node)
        found = self._input(node, use.tensor) if use.tensor else None
        if found is None:
            return False
        owner, index = found
        value = owner.inputs[index]
        return (len(value.uses()) == 1 and not value.is_graph_output()
                and (owner is node or [u.node for u in owner.outputs[0].uses()] == [node]))

    def replace(self, use, array: np.ndarray) -> None:
        """Make the use's node read a NEW initializer ``<origin>.refit`` holding ``array``
        (same shape) instead of its constant; later shrinking finds it by origin."""
        owner, index = self._input(self.node(use.node), use.tensor)
        value = owner.inputs[index]
        origin = value.meta.get("prune.origin", value.name)
        new = add_initializer(self.graph, f"{origin}.refit",
                              np.ascontiguousarray(array).astype(onnx_const(value).dtype),
                              self.pass_name, self.taken)
        new.meta["prune.origin"] = origin
        owner.replace_input_with(index, new)
        self.stale[value] = None

    def shrink(self, group, keep_units) -> None:
        """Remove every unit of ``group`` not in ``keep_units`` from all its uses."""
        size = group.size
        made: dict[tuple[int, int, int], ir.Value] = {}  # (id(value), axis, offset) -> new
        kept_count = len(keep_units) * group.unit
        for use in group.uses:
            node = self.node(use.node)
            if use.role == "shape":
                self._shape(node, use, kept_count, size)
                continue
            if reads_codes(node, use.tensor):
                shrink_nbits(self, node, use, removed_channels(group, keep_units, use.offset))
                continue
            found = self._input(node, use.tensor) if use.tensor else None
            if found is None:
                continue  # an activation or other computed value: its shape follows
            owner, index = found
            value = owner.inputs[index]
            array = onnx_const(value)
            if array is None or array.ndim == 0:
                continue
            axis = use.axis % array.ndim
            if array.shape[axis] == 1:
                continue  # broadcast along the channel axis (a scalar-like constant)
            key = (id(value), axis, use.offset)
            if key not in made:
                origin = value.meta.get("prune.origin", value.name)
                kept, history = self.ledger.keep(value.name, axis, array.shape[axis],
                                                 removed_channels(group, keep_units, use.offset))
                made[key] = add_initializer(
                    self.graph, f"{origin}.{self.tag}",
                    np.ascontiguousarray(np.take(array, kept, axis)), self.pass_name, self.taken)
                self.ledger.adopt(made[key].name, history)
                made[key].meta["prune.origin"] = origin
            owner.replace_input_with(index, made[key])
            self.stale[value] = None
        self._touch(group)

    def _shape(self, node: ir.Node, use, kept: int, size: int) -> None:
        if "num_heads" in node.attributes and use.role == "shape" and node.op_type != "Reshape":
            heads = node.attributes.get_int("num_heads")
            node.attributes["num_heads"] = ir.AttrInt64("num_heads", scale_count(heads, kept, size))
            return
        index = 1 if node.op_type in ("Reshape", "Split", "Expand") else None
        if index is None or len(node.inputs) <= index or node.inputs[index] is None:
            raise UnsupportedGraphError(f"cannot rewrite the shape of {node.op_type} "
                                        f"{node.name!r}; exclude this group")
        target = node.inputs[index]
        array = onnx_const(target)
        if array is not None:
            new = np.array(array, np.int64, copy=True).reshape(-1)
            new[use.axis] = scale_count(int(new[use.axis]), kept, size)
            if not np.array_equal(new, array.reshape(-1)):
                key = (id(target), tuple(new.tolist()))
                if key not in self.shapes:
                    self.shapes[key] = add_initializer(self.graph, f"{target.name}.{self.tag}", new,
                                                       self.pass_name, self.taken)
                node.replace_input_with(index, self.shapes[key])
                self.stale[target] = None
            return
        self._concat_piece(node, index, use.axis, kept, size)

    def _concat_piece(self, node: ir.Node, index: int, axis: int, kept: int, size: int) -> None:
        concat = node.inputs[index].producer()
        if concat is None or concat.op_type != "Concat":
            raise UnsupportedGraphError(f"the target of {node.op_type} {node.name!r} is computed "
                                        "by neither a constant nor a Concat; exclude this group")
        start, pieces = 0, list(concat.inputs)
        for i, piece in enumerate(pieces):
            array = onnx_const(piece)
            length = array.size if array is not None else (
                piece.shape[0] if piece.shape is not None and len(piece.shape) == 1 else None)
            if not isinstance(length, int):
                raise UnsupportedGraphError(f"cannot locate entry {axis} of the target of "
                                            f"{node.name!r}; exclude this group")
            if start <= axis < start + length:
                if array is None:
                    raise UnsupportedGraphError(f"entry {axis} of the target of {node.name!r} "
                                                "is computed at run time; exclude this group")
                new = np.array(array, np.int64, copy=True).reshape(-1)
                new[axis - start] = scale_count(int(new[axis - start]), kept, size)
                if np.array_equal(new, array.reshape(-1)):
                    return
                pieces[i] = add_initializer(self.graph, f"{piece.name}.{self.tag}", new,
                                            self.pass_name, self.taken)
                out = ir.Value(name=unique_name(self.graph, f"{concat.outputs[0].name}.{self.tag}",
                                                self.taken), type=concat.outputs[0].type)
                fresh = ir.node("Concat", pieces, attributes={"axis": 0}, outputs=[out],
                                name=unique_name(self.graph, f"{node.name}.{self.tag}.target",
                                                 self.taken))
                self.graph.insert_before(node, mark(fresh, self.pass_name))
                node.replace_input_with(index, out)
                if not concat.outputs[0].uses() and not concat.outputs[0].is_graph_output():
                    self.graph.remove(concat, safe=True)  # the old target is dead
                    self.stale[piece] = None
                return
            start += length

    def _touch(self, group) -> None:
        """Collect the values whose recorded shapes go stale: outputs of the nodes from the
        group's producers up to (not including) its consumers."""
        consumers = {self.node(u.node) for u in group.uses if u.role == "in"}
        stack = [self.node(u.node) for u in group.uses if u.role != "in"]
        seen: set[ir.Node] = set()
        while stack:
            node = stack.pop()
            if node in seen or node in consumers:
                continue
            seen.add(node)
            for out in node.outputs:
                if out.is_graph_output():
                    continue
                self.touched[out] = None
                stack.extend(use.node for use in out.uses())

    def finish(self) -> None:
        """Drop constants nobody reads and re-infer the shapes of the touched values."""
        drop_unused_constants(list(self.stale))
        refresh_shapes(self.model, list(self.touched))


def refresh_shapes(model: ir.Model, values: list[ir.Value]) -> None:
    """Clear the shapes of ``values`` and fill them from ONNX shape inference."""
    for value in values:
        value.shape = None
    if not values:
        return
    inferred = inferred_tensor_types(model)
    for value in values:
        type_proto = inferred.get(value.name)
        if type_proto is not None:
            value.shape = ir.serde.deserialize_type_proto_for_shape(type_proto)
            if value.type is None:
                value.type = ir.serde.deserialize_type_proto_for_type(type_proto)

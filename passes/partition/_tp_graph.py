"""What tensor-parallel planning reads from a graph, for FX and ONNX alike.

:class:`GraphReader` answers a few questions by node name: the linear layers
(:func:`passes._linears.find_linears`), the stored shape of a constant a node reads, the head
count a projection is split into (the first reshape after it that splits its ``window``
output channels into ``[..., heads, head_dim]``), a reshape entry a ``"shape"`` use names,
the PyTorch module a node belongs to (FX ``nn_module_stack``; ONNX the exporter's
``namespace``; else the weight's dotted name) and the order of the nodes.
"""

from __future__ import annotations

import ast
import logging

import onnx_ir as ir
import torch
from torch import fx

from graphpress.graph.analysis import op_name
from graphpress.graph.fx import get_tensor
from graphpress.graph.kind import kind

from .._linears import LinearSite, find_linears
from .._rewrite import onnx_const

__all__ = ["GraphReader"]

logger = logging.getLogger(__name__)

_FX_RESHAPES = {"aten.view", "aten.reshape", "aten._unsafe_view"}
_FX_THROUGH = {"aten.add", "aten.t", "aten.permute", "aten.transpose", "aten.clone",
               "aten.contiguous", "aten._to_copy", "aten.to", "aten.alias"}
_ONNX_THROUGH = {"Add", "Transpose", "Identity", "Cast"}
_PARAM_SUFFIXES = (".weight", ".bias")


class GraphReader:
    """Read-only questions about one FX ``GraphModule`` or ``onnx_ir.Model``."""

    def __init__(self, graph) -> None:
        self.graph, self.kind = graph, kind(graph)
        self.linears: dict[str, LinearSite] = {}
        for site in find_linears(graph):
            self.linears[_name(site.node)] = site
        if self.kind == "fx":
            self.nodes = {n.name: n for n in graph.graph.nodes}
        else:
            self.nodes = {}
            for node in graph.graph:
                self.nodes.setdefault(_name(node), node)
        self.order = {name: i for i, name in enumerate(self.nodes)}

    # constants ---------------------------------------------------------------------------
    def const_shape(self, node_name: str, tensor: str) -> tuple[int, ...] | None:
        """Stored shape of the constant ``tensor`` read by ``node_name`` (maybe through a
        transpose), or ``None``."""
        node = self.nodes.get(node_name)
        if node is None or not tensor:
            return None
        if self.kind == "fx":
            stack, seen = [node], 0
            while stack and seen < 8:
                current, seen = stack.pop(), seen + 1
                for arg in current.all_input_nodes:
                    if arg.op == "get_attr" and tensor in (arg.target, arg.name):
                        value = get_tensor(self.graph, arg)
                        return None if value is None else tuple(value.shape)
                    if arg.op == "call_function" and op_name(arg) in _FX_THROUGH:
                        stack.append(arg)
            return None
        stack, seen = [node], 0
        while stack and seen < 8:
            current, seen = stack.pop(), seen + 1
            for value in current.inputs:
                if value is None:
                    continue
                if value.name == tensor:
                    array_shape = value.const_value.shape if value.const_value is not None else (
                        value.shape)
                    return None if array_shape is None else tuple(int(d) for d in array_shape)
                producer = value.producer()
                if producer is not None and producer.op_type in ("Transpose", "Identity", "Cast"):
                    stack.append(producer)
        return None

    def shape_entry(self, use) -> int | None:
        """The integer a ``"shape"`` use names (``None`` when computed or unreadable)."""
        node = self.nodes.get(use.node)
        if node is None:
            return None
        if self.kind == "fx":
            sizes = node.args[1] if len(node.args) > 1 else None
            if isinstance(sizes, (list, tuple)) and -len(sizes) <= use.axis < len(sizes):
                entry = sizes[use.axis]
                return entry if isinstance(entry, int) else None
            return None
        for value in node.inputs:
            if value is not None and value.name == use.tensor:
                array = onnx_const(value)
                if array is not None and array.ndim == 1 and use.axis < array.size:
                    return int(array[use.axis])
        return None

    # structure ---------------------------------------------------------------------------
    def head_count(self, node_name: str, window: int) -> int | None:
        """Heads of the first reshape after ``node_name`` that splits ``window`` channels
        (the last axis) into ``[..., heads, head_dim]``."""
        start = self.nodes.get(node_name)
        frontier, seen = [start], 0
        while frontier and seen < 16:
            current, seen = frontier.pop(0), seen + 1
            for user in self._users(current):
                name = op_name(user)
                shape = self._out_shape(user)
                if name in _FX_RESHAPES | {"Reshape"} and shape is not None and len(shape) >= 2:
                    heads, dim = shape[-2], shape[-1]
                    if isinstance(heads, int) and isinstance(dim, int) and heads * dim == window:
                        return heads
                if name in _FX_THROUGH | _ONNX_THROUGH:
                    frontier.append(user)
        return None

    def users(self, node_name: str) -> list[str]:
        return [_name(u) for u in self._users(self.nodes[node_name])]

    def _users(self, node) -> list:
        if node is None:
            return []
        if isinstance(node, fx.Node):
            return list(node.users)
        return [use.node for out in node.outputs for use in out.uses()]

    def _out_shape(self, node) -> tuple | None:
        if isinstance(node, fx.Node):
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                return None
            return tuple(d if isinstance(d, int) else None for d in val.shape)
        shape = node.outputs[0].shape if node.outputs else None
        return None if shape is None else tuple(d if isinstance(d, int) else None for d in shape)

    # names -------------------------------------------------------------------------------
    def module_of(self, node_name: str, weight: str = "") -> str | None:
        """The PyTorch module path (``encoder.layer.0.intermediate.dense``) of a node."""
        node = self.nodes.get(node_name)
        if isinstance(node, fx.Node):
            stack = node.meta.get("nn_module_stack")
            if stack:
                path = list(stack.values())[-1][0]
                if path:
                    return path
        elif isinstance(node, ir.Node):
            found = _namespace_module(node.metadata_props.get("namespace", ""))
            if found:
                return found
        return _weight_module(weight, self._folded_from(node_name, weight))

    def _folded_from(self, node_name: str, tensor: str) -> str:
        if self.kind != "onnx" or not tensor:
            return ""
        initializer = self.graph.graph.initializers.get(tensor)
        raw = initializer.metadata_props.get("pkg.onnxscript.optimizer.folded_from", "") if (
            initializer is not None) else ""
        try:
            names = ast.literal_eval(raw) if raw else []
        except (ValueError, SyntaxError):
            return ""
        return names[0] if len(names) == 1 else ""


def _name(node) -> str:
    if isinstance(node, fx.Node):
        return node.name
    return node.name or (node.outputs[0].name if node.outputs else "")


def _namespace_module(namespace: str) -> str | None:
    """``": Model/encoder: Encoder/encoder.layer.0.x: Linear/linear: aten.linear.default"``
    → ``"encoder.layer.0.x"`` (the innermost module; the last piece is the op)."""
    pieces = [p.split(":")[0].strip() for p in namespace.split("/")]
    modules = [p for p in pieces[:-1] if p]
    return modules[-1] if modules else None


def _weight_module(*names: str) -> str | None:
    for name in names:
        if name and "." in name and name.endswith(_PARAM_SUFFIXES):
            return name.rsplit(".", 1)[0]
    return None

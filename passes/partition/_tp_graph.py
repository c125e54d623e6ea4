"""What tensor-parallel planning reads from a graph, for FX and ONNX alike.

:class:`GraphReader` answers a few questions by node name: the float linear layers
(:func:`passes._linears.find_linears`, for the vocabulary sites), the linear layer a channel
use's constant is the weight (or a per-channel scale/zero point) of, quantized ones included
(:func:`graphpress.graph.channels.linear_weights`), the stored shape of a constant a node reads,
the block size of a ``MatMulNBits``/``quantize-weights`` layer, which run-time range a
``"range"`` use's node takes, a reshape entry a ``"shape"`` use names, the PyTorch module a
node belongs to (FX ``nn_module_stack``; ONNX the exporter's ``namespace``; else the weight's
dotted name) and the order of the nodes.
"""

from __future__ import annotations

import ast
import logging

import onnx_ir as ir
import torch
from torch import fx

from graphpress.graph.analysis import op_name
from graphpress.graph.channels import LinearWeight, linear_weights, nbits_chain, nbits_operands
from graphpress.graph.fx import get_tensor
from graphpress.graph.kind import kind

from .._linears import LinearSite, find_linears
from .._rewrite import onnx_const

__all__ = ["GraphReader"]

logger = logging.getLogger(__name__)

_FX_THROUGH = {"aten.add", "aten.t", "aten.permute", "aten.transpose", "aten.clone",
               "aten.contiguous", "aten._to_copy", "aten.to", "aten.alias"}
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
        self.layers: dict[str, LinearWeight] = {}
        self._weights: dict[tuple[str, str], LinearWeight] = {}
        for weight in linear_weights(graph):
            self.layers.setdefault(weight.layer, weight)
            for key in ((weight.reader, weight.tensor), *weight.companions):
                self._weights.setdefault(key, weight)

    # layers ------------------------------------------------------------------------------
    def layer_of(self, node_name: str, tensor: str) -> LinearWeight | None:
        """The linear layer whose weight (or per-channel scale/zero point) is ``tensor`` as
        ``node_name`` reads it."""
        return self._weights.get((node_name, tensor))

    def is_weight(self, node_name: str, tensor: str) -> bool:
        """Whether ``tensor`` read by ``node_name`` is a linear layer's weight itself."""
        found = self.layer_of(node_name, tensor)
        return found is not None and (found.reader, found.tensor) == (node_name, tensor)

    def block_size(self, layer: str) -> int:
        """Input channels per quantization block of a block-quantized layer (1 otherwise)."""
        weight, node = self.layers.get(layer), self.nodes.get(layer)
        if weight is None or weight.storage != "nbits" or node is None:
            return 1
        if self.kind == "onnx":
            found = nbits_operands(node)
            return found.block if found is not None else 1
        for arg in node.all_input_nodes:
            chain = nbits_chain(self.graph, arg)
            if chain is not None:
                return chain.block
        return 1

    def packed_parts(self, layer: str) -> list[str]:
        """The scales and zero points of a block-quantized layer (sliced with its codes)."""
        weight, node = self.layers.get(layer), self.nodes.get(layer)
        if weight is None or weight.storage != "nbits" or node is None:
            return []
        if self.kind == "onnx":
            found = nbits_operands(node)
            parts = [] if found is None else [found.scales, found.zero_points]
            return [v.name for v in parts if v is not None]
        for arg in node.all_input_nodes:
            chain = nbits_chain(self.graph, arg)
            if chain is not None:
                return [n.target for n in (chain.scales, chain.zero_points) if n is not None]
        return []

    def range_of(self, node_name: str) -> str | None:
        """``"min"``/``"max"`` for a node that reduces a whole tensor to its min/max,
        ``"dynamic_matmul"`` for ``DynamicQuantizeMatMul`` (its range is internal), else
        ``None``."""
        node = self.nodes.get(node_name)
        if node is None:
            return None
        name = op_name(node).split("::")[-1]
        if name in ("aten.min", "aten.max", "ReduceMin", "ReduceMax"):
            return "min" if name.endswith(("min", "Min")) else "max"
        return "dynamic_matmul" if name == "DynamicQuantizeMatMul" else None

    # constants ---------------------------------------------------------------------------
    def const_shape(self, node_name: str, tensor: str) -> tuple[int, ...] | None:
        """Stored shape of the constant ``tensor`` read by ``node_name`` (maybe through a
        transpose), or ``None``."""
        node = self.nodes.get(node_name)
        if node is None or not tensor:
            return None
        if self.is_weight(node_name, tensor):  # the logical [N, K] of packed codes
            return self.layer_of(node_name, tensor).shape
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

    def upstream_module(self, node_name: str, limit: int = 32) -> str | None:
        """The module of the nearest node upstream of ``node_name`` that names one (nodes made
        by quantization passes carry no exporter namespace; their inputs do)."""
        frontier, seen = [self.nodes.get(node_name)], 0
        while frontier and seen < limit:
            node, seen = frontier.pop(0), seen + 1
            if node is None:
                continue
            if seen > 1:
                found = self.module_of(_name(node))
                if found:
                    return found
            if isinstance(node, fx.Node):
                frontier.extend(node.all_input_nodes)
            else:
                frontier.extend(v.producer() for v in node.inputs if v is not None)
        return None

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

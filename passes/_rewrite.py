"""Graph-rewriting plumbing shared by the pass files (FX and ONNX), linear in graph size.

Dead code goes with one reverse sweep over the nodes in topological order: a node is dead when
none of its results is used, and removing it can only make *earlier* nodes dead, which the
same sweep reaches later (the FX helper is a worklist so callers can restrict it to a few
candidates). Bypassing an ONNX node keeps graph-output names stable by handing the output's
name to the replacement value. Constants are ONNX initializers that are not graph inputs (an
input with a default can be overridden) and ``Constant`` outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir
import torch
from torch import fx

from graphpress.graph.errors import PreconditionError
from graphpress.graph.kind import is_canonical_fx
from graphpress.graph.onnx import subgraphs, value_names  # re-exported for the passes

__all__ = [
    "bypass_onnx",
    "drop_unused_constants",
    "inference_dropout",
    "onnx_const",
    "remove_dead_fx",
    "remove_dead_onnx",
    "remove_node_onnx",
    "require_canonical",
    "subgraphs",
    "value_names",
]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_DROPOUTS = {_aten.dropout.default, _aten.feature_dropout.default, _aten.alpha_dropout.default,
             _aten.feature_alpha_dropout.default}  # (input, p, train)


def require_canonical(graph: object) -> None:
    """Raise :class:`PreconditionError` for an FX graph outside the aten dialect."""
    if isinstance(graph, fx.GraphModule) and not is_canonical_fx(graph):
        raise PreconditionError(
            "this GraphModule is not in the aten dialect of torch.export (it calls modules or "
            "Python functions, e.g. from symbolic_trace); re-capture it with "
            "graphpress.graph.capture(gm, example_args)"
        )


def inference_dropout(node: fx.Node) -> bool:
    """Whether ``node`` is an ATen dropout that is the identity (``train=False`` or ``p=0``)."""
    if node.target not in _DROPOUTS or len(node.args) < 3:
        return False
    return node.args[2] is False or node.args[1] == 0


def _fx_removable(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output", "call_module"):
        return False
    return node.op == "get_attr" or inference_dropout(node) or not node.is_impure()


def remove_dead_fx(gm: fx.GraphModule, candidates: Iterable[fx.Node]) -> tuple[int, int]:
    """Erase unused pure nodes reachable backwards from ``candidates``, and the attributes of
    removed ``get_attr`` nodes no remaining node refers to. Returns (nodes, attributes) removed.
    """
    stack, erased, targets = list(candidates), set(), []
    while stack:
        node = stack.pop()  # candidates in graph order are visited in reverse
        if node in erased or node.users or not _fx_removable(node):
            continue
        inputs = node.all_input_nodes
        if node.op == "get_attr":
            targets.append(node.target)
        gm.graph.erase_node(node)
        erased.add(node)
        stack.extend(inputs)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    attrs = 0
    for target in dict.fromkeys(targets):
        owner_path, _, field = target.rpartition(".")
        parts = target.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts))}
        if target in used or prefixes & modules:  # still used, or inside a called module
            continue
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if hasattr(owner, field):
            delattr(owner, field)  # fresh container (clone) or the graph's own module
            attrs += 1
    return len(erased), attrs


def _detach(node: ir.Node) -> None:
    for index in range(len(node.inputs)):
        node.replace_input_with(index, None)
    for sub in subgraphs(node):  # inner nodes may use outer values
        for inner in sub:
            _detach(inner)


def remove_node_onnx(node: ir.Node) -> None:
    """Remove ``node`` (whose outputs must be unused) and release the values it used."""
    _detach(node)
    node.graph.remove(node)


def bypass_onnx(node: ir.Node, output: ir.Value, source: ir.Value) -> bool:
    """Redirect uses of ``output`` to ``source`` and remove ``node``; False if it must stay.

    A graph output keeps its name: ``source`` takes it over, which needs ``source`` to be
    produced by a node of the same graph and not to be a graph output itself.
    """
    graph = node.graph
    if output.is_graph_output():
        producer = source.producer()
        if producer is None or producer.graph is not graph or source.is_graph_output():
            return False
        name = output.name
        output.replace_all_uses_with(source, replace_graph_outputs=True)
        output.name = None
        source.name = name
        if source.type is None:  # a graph output needs its type
            source.type, source.shape = output.type, output.shape
    else:
        output.replace_all_uses_with(source)
    if any(v.uses() or v.is_graph_output() for v in node.outputs):
        return True  # another output is still used; the node stays (never for our callers)
    remove_node_onnx(node)
    return True


def remove_dead_onnx(graph: ir.Graph) -> tuple[int, int]:
    """Remove dead nodes and unused initializers of ``graph`` and its subgraphs."""
    nodes = inits = 0
    for node in reversed(graph):
        if not node.outputs or any(v.uses() or v.is_graph_output() for v in node.outputs):
            for sub in subgraphs(node):  # dce Rule 3: first, so outer values may die
                n, i = remove_dead_onnx(sub)
                nodes, inits = nodes + n, inits + i
            continue
        remove_node_onnx(node)  # dce Rule 1
        nodes += 1
    for name, value in list(graph.initializers.items()):  # dce Rule 2
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            graph.initializers.pop(name)
            inits += 1
    return nodes, inits


def onnx_const(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant ``value`` (initializer that is no graph input, ``Constant``).

    Reads the tensor without touching it (``ir.convenience.get_const_tensor`` renames the
    ``Constant``'s tensor, which ``optimize`` shares with the caller's model).
    """
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.attributes) != 1:
        return None
    (name, attr), = node.attributes.items()
    if attr.is_ref():
        return None
    if name == "value":
        return attr.value.numpy()
    dtype = {"value_float": np.float32, "value_floats": np.float32,
             "value_int": np.int64, "value_ints": np.int64}.get(name)
    return None if dtype is None else np.array(attr.value, dtype=dtype)


def drop_unused_constants(values: Iterable[ir.Value]) -> int:
    """Remove initializers/``Constant`` nodes among ``values`` that nothing uses any more."""
    removed = 0
    for value in values:
        if value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        producer = value.producer()
        if value.is_initializer() and value.graph is not None:
            value.graph.initializers.pop(value.name)
        elif producer is not None and producer.op_type == "Constant" and producer.graph is not None:
            remove_node_onnx(producer)
        else:
            continue
        removed += 1
    return removed


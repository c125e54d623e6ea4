"""What kind a graph is, and how to copy its structure.

A graph is either a ``torch.fx.GraphModule`` (the aten dialect of ``torch.export``) or an
``onnx_ir.Model``. :func:`clone` copies the *structure* (nodes, values, module tree) and
shares the tensors, which is what makes ``optimize(copy=True)`` cheap: passes never modify a
tensor in place, they create new ones and rebind.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import onnx_ir as ir
import torch
from torch import fx

from .errors import UnsupportedGraphError

__all__ = ["Graph", "GraphKind", "kind", "clone", "is_canonical_fx", "CANONICAL_MARK"]

logger = logging.getLogger(__name__)

Graph = fx.GraphModule | ir.Model
GraphKind = Literal["fx", "onnx"]

#: ``gm.meta`` key set by :func:`graphpress.graph.capture` on graphs in the canonical dialect.
CANONICAL_MARK = "graphpress.dialect"


def kind(graph: object) -> GraphKind:
    """Return ``"fx"`` or ``"onnx"``; raise :class:`UnsupportedGraphError` for anything else."""
    if isinstance(graph, fx.GraphModule):
        return "fx"
    if isinstance(graph, ir.Model):
        return "onnx"
    raise UnsupportedGraphError(
        f"expected a torch.fx.GraphModule or an onnx_ir.Model, got {type(graph).__name__}; "
        "capture a PyTorch model with graphpress.graph.capture(model, args) or load an ONNX "
        "file with graphpress.graph.load(path)"
    )


def is_canonical_fx(gm: fx.GraphModule) -> bool:
    """True if ``gm`` is in the aten dialect of ``torch.export`` (calls only ATen/operator ops)."""
    if gm.meta.get(CANONICAL_MARK) == "aten":
        return True
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target != "_guards_fn":
            return False
        if node.op == "call_method":
            return False
        if node.op == "call_function" and not isinstance(
            node.target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)
        ):
            if getattr(node.target, "__module__", "") != "_operator":
                return False
    return True


def clone(graph: Graph) -> Graph:
    """Copy the structure of ``graph``; tensors (weights, initializers) are shared."""
    if kind(graph) == "onnx":
        return graph.clone()
    return _clone_fx(graph)


def _clone_fx(gm: fx.GraphModule) -> fx.GraphModule:
    # fx.GraphModule(root, graph) rebuilds the module tree with fresh container modules and
    # binds the very same tensors/leaf modules the graph's get_attr/call_module nodes name.
    new_graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(gm, new_graph, class_name=type(gm).__name__)
    new.meta = copy.copy(getattr(gm, "meta", {}))
    for attr in ("_in_spec", "_out_spec", "range_constraints"):
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    new.train(gm.training)
    return new

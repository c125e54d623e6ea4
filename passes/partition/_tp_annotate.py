"""Tensor-parallel annotations on FX nodes and ONNX nodes, and the graph-level JSON plan.

Node annotations (keys from :mod:`graphpress.export.shards`): ``graphpress.tp`` = ``{"role",
"group"}`` (FX: the dict in ``node.meta``; ONNX: its JSON in ``metadata_props``),
``graphpress.collective`` = the collective the node's output goes through and
``graphpress.collective_dim`` its dimension (ONNX: strings). The plan is one JSON string in
FX ``gm.meta`` / ONNX ``model.metadata_props`` under ``graphpress.tensor_parallel``.
"""

from __future__ import annotations

import json
import logging

import onnx_ir as ir
from torch import fx

from graphpress.export.shards import (
    COLLECTIVE_DIM_KEY,
    COLLECTIVE_KEY,
    PLAN_KEY,
    TP_KEY,
)
from graphpress.graph.errors import PreconditionError

__all__ = ["set_note", "get_note", "clear_notes", "write_plan", "read_plan", "drop_plan",
           "require_plan", "node_items"]

logger = logging.getLogger(__name__)

_NODE_KEYS = (TP_KEY, COLLECTIVE_KEY, COLLECTIVE_DIM_KEY)


def node_items(graph) -> list[tuple[str, object]]:
    """``(name, node)`` of every operator node, in graph order."""
    if isinstance(graph, fx.GraphModule):
        return [(n.name, n) for n in graph.graph.nodes if n.op == "call_function"]
    return [(n.name or (n.outputs[0].name if n.outputs else ""), n) for n in graph.graph]


def set_note(node, key: str, value) -> None:
    """Annotate ``node`` (dicts become JSON and numbers strings on ONNX nodes)."""
    if isinstance(node, fx.Node):
        node.meta[key] = value
    else:
        node.metadata_props[key] = json.dumps(value) if isinstance(value, dict) else str(value)


def get_note(node, key: str):
    """The annotation ``key`` of ``node`` as written by :func:`set_note` (``None`` if absent)."""
    if isinstance(node, fx.Node):
        return node.meta.get(key)
    raw = node.metadata_props.get(key)
    if raw is None:
        return None
    if key == TP_KEY:
        return json.loads(raw)
    if key == COLLECTIVE_DIM_KEY:
        return int(raw)
    return raw


def clear_notes(graph, keys=_NODE_KEYS) -> None:
    for _, node in node_items(graph):
        for key in keys:
            if isinstance(node, fx.Node):
                node.meta.pop(key, None)
            else:
                node.metadata_props.pop(key, None)


def write_plan(graph, key: str, plan: dict) -> None:
    text = json.dumps(plan, sort_keys=True)
    if isinstance(graph, fx.GraphModule):
        graph.meta[key] = text
    else:
        graph.metadata_props[key] = text


def drop_plan(graph, key: str) -> None:
    store = graph.meta if isinstance(graph, fx.GraphModule) else graph.metadata_props
    store.pop(key, None)


def read_plan(graph, key: str = PLAN_KEY) -> dict | None:
    if isinstance(graph, fx.GraphModule):
        text = graph.meta.get(key)
    elif isinstance(graph, ir.Model):
        text = graph.metadata_props.get(key)
    else:
        return None
    return json.loads(text) if text else None


def require_plan(graph, what: str) -> dict:
    """The tensor-parallel plan, or :class:`PreconditionError` saying to run the pass."""
    plan = read_plan(graph, PLAN_KEY)
    if plan is None:
        raise PreconditionError(
            f"{what} needs a graph annotated by shard-tensor-parallel: run "
            "optimize(graph, ['shard-tensor-parallel:world_size=2']) first")
    return plan

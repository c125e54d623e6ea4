"""Small helpers for mutating aten-level FX graphs with provenance.

Every node a pass creates records the pass name in ``node.meta["graphpress.pass"]`` and every
tensor it adds is registered on the root module under a deterministic name derived from its
origin: ``<origin>.<pass-tag>.<role>`` with dots turned into underscores for the attribute
(FX attribute names cannot hold dots without submodules), e.g.
``encoder_0_fc1_weight_lowrank_a``.
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["PROVENANCE", "mark", "add_tensor", "get_tensor", "replace_node", "node_value"]

PROVENANCE = "graphpress.pass"


def mark(node: fx.Node, pass_name: str) -> fx.Node:
    """Record that ``pass_name`` created ``node``; return the node."""
    node.meta[PROVENANCE] = pass_name
    return node


def add_tensor(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` as a buffer of ``gm`` under a unique name derived from ``name``."""
    base = name.replace(".", "_")
    attr, index = base, 1
    while hasattr(gm, attr):
        attr, index = f"{base}_{index}", index + 1
    gm.register_buffer(attr, tensor)
    return attr


def get_tensor(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node refers to, or ``None`` if ``node`` is not a constant."""
    if node.op != "get_attr":
        return None
    value: object = gm
    for part in node.target.split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def node_value(node: fx.Node) -> object:
    """The example value recorded by ``torch.export`` (a FakeTensor), or ``None``."""
    return node.meta.get("val")


def replace_node(old: fx.Node, new: fx.Node) -> None:
    """Redirect every use of ``old`` to ``new`` and erase ``old``."""
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)

"""Insert PyTorch functional collectives into an FX graph.

``torch.ops._c10d_functional`` ops take the registered NAME of a process group and return a
tensor that ``wait_tensor`` completes. ``all_gather_into_tensor`` concatenates along dim 0 and
``reduce_scatter_tensor`` splits along dim 0 (rank ``r`` gets chunk ``r``), so a collective
along another axis moves that axis to the front first (``movedim`` + ``contiguous``) and back
after. New nodes record the pass and copy ``graphpress.stage`` of the node they follow, so a
shard can still be cut into pipeline stages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import fx

from graphpress.graph.fx import mark

__all__ = ["call", "all_reduce", "along", "rewire", "PASS"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_c10d = torch.ops._c10d_functional
_STAGE = "graphpress.stage"
PASS = "shard-tensor-parallel"


def call(graph: fx.Graph, target, *args, like: fx.Node) -> fx.Node:
    """A new ``call_function`` node marked with the pass and ``like``'s pipeline stage."""
    new = mark(graph.call_function(target, args), PASS)
    if _STAGE in like.meta:
        new.meta[_STAGE] = like.meta[_STAGE]
    return new


def rewire(node: fx.Node, new: fx.Node, keep: Callable[[fx.Node], bool]) -> None:
    """Point every user of ``node`` for which ``keep`` is false at ``new``."""
    node.replace_all_uses_with(new, delete_user_cb=lambda user: not keep(user))


def all_reduce(graph: fx.Graph, node: fx.Node, group: str) -> None:
    """Sum ``node``'s output over the group, for all its users."""
    with graph.inserting_after(node):
        reduced = call(graph, _c10d.all_reduce.default, node, "sum", group, like=node)
    with graph.inserting_after(reduced):
        done = call(graph, _c10d.wait_tensor.default, reduced, like=node)
    rewire(node, done, lambda user: user is reduced)


def along(graph: fx.Graph, node: fx.Node, kind: str, dim: int, world: int, group: str,
          keep: Callable[[fx.Node], bool] = lambda user: False) -> fx.Node:
    """``all_gather`` or ``reduce_scatter`` (sum) of ``node`` along ``dim``; users for which
    ``keep`` is true keep reading ``node``. Returns the result node."""
    with graph.inserting_after(node):
        front = call(graph, _aten.movedim.int, node, dim, 0, like=node)
    with graph.inserting_after(front):
        packed = call(graph, _aten.contiguous.default, front, like=node)
    with graph.inserting_after(packed):
        if kind == "all_gather":
            done = call(graph, _c10d.all_gather_into_tensor.default, packed, world, group,
                        like=node)
        else:
            done = call(graph, _c10d.reduce_scatter_tensor.default, packed, "sum", world, group,
                        like=node)
    with graph.inserting_after(done):
        waited = call(graph, _c10d.wait_tensor.default, done, like=node)
    with graph.inserting_after(waited):
        back = call(graph, _aten.movedim.int, waited, 0, dim, like=node)
    rewire(node, back, lambda user: user is front or keep(user))
    return back

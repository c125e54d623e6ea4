"""Tensor-parallel shards as the runtime consumes them: :class:`Shard` and :class:`Collective`.

``shard-tensor-parallel`` annotates a graph; ``graphpress.passes.partition.shard`` materialises
rank ``r``'s graph from it. A shard is one rank's graph plus the collectives that glue the
ranks together:

* **FX**: the collectives are inside the graph (``torch.ops._c10d_functional.all_reduce`` then
  ``wait_tensor`` on the process group named when the shard was made), so ``segments`` holds
  one stage (the whole module) and ``collectives`` is empty. The shard is an ordinary
  ``nn.Module`` to run under ``torch.distributed``.
* **ONNX**: ONNX Runtime has no collective ops, so the rank's model is cut into segments at the
  collective points. ``collectives[k]`` runs between ``segments[k]`` and ``segments[k + 1]``:
  every value it names is an output of segment ``k`` (and an input of segment ``k + 1``), and
  the runtime replaces it by the collective's result before feeding segment ``k + 1``
  (``all_reduce``: the sum over the ranks of the group; ``all_gather``: the ranks' pieces
  concatenated along ``dim`` in rank order).

The annotation keys below are shared by the passes that write them and the runtime that reads
them (FX ``node.meta`` / ONNX ``metadata_props``; graph-level plans are JSON strings in FX
``gm.meta`` / ONNX ``model.metadata_props``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Collective",
    "Shard",
    "TP_KEY",
    "COLLECTIVE_KEY",
    "COLLECTIVE_DIM_KEY",
    "SEGMENT_KEY",
    "PLAN_KEY",
    "SP_PLAN_KEY",
    "SHARD_KEY",
    "COLLECTIVE_KINDS",
]

logger = logging.getLogger(__name__)

#: Node annotation: ``{"role": "column"|"row"|"replicated"|"vocab_row"|"vocab_column",
#: "group": id}`` (FX: the dict in ``node.meta``; ONNX: its JSON in ``metadata_props``).
TP_KEY = "graphpress.tp"
#: Node annotation: the collective the node's output goes through (``"all_reduce"``,
#: ``"reduce_scatter"``, ``"all_gather"``, ``"scatter"``: a local split, no communication).
COLLECTIVE_KEY = "graphpress.collective"
#: Node annotation: the dimension of a ``reduce_scatter``/``all_gather``/``scatter``.
COLLECTIVE_DIM_KEY = "graphpress.collective_dim"
#: Node annotation of a materialised shard: how many collective points lie upstream.
SEGMENT_KEY = "graphpress.segment"
#: Graph-level JSON plan written by ``shard-tensor-parallel``.
PLAN_KEY = "graphpress.tensor_parallel"
#: Graph-level JSON plan written by ``shard-sequence-parallel``.
SP_PLAN_KEY = "graphpress.sequence_parallel"
#: Graph-level JSON on a materialised shard: ``{"rank", "world_size", "group"}``.
SHARD_KEY = "graphpress.shard"

COLLECTIVE_KINDS = ("all_reduce", "all_gather")


@dataclass(frozen=True)
class Collective:
    """One collective between two segments: ``kind`` over the values named ``values``
    (``all_reduce``: sum; ``all_gather``: concatenate along ``dim`` in rank order)."""

    kind: str
    values: tuple[str, ...]
    dim: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in COLLECTIVE_KINDS:
            raise ValueError(f"Collective kind {self.kind!r} is not one of {COLLECTIVE_KINDS}")
        if self.kind == "all_gather" and self.dim is None:
            raise ValueError("an all_gather Collective needs the dim it concatenates along")


@dataclass(frozen=True)
class Shard:
    """Rank ``rank``'s part of a tensor-parallel graph.

    ``graph``: the whole sharded graph (FX ``GraphModule`` with functional collectives inside,
    or an ``onnx_ir.Model`` whose nodes carry ``graphpress.segment``); ``segments``: stages
    (``graphpress.export.stages.Stage``) cut at the collective points, in order (FX: one,
    the module); ``collectives[k]`` runs between ``segments[k]`` and ``segments[k + 1]``.
    """

    rank: int
    world_size: int
    graph: Any
    segments: tuple[Any, ...]
    collectives: tuple[Collective, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.segments and len(self.collectives) != len(self.segments) - 1:
            raise ValueError(f"{len(self.segments)} segments need {len(self.segments) - 1} "
                             f"collectives between them, got {len(self.collectives)}")

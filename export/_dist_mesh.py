"""PP×TP: a 2-D device mesh ("pp", "tp"), its process groups, and ONNX Runtime PP×TP runs.

Global rank ``r`` sits at mesh coordinate ``(pp_rank, tp_rank) = divmod(r, tp)``. Its
tensor-parallel group holds the ``tp`` ranks of its pipeline stage (their collectives run
inside the stage); its pipeline group holds the ``pp`` ranks with its ``tp_rank``, one per
stage, so stage ``p``'s tensor-parallel rank ``t`` sends to stage ``p + 1``'s rank ``t``.

**FX**: shard the graph for ``tp_rank`` on the tp group's name, then ``split_stages`` the shard
and run the stages with ``run_pipeline(..., group=groups.pp_group)``; the collectives inside
each stage run on the tp group (see :func:`run_pp_tp`).

**ONNX**: the rank's shard is cut into segments at its collective points; the pipeline cuts
fall on segment boundaries (:func:`segment_stages`: each segment goes to the stage most of its
nodes were annotated with by ``partition-pipeline``, else segments are balanced by node
count), so a stage runs its segments with the tp collectives between them — including the one
after its last segment — and then sends the values to the next stage (:func:`run_pp_tp_ort`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._dist_common import resolve_group
from ._dist_launch import DistributedError
from ._dist_ort import pipeline_loop
from ._dist_pipeline import run_pipeline
from ._dist_tp import run_segments, shard_sessions
from .ort import Session
from .shards import SHARD_KEY

__all__ = ["MeshGroups", "pp_tp_groups", "segment_stages", "run_pp_tp", "run_pp_tp_ort"]

logger = logging.getLogger(__name__)

STAGE_KEY = "graphpress.stage"


@dataclass(frozen=True)
class MeshGroups:
    """This rank's place in a ``(pp, tp)`` mesh and the groups along each dimension."""

    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    pp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    pp_rank: int
    tp_rank: int
    pp: int
    tp: int

    @property
    def tp_group_name(self) -> str:
        """The name FX functional collectives use to address the tensor-parallel group."""
        return self.tp_group.group_name


def pp_tp_groups(pp: int, tp: int, device_type: str | None = None) -> MeshGroups:
    """Build the ``("pp", "tp")`` mesh over the world (size ``pp * tp``); call on every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    resolve_group(None)
    world = dist.get_world_size()
    if pp * tp != world:
        raise DistributedError(f"a {pp}×{tp} mesh needs {pp * tp} ranks, the world has "
                               f"{world}; launch pp*tp processes")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() and "nccl" in str(
            dist.get_backend()) else "cpu"
    mesh = init_device_mesh(device_type, (pp, tp), mesh_dim_names=("pp", "tp"))
    pp_rank, tp_rank = divmod(dist.get_rank(), tp)
    return MeshGroups(mesh, mesh.get_group("pp"), mesh.get_group("tp"), pp_rank, tp_rank, pp, tp)


def segment_stages(shard: Any, pp: int) -> list[list[int]]:
    """Split ``shard``'s segment indices into ``pp`` contiguous, non-empty runs, one per stage.

    The stage of each segment is the one ``shard()`` recorded (``segment_stages`` in the
    shard's ``graphpress.shard`` metadata, from ``partition-pipeline``'s annotations), else the
    stage most of its nodes carry; without annotations segments are balanced by node count.
    """
    segments = shard.segments
    if len(segments) < pp:
        raise DistributedError(f"{len(segments)} tensor-parallel segments cannot fill {pp} "
                               "pipeline stages; use fewer stages (--pp)")
    votes = _recorded_stages(shard) or [_majority_stage(segment.graph) for segment in segments]
    if None not in votes:
        stages, current = [], 0
        for vote in votes:
            current = max(current, vote)
            stages.append(current)
        runs = [[k for k, s in enumerate(stages) if s == p] for p in range(pp)]
        if all(runs) and max(stages) == pp - 1:
            return runs
        logger.warning("the stage annotations do not give %d non-empty runs of segments; "
                       "balancing segments by node count instead", pp)
    sizes = np.cumsum([max(1, sum(1 for _ in segment.graph.graph)) for segment in segments])
    bounds = [0]
    for p in range(1, pp):  # cut after the segment where the node count reaches p/pp
        cut = int(np.searchsorted(sizes, sizes[-1] * p / pp)) + 1
        bounds.append(min(max(cut, bounds[-1] + 1), len(segments) - (pp - p)))
    bounds.append(len(segments))
    return [list(range(bounds[p], bounds[p + 1])) for p in range(pp)]


def run_pp_tp(stages: Sequence[Any], inputs: Mapping[str, Any] | Sequence[Any] | None,
              groups: MeshGroups, **kw: Any) -> tuple[torch.Tensor, ...] | None:
    """FX PP×TP: ``stages`` = ``split_stages`` of this rank's FX shard (made on
    ``groups.tp_group_name``); runs them as a pipeline over the pp group (see run_pipeline)."""
    return run_pipeline(stages, inputs, group=groups.pp_group, **kw)


def run_pp_tp_ort(shard: Any, inputs: Mapping[str, Any] | Sequence[Any] | None,
                  groups: MeshGroups, *, microbatches: int = 1,
                  providers: str | Sequence[str] = "auto", device_id: int | None = None,
                  intra_op_threads: int | None = None,
                  sessions: Sequence[Session] | None = None) -> tuple[np.ndarray, ...] | None:
    """ONNX PP×TP: run this rank's segments of its ONNX ``shard`` as pipeline stage
    ``groups.pp_rank``; returns the outputs (numpy) on the last stage's ranks, else ``None``."""
    runs = segment_stages(shard, groups.pp)
    mine = runs[groups.pp_rank]
    sessions = sessions or shard_sessions(shard, providers, device_id=device_id,
                                          intra_op_threads=intra_op_threads, indices=mine)
    first, last = shard.segments[mine[0]], shard.segments[mine[-1]]

    def program(values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        table = dict(zip((i.name for i in first.inputs), values))
        table = run_segments(shard.segments, shard.collectives, sessions, table,
                             groups.tp_group, mine)
        return [table[o.name] for o in last.outputs]

    return pipeline_loop(program, shard.segments[0].inputs, len(first.inputs), inputs,
                         microbatches=microbatches, group=groups.pp_group)


def _recorded_stages(shard: Any) -> list[int] | None:
    props = getattr(shard.graph, "metadata_props", None) or {}
    try:
        stages = json.loads(props.get(SHARD_KEY, "{}")).get("segment_stages")
    except (TypeError, ValueError):
        return None
    if isinstance(stages, list) and len(stages) == len(shard.segments):
        return [int(s) for s in stages]
    return None


def _majority_stage(model: Any) -> int | None:
    """The stage most nodes of an ONNX segment carry (``None`` when none is annotated)."""
    graph = getattr(model, "graph", None)
    if graph is None or not hasattr(graph, "__iter__"):
        return None
    counts = Counter(int(node.metadata_props[STAGE_KEY]) for node in graph
                     if STAGE_KEY in node.metadata_props)
    return counts.most_common(1)[0][0] if counts else None

"""``shard(graph, rank)``: materialise one rank of a tensor-parallel graph.

The graph must carry the plan of ``shard-tensor-parallel``; the input is never modified (the
rank's graph is a structural copy: sliced weights are new tensors, every other weight is
shared with the input). FX shards hold their collectives as ``torch.distributed`` functional
ops on a named process group (:mod:`._tp_shard_fx`); ONNX shards are cut into segments at the
collective points for ONNX Runtime, with the collectives between them listed for the runtime
(:mod:`._tp_shard_onnx`). See :class:`graphpress.export.shards.Shard`.

Group names: ``group_name=None`` is the default (WORLD) group, whose name is read from
``torch.distributed`` at call time (it must be initialised). For a tensor-parallel subgroup,
e.g. the ``"tp"`` dimension of a 2×2 pipeline × tensor ``DeviceMesh``, pass the group:
``mesh.get_group("tp")`` (a ``ProcessGroup``), a 1-D mesh, or the group's ``group_name``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from graphpress.export.shards import PLAN_KEY, SEGMENT_KEY, SHARD_KEY, SP_PLAN_KEY, Shard
from graphpress.export.stages import split_stages
from graphpress.graph.errors import PreconditionError
from graphpress.graph.kind import clone, kind

from ._tp_annotate import drop_plan, read_plan, require_plan
from ._tp_shard_fx import shard_fx
from ._tp_shard_onnx import shard_onnx

__all__ = ["shard", "resolve_group_name"]

logger = logging.getLogger(__name__)


def shard(graph, rank: int, *, group_name: Any = None) -> Shard:
    """Rank ``rank``'s :class:`Shard` of a graph annotated by ``shard-tensor-parallel``."""
    plan = require_plan(graph, "shard()")
    world = plan["world_size"]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise PreconditionError(f"shard(): rank={rank!r} must be an integer in [0, {world}) "
                                f"(the plan is for world_size={world})")
    copy = clone(graph)
    if kind(graph) == "fx":
        group = resolve_group_name(group_name)
        sequence = read_plan(graph, SP_PLAN_KEY)
        result, collectives = shard_fx(copy, plan, rank, group, sequence), []
        result.meta[SHARD_KEY] = json.dumps({"rank": rank, "world_size": world, "group": group})
    else:
        collectives, stages = shard_onnx(copy, plan, rank)
        result = copy
        result.metadata_props[SHARD_KEY] = json.dumps(
            {"rank": rank, "world_size": world, "segment_stages": stages})
    for key in (PLAN_KEY, SP_PLAN_KEY):  # a shard is not sharded again by these plans
        drop_plan(result, key)
    segments = _split(result)
    return Shard(rank, world, result, segments, tuple(collectives))


def resolve_group_name(group: Any) -> str:
    """The registered name of a process group (``None``: the default group)."""
    if isinstance(group, str):
        return group
    if group is None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise PreconditionError(
                "shard() of an FX graph inserts torch.distributed collectives on a named "
                "process group: initialise the default group first (dist.init_process_group "
                "or graphpress.export.distributed.launch) or pass group_name= (a ProcessGroup "
                "such as mesh.get_group('tp'), or its .group_name)")
        return dist.group.WORLD.group_name
    if hasattr(group, "get_group") and not hasattr(group, "group_name"):
        group = group.get_group()  # a 1-D DeviceMesh
    name = getattr(group, "group_name", None)
    if not isinstance(name, str):
        raise PreconditionError(f"shard(): group_name={group!r} is neither a group name, a "
                                "ProcessGroup nor a 1-D DeviceMesh")
    return name


def _split(graph) -> tuple:
    return tuple(split_stages(graph, annotation=SEGMENT_KEY))

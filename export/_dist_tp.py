"""Tensor-parallel shards on torch.distributed: FX modules, ONNX Runtime segments, DTensor plans.

A :class:`~graphpress.export.shards.Shard` is one rank's part of a tensor-parallel graph.

* **FX**: the shard module already calls the functional collectives
  (``_c10d_functional.all_reduce`` + ``wait_tensor``) on the process group it was made for,
  so :func:`run_shard` calls it under ``torch.no_grad``.
* **ONNX**: ONNX Runtime has no collective ops, so the shard is cut into segments at the
  collective points. :func:`run_shard` runs segment ``k`` with its own session, applies
  ``shard.collectives[k]`` with torch.distributed over ``group`` (``all_reduce``: in-place sum;
  ``all_gather``: the ranks' pieces concatenated along ``dim`` in rank order), and feeds
  segment ``k + 1`` by value name. Values a later segment needs are threaded through the
  segments by ``split_stages``, so one name → tensor table suffices.

:func:`apply_torch_plan` is the DTensor route for an eager ``nn.Module``: it turns a plan
(module name → a style name of ``shard-tensor-parallel``'s ``tensor_parallel_plan`` or a
``ParallelStyle``, e.g. from its ``to_torch_plan``) into ``parallelize_module`` on a 1-D
device mesh. Names map to the plain tensor-parallel layouts (``vocab_rowwise``: an embedding,
``RowwiseParallel(input_layouts=Replicate())``; ``vocab_colwise``: an LM head,
``ColwiseParallel(output_layouts=Replicate())``); pass ``ParallelStyle`` objects for the
sequence-parallel layouts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import fx

from ._dist_common import group_rank, group_size, ordered_inputs, resolve_group
from ._dist_launch import DistributedError
from ._dist_ort import rank_session, run_bound, transport_device
from .ort import Session

__all__ = ["run_shard", "shard_sessions", "run_segments", "apply_collective",
           "apply_torch_plan", "STYLES"]

logger = logging.getLogger(__name__)

#: Plan strings accepted by :func:`apply_torch_plan`.
STYLES = ("colwise", "rowwise", "vocab_rowwise", "vocab_colwise", "sequence")


def run_shard(shard: Any, inputs: Mapping[str, Any] | Sequence[Any], *,
              group: dist.ProcessGroup | None = None, providers: str | Sequence[str] = "auto",
              device_id: int | None = None, intra_op_threads: int | None = None,
              sessions: Sequence[Session] | None = None) -> tuple[Any, ...]:
    """Run this rank's ``shard`` on ``inputs``; every rank of ``group`` calls it together.

    FX shards return torch tensors (the module's outputs, flattened), ONNX shards numpy
    arrays; both are the full, unsharded outputs, on every rank. ``sessions`` (from :func:`shard_sessions`) reuses ORT sessions across calls.
    """
    group = resolve_group(group)
    if (shard.rank, shard.world_size) != (group_rank(group), group_size(group)):
        raise DistributedError(
            f"this rank is rank {group_rank(group)} of a group of {group_size(group)}, but the "
            f"shard was made for rank {shard.rank} of {shard.world_size}; shard the graph for "
            "this rank and pass the group the shard's collectives use")
    if isinstance(shard.graph, fx.GraphModule):
        first = shard.segments[0] if shard.segments else None
        values = (ordered_inputs(first.inputs, inputs, "the shard") if first is not None
                  else list(inputs.values() if isinstance(inputs, Mapping) else inputs))
        with torch.no_grad():
            out = shard.graph(*values)
        return tuple(torch.utils._pytree.tree_leaves(out))  # the flattened graph outputs
    sessions = sessions or shard_sessions(shard, providers, device_id=device_id,
                                          intra_op_threads=intra_op_threads)
    first = shard.segments[0]
    table = dict(zip((i.name for i in first.inputs),
                     ordered_inputs(first.inputs, inputs, "the shard")))
    table = run_segments(shard.segments, shard.collectives, sessions, table, group,
                         range(len(shard.segments)))
    return tuple(table[o.name].cpu().numpy() for o in shard.segments[-1].outputs)


def shard_sessions(shard: Any, providers: str | Sequence[str] = "auto", *,
                   device_id: int | None = None, intra_op_threads: int | None = None,
                   indices: Sequence[int] | None = None) -> list[Session]:
    """One ORT session per ONNX segment of ``shard`` (or per segment in ``indices``)."""
    chosen = range(len(shard.segments)) if indices is None else indices
    return [rank_session(shard.segments[k].graph, providers, device_id=device_id,
                         intra_op_threads=intra_op_threads) for k in chosen]


def run_segments(segments: Sequence[Any], collectives: Sequence[Any],
                 sessions: Sequence[Session], table: dict[str, torch.Tensor],
                 group: dist.ProcessGroup, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Run segments ``indices`` (consecutive, ``sessions`` aligned) and the collectives after
    each, updating and returning the name → tensor ``table``."""
    device = transport_device(group)
    for sess, k in zip(sessions, indices, strict=True):
        segment = segments[k]
        outputs = [o.name for o in segment.outputs]
        feed = {i.name: table[i.name] for i in segment.inputs}
        table.update(zip(outputs, run_bound(sess, feed, outputs)))
        if k < len(collectives):
            apply_collective(collectives[k], table, group, device)
    return table


def apply_collective(collective: Any, table: dict[str, torch.Tensor],
                     group: dist.ProcessGroup, device: torch.device) -> None:
    """Replace each value ``collective`` names in ``table`` by the collective's result."""
    for name in collective.values:
        if name not in table:
            raise DistributedError(f"collective {collective.kind} names {name!r}, which no "
                                   "segment produced; re-shard the graph")
        value = table[name].to(device).contiguous()
        if collective.kind == "all_reduce":
            value = value.clone()  # the buffer may be ORT's output memory shared via DLPack
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        elif collective.kind == "all_gather":
            parts = [torch.empty_like(value) for _ in range(group_size(group))]
            dist.all_gather(parts, value, group=group)
            value = torch.cat(parts, dim=collective.dim)
        else:
            raise DistributedError(f"collective kind {collective.kind!r} is not supported; "
                                   "expected all_reduce or all_gather")
        table[name] = value


def apply_torch_plan(module: torch.nn.Module, plan: Mapping[str, Any],
                     mesh: Any = None) -> torch.nn.Module:
    """``parallelize_module(module, mesh, styles)`` for ``plan`` (module name → style).

    ``mesh`` defaults to a 1-D CPU (or CUDA) mesh over the whole world. The module is sharded in
    place (its parameters become DTensors) and returned.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    resolve_group(None)
    if mesh is None:
        kind = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(kind, (dist.get_world_size(),))
    styles = {name: _style(style) for name, style in plan.items()}
    return parallelize_module(module, mesh, styles)


def _style(style: Any) -> Any:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        ParallelStyle,
        RowwiseParallel,
        SequenceParallel,
    )

    if isinstance(style, ParallelStyle):
        return style
    makers = {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "vocab_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
        "vocab_colwise": lambda: ColwiseParallel(output_layouts=Replicate()),
        "sequence": SequenceParallel,
    }
    if style not in makers:
        raise DistributedError(f"unknown tensor-parallel style {style!r}; use one of "
                               f"{list(makers)} or a torch ParallelStyle")
    return makers[style]()


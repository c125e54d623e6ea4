"""Pipeline-parallel FX stages on ``torch.distributed.pipelining`` (GPipe or 1F1B).

Rank ``r`` of the pipeline group holds stage ``r`` (or the stage ``stage_ranks`` maps to it)
and wraps its ``fx.GraphModule`` in a manual ``PipelineStage``; ``ScheduleGPipe`` or
``Schedule1F1B`` then splits the batch (dimension 0 of every graph input) into microbatches,
runs them forward only (no loss, under ``torch.no_grad``) and moves the boundary tensors with
point-to-point sends. The outputs come back, concatenated over the microbatches, on the last
stage's rank; every other rank gets ``None``.

A stage is told the exact shapes and dtypes of what it receives and sends (``input_args`` /
``output_args``), so it never infers them by running on uninitialised memory (which breaks
integer inputs such as token ids). They are found by running stages ``0..r`` on fake tensors
of one microbatch (``FakeTensorMode``: shapes only, no compute, weights untouched), whose
shapes the first stage's rank broadcasts from the real inputs. This also
checks up front that the stages run at the microbatch size: a graph captured with a static
batch only runs with ``microbatches=1`` unless it was captured at the microbatch size, or with
a dynamic batch dimension.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ._dist_common import (
    group_rank,
    group_size,
    ordered_inputs,
    resolve_group,
    split_microbatches,
)
from ._dist_launch import DistributedError

__all__ = ["run_pipeline", "validate_pipeline", "SCHEDULES"]

logger = logging.getLogger(__name__)

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def run_pipeline(
    stages: Sequence[Any],
    inputs: Mapping[str, Any] | Sequence[Any] | None = None,
    *,
    schedule: str = "gpipe",
    microbatches: int = 2,
    group: dist.ProcessGroup | None = None,
    stage_ranks: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, ...] | None:
    """Run FX ``stages`` (from ``split_stages``) as a pipeline over ``group``; call on every rank.

    ``inputs`` (the original graph's inputs, by name or in order) are needed on the first
    stage's rank; elsewhere they may be omitted. ``stage_ranks[i]`` is the group rank holding
    stage ``i`` (default: rank ``i``; one stage per rank). Returns the graph outputs (a tuple,
    whole batch) on the last stage's rank and ``None`` on the others. The stage modules must
    already live on ``device``; the inputs are moved there.
    """
    _check_schedule(schedule)
    group = resolve_group(group)
    count = len(stages)
    ranks = _stage_ranks(stage_ranks, count, group_size(group))
    index = ranks.index(group_rank(group))
    held = stages[index]
    _check_fx(held, index)
    first = None
    if index == 0:
        if inputs is None:
            raise DistributedError("the first stage's rank needs the graph inputs; pass inputs=")
        first = ordered_inputs(stages[0].inputs, inputs, "stage 0")
    sample = _broadcast_sample(first, microbatches, group, ranks[0])
    received, sent = _microbatch_examples(stages, index, sample, microbatches)
    device = torch.device(device)
    stage = PipelineStage(held.graph, index, count, device, input_args=received,
                          output_args=sent, group=group)
    stage.stage_index_to_group_rank = dict(enumerate(ranks))
    runner = SCHEDULES[schedule](stage, microbatches)
    logger.debug("rank %d runs stage %d/%d (%s, %d microbatches)", dist.get_rank(), index,
                 count, schedule, microbatches)
    with torch.no_grad():
        if index == 0:
            result = runner.step(*(t.to(device) for t in first))
        else:
            result = runner.step()
    if index != count - 1:
        return None
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def validate_pipeline(
    stages: Sequence[Any],
    inputs: Mapping[str, Any] | Sequence[Any],
    *,
    schedule: str = "gpipe",
    microbatches: int = 2,
    stage_ranks: Sequence[int] | None = None,
    world_size: int | None = None,
) -> None:
    """Check in this process what :func:`run_pipeline` would refuse on its ranks; no group needed.

    ``world_size`` is the pipeline group's size (default: one rank per stage). Raises the
    :class:`DistributedError` ``run_pipeline`` raises for an unknown schedule, a bad
    ``stage_ranks``, a non-FX stage, inputs that do not match stage 0 or do not split into
    ``microbatches`` equal chunks, or a stage that cannot run on one microbatch (checked on fake
    tensors: shapes only, no compute).
    """
    _check_schedule(schedule)
    count = len(stages)
    _stage_ranks(stage_ranks, count, count if world_size is None else world_size)
    for index, stage in enumerate(stages):
        _check_fx(stage, index)
    first = ordered_inputs(stages[0].inputs, inputs, "stage 0")
    sample = [torch.zeros(shape, dtype=dtype) for shape, dtype in _chunk_meta(first, microbatches)]
    _microbatch_examples(stages, count - 1, sample, microbatches)


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise DistributedError(f"unknown schedule {schedule!r}; use one of {sorted(SCHEDULES)}")


def _check_fx(stage: Any, index: int) -> None:
    if not isinstance(stage.graph, fx.GraphModule):
        raise DistributedError(
            f"stage {index} is a {type(stage.graph).__name__}, not an fx.GraphModule; ONNX "
            "stages run on ONNX Runtime with run_pipeline_ort")


def _chunk_meta(first: list[torch.Tensor],
                microbatches: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each input's first microbatch (raises if the batch does not split)."""
    return [(tuple(t.shape), t.dtype) for t in split_microbatches(first, microbatches)[0]]


def _stage_ranks(stage_ranks: Sequence[int] | None, count: int, size: int) -> list[int]:
    ranks = list(range(count)) if stage_ranks is None else [int(r) for r in stage_ranks]
    if len(ranks) != count or sorted(ranks) != list(range(size)):
        raise DistributedError(
            f"{count} stages need a pipeline group of exactly {count} ranks, each holding one "
            f"stage; the group has {size} ranks and stage_ranks is {stage_ranks}. Split into "
            f"{size} stages, or pass a group of {count} ranks")
    return ranks


def _broadcast_sample(first: list[torch.Tensor] | None, microbatches: int,
                      group: dist.ProcessGroup, first_rank: int) -> list[torch.Tensor]:
    """Zero tensors shaped like one microbatch of the inputs, on every rank of the group.

    The first stage's rank splits the real inputs and broadcasts the chunk shapes and dtypes,
    so the other ranks need no inputs (and no guess at which dimension is the batch).
    """
    meta: list[Any] = [None]
    if first is not None:
        meta = [_chunk_meta(first, microbatches)]
    dist.broadcast_object_list(meta, src=dist.get_global_rank(group, first_rank), group=group)
    return [torch.zeros(shape, dtype=dtype) for shape, dtype in meta[0]]


def _microbatch_examples(stages: Sequence[Any], index: int, sample: list[torch.Tensor],
                         microbatches: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Zero tensors shaped like what stage ``index`` receives and sends for one microbatch."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        args: tuple = tuple(mode.from_tensor(t) for t in sample)
        for k in range(index + 1):
            try:
                outs = stages[k].graph(*args)
            except Exception as exc:
                raise DistributedError(
                    f"stage {k} cannot run on a microbatch (1/{microbatches} of the batch): "
                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}. Capture "
                    "the model with a dynamic batch dimension (dynamic_shapes) or at the "
                    "microbatch size, or use microbatches=1") from exc
            outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
            if k == index:
                return _zeros_like(args), _zeros_like(outs)
            args = outs
    raise AssertionError("unreachable")


def _zeros_like(values: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    for value in values:
        if not isinstance(value, torch.Tensor):
            raise DistributedError(
                f"a stage boundary carries a {type(value).__name__}; only tensors may cross "
                "stages: re-split with split_stages, which threads tensors only")
    return tuple(torch.zeros(tuple(int(d) for d in v.shape), dtype=v.dtype) for v in values)

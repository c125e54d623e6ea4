"""Pipeline parallel on torch.distributed.pipelining: 2 gloo ranks, GPipe and 1F1B, FX stages
from partition-pipeline + split_stages, equal to the single-process FX graph."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from graphpress.export.distributed import DistributedError, launch, run_pipeline
from graphpress.export.stages import split_stages
from graphpress.passes.partition import PartitionPipeline

sys.path.insert(0, str(Path(__file__).parent))
from _distributed_models import TOLERANCE, capture_dynamic, leaves, mlp  # noqa: E402


def _staged(name: str, stages: int):
    """(gm, stages, inputs): a dynamic-batch capture partitioned by FLOPs, and its stages.

    The pass only annotates, so ``gm`` still computes the single-process reference.
    """
    _, inputs, gm, symbol = capture_dynamic(name)
    result = PartitionPipeline(stages=stages, dims=(f"{symbol}={inputs[0].shape[0]}",))(gm)
    assert result.modified
    return gm, split_stages(gm), inputs


def _pipeline_rank(rank: int, world: int, name: str, schedules: tuple[str, ...],
                   microbatches: int) -> dict:
    gm, stages, inputs = _staged(name, world)
    assert len(stages) == world
    with torch.no_grad():
        reference = leaves(gm(*inputs))
    errors = {}
    for schedule in schedules:
        given = inputs if rank == 0 else None  # only the first stage needs the inputs
        out = run_pipeline(stages, given, schedule=schedule, microbatches=microbatches)
        if rank != world - 1:
            assert out is None
            continue
        assert len(out) == len(reference)
        assert all(o.shape == r.shape for o, r in zip(out, reference))
        errors[schedule] = max((o - r).abs().max().item() for o, r in zip(out, reference))
    return {"errors": errors, "crossing": [len(s.inputs) for s in stages[1:]]}


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_gpipe_and_1f1b_equal_the_single_process_graph(name):
    results = launch(_pipeline_rank, 2, name, ("gpipe", "1f1b"), 2, timeout=90)
    errors = results[1]["errors"]
    assert results[0]["errors"] == {}  # rank 0 holds stage 0 and gets no outputs
    assert set(errors) == {"gpipe", "1f1b"}
    assert max(errors.values()) <= TOLERANCE, errors


def _bad_microbatch_rank(rank: int, world: int) -> None:
    gm, stages, inputs = _staged("mlp", world)
    run_pipeline(stages, inputs, microbatches=3)  # batch 4 does not split into 3


def test_a_batch_that_does_not_split_is_a_readable_error():
    with pytest.raises(DistributedError, match="cannot be split into 3 equal microbatches"):
        launch(_bad_microbatch_rank, 2, timeout=60)


def _swapped_rank(rank: int, world: int) -> list[float] | None:
    gm, stages, inputs = _staged("mlp", world)
    with torch.no_grad():
        reference = leaves(gm(*inputs))
    out = run_pipeline(stages, inputs if rank == 1 else None, stage_ranks=(1, 0))
    return None if out is None else [(o - r).abs().max().item() for o, r in zip(out, reference)]


def test_stage_ranks_put_stage_0_on_rank_1():
    results = launch(_swapped_rank, 2, timeout=60)
    assert results[1] is None  # rank 1 holds stage 0 now; the outputs land on rank 0
    assert results[0] is not None and max(results[0]) <= TOLERANCE


def _static_rank(rank: int, world: int) -> None:
    from graphpress.graph import capture

    model, inputs = mlp()
    gm = capture(model, inputs)  # batch 4 baked into the graph
    PartitionPipeline(stages=world)(gm)
    run_pipeline(split_stages(gm), inputs, microbatches=2)


def test_a_static_batch_graph_cannot_be_microbatched():
    with pytest.raises(DistributedError, match="cannot run on a microbatch .*dynamic batch"):
        launch(_static_rank, 2, timeout=60)

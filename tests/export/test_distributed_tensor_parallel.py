"""Tensor parallel on 2 gloo ranks: FX shards (functional collectives inside the module) and
parallelize_module with shard-tensor-parallel's plan, equal to the single-process model."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from graphpress.export.distributed import (
    DistributedError,
    apply_torch_plan,
    launch,
    run_shard,
)
from graphpress.graph import capture
from graphpress.passes.partition.shard import shard
from graphpress.passes.partition.tensor_parallel import (
    ShardTensorParallel,
    tensor_parallel_plan,
    to_torch_plan,
)

sys.path.insert(0, str(Path(__file__).parent))
from _distributed_models import MODELS, TOLERANCE, capture_dynamic, leaves  # noqa: E402


def _tensor_parallel_rank(rank: int, world: int, name: str) -> dict:
    model, inputs = MODELS[name]()
    gm = capture(model, inputs)
    with torch.no_grad():
        reference, eager = leaves(gm(*inputs)), leaves(model(*inputs))
    stats = ShardTensorParallel(world_size=world)(gm).stats
    part = shard(gm, rank)  # collectives on the default group
    out = run_shard(part, inputs)
    reduces = sum("all_reduce" in str(n.target) for n in part.graph.graph.nodes)
    local = sum(p.numel() for p in part.graph.parameters())
    # the same split through DTensor: parallelize_module on an eager copy
    plan = tensor_parallel_plan(gm, world_size=world)
    sharded = apply_torch_plan(copy.deepcopy(model), to_torch_plan(plan))
    with torch.no_grad():
        torch_out = [t.full_tensor() if hasattr(t, "full_tensor") else t
                     for t in leaves(sharded(*inputs))]
    return {
        "shard_error": max((o - r).abs().max().item() for o, r in zip(out, reference)),
        "torch_error": max((o - r).abs().max().item() for o, r in zip(torch_out, eager)),
        "outputs": len(out), "expected_outputs": len(reference),
        "all_reduces": reduces, "stats": stats, "plan": plan,
        "local_params": local, "params": sum(p.numel() for p in gm.parameters()),
    }


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_fx_shard_and_parallelize_module_equal_the_single_process_model(name):
    results = launch(_tensor_parallel_rank, 2, name, timeout=90)
    for result in results:
        assert result["outputs"] == result["expected_outputs"]
        assert result["shard_error"] <= TOLERANCE, result
        assert result["torch_error"] <= TOLERANCE, result
        assert result["local_params"] < result["params"]  # each rank holds a part of the weights
        assert result["all_reduces"] == result["stats"]["all_reduces"] > 0
    plan = results[0]["plan"]
    if name == "llama":  # attention split by heads (GQA: 4 query, 2 KV heads) and the FFN
        assert results[0]["stats"]["all_reduces_per_layer"] == 2
        assert plan["lm.model.layers.0.self_attn.q_proj"] == "colwise"
        assert plan["lm.model.layers.0.self_attn.k_proj"] == "colwise"
        assert plan["lm.model.layers.0.self_attn.o_proj"] == "rowwise"
        assert plan["lm.model.layers.1.mlp.down_proj"] == "rowwise"
    else:
        assert set(plan.values()) == {"colwise", "rowwise"}


def _wrong_rank(rank: int, world: int) -> None:
    model, inputs = MODELS["mlp"]()
    gm = capture(model, inputs)
    ShardTensorParallel(world_size=world)(gm)
    run_shard(shard(gm, world - 1 - rank), inputs)  # each rank runs the other rank's shard


def test_a_shard_for_another_rank_is_refused():
    with pytest.raises(DistributedError, match="the shard was made for rank"):
        launch(_wrong_rank, 2, timeout=60)


def _pp_tp_rank(rank: int, world: int, schedule: str) -> dict:
    from graphpress.export.distributed import pp_tp_groups, run_pp_tp
    from graphpress.export.stages import split_stages
    from graphpress.passes.partition import PartitionPipeline

    _, inputs, gm, symbol = capture_dynamic("mlp")
    with torch.no_grad():
        reference = leaves(gm(*inputs))
    groups = pp_tp_groups(2, 2)
    PartitionPipeline(stages=2, dims=(f"{symbol}={inputs[0].shape[0]}",))(gm)
    ShardTensorParallel(world_size=2)(gm)
    part = shard(gm, groups.tp_rank, group_name=groups.tp_group_name)
    stages = split_stages(part.graph)
    out = run_pp_tp(stages, inputs if groups.pp_rank == 0 else None, groups,
                    schedule=schedule, microbatches=2)
    return {"coords": (groups.pp_rank, groups.tp_rank),
            "error": None if out is None else max((o - r).abs().max().item()
                                                   for o, r in zip(out, reference))}


def test_pp2_tp2_on_four_ranks_fx():
    results = launch(_pp_tp_rank, 4, "1f1b", timeout=120)
    assert [r["coords"] for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert results[0]["error"] is None and results[1]["error"] is None  # first stage
    assert max(results[2]["error"], results[3]["error"]) <= TOLERANCE  # both tp ranks of stage 1

"""Tensor parallel on 2 gloo ranks: FX shards (functional collectives inside the module) and
parallelize_module with shard-tensor-parallel's plan, equal to the single-process model; and
PP×TP = 2×2 on 4 ranks.

The 2-rank side runs in the launch shared with the other distributed tests
(``_distributed_checks``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from graphpress.export.distributed import launch
from graphpress.passes.partition.shard import shard
from graphpress.passes.partition.tensor_parallel import ShardTensorParallel

sys.path.insert(0, str(Path(__file__).parent))
from _distributed_checks import two_rank_results  # noqa: E402
from _distributed_models import TOLERANCE, capture_dynamic, leaves  # noqa: E402


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """Per rank: name → the checks of ``_distributed_checks._fx_shard``."""
    return [result["tensor_parallel"] for result in two_rank_results()]


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_fx_shard_and_parallelize_module_equal_the_single_process_model(two_ranks, name):
    results = [ranks[name] for ranks in two_ranks]
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


def test_a_shard_for_another_rank_is_refused(two_ranks):
    for rank, ranks in enumerate(two_ranks):  # each rank ran the other rank's MLP shard
        text = ranks["mlp"]["wrong_shard"]
        assert text is not None and "the shard was made for rank" in text, text
        assert f"this rank is rank {rank} of a group of 2" in text
        assert f"made for rank {1 - rank} of 2" in text


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

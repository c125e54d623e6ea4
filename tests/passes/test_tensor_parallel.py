"""shard-tensor-parallel and shard() on FX graphs: Megatron pairs found on the graph,
materialised per rank and checked by simulating world_size ranks in one process (``_tp_sim``:
the collectives are computed over the ranks' values) against the unsharded graph. ONNX shards:
``test_tensor_parallel_onnx.py``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from graphpress.export.shards import PLAN_KEY, TP_KEY
from graphpress.graph import capture, clone, measure
from graphpress.graph.errors import PassSpecError, PreconditionError
from graphpress.passes.partition.shard import shard
from graphpress.passes.partition.tensor_parallel import (
    ShardTensorParallel,
    tensor_parallel_plan,
    to_torch_plan,
)
from graphpress.passes.registry import from_spec

_spec = importlib.util.spec_from_file_location("_tp_sim", Path(__file__).with_name("_tp_sim.py"))
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)  # the simulation helpers shared with test_sequence_parallel.py
bert, llama, flat_inputs, reference = sim.bert, sim.llama, sim.flat_inputs, sim.reference
run_fx_ranks = sim.run_fx_ranks


class MLP(nn.Module):
    """Two FFN blocks with a residual: groups of 64 and 48 neurons."""

    def __init__(self) -> None:
        super().__init__()
        self.up1, self.down1 = nn.Linear(16, 64), nn.Linear(64, 16)
        self.up2, self.down2 = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x):
        h = x + self.down1(torch.nn.functional.gelu(self.up1(x)))
        return self.down2(torch.relu(self.up2(h)))


def _annotated(graph, world: int = 2):
    graph = clone(graph)
    result = ShardTensorParallel(world_size=world)(graph)
    return graph, result


def _close(outs, ref, tol: float = 1e-5) -> None:
    for rank_out in outs:
        assert len(rank_out) == len(ref)
        for got, want in zip(rank_out, ref):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=tol, rtol=0)


@pytest.fixture(scope="module")
def bert_graphs():
    model, args, kwargs = bert()
    return capture(model, args, kwargs), args, kwargs


@pytest.fixture(scope="module")
def llama_graphs():
    model, args, kwargs = llama()
    return capture(model, args, kwargs), args, kwargs


def test_mlp_fx_shards_sum_to_the_unsharded_output(h):
    x = torch.randn(3, 5, 16)
    gm = capture(MLP().eval(), (x,))
    graph, result = _annotated(gm)
    assert result.modified and result.stats["groups_sharded"] == 2
    assert result.stats["all_reduces"] == 2 and result.stats["groups_replicated"] == 0
    roles = {n.name: n.meta[TP_KEY]["role"] for n in graph.graph.nodes if TP_KEY in n.meta}
    assert sorted(roles.values()) == ["column", "column", "row", "row"]
    snapshot = h.fx_snapshot(graph)
    shards = [shard(graph, r, group_name="sim") for r in range(2)]
    h.assert_fx_unchanged(graph, snapshot)  # shard() leaves the annotated graph alone
    outs, collectives = run_fx_ranks([s.graph for s in shards], [x])
    assert collectives == 2
    _close(outs, reference(gm, (x,), {}))
    # weights of the pairs are halved; the row biases live on rank 0 only
    sizes = [dict(s.graph.named_buffers()) | dict(s.graph.named_parameters()) for s in shards]
    assert sorted(t.shape[0] for k, t in sizes[0].items() if "up1" in k) == [32, 32]
    assert any("down1.bias" in k for k in sizes[0]) and not any("down1.bias" in k
                                                                  for k in sizes[1])


def test_non_divisible_group_stays_replicated_and_stays_exact():
    x = torch.randn(4, 16)
    gm = capture(MLP().eval(), (x,))
    graph, result = _annotated(gm, world=3)  # 64 % 3 != 0, 48 % 3 == 0
    plan = json.loads(graph.meta[PLAN_KEY])
    by_units = {g["units"]: g for g in plan["groups"]}
    assert not by_units[64]["sharded"] and "do not divide by world_size=3" in by_units[64]["reason"]
    assert by_units[48]["sharded"]
    assert result.stats["groups_replicated"] == 1 and result.stats["all_reduces"] == 1
    outs, collectives = run_fx_ranks([shard(graph, r, group_name="sim").graph for r in range(3)],
                                     [x])
    assert collectives == 1
    _close(outs, reference(gm, (x,), {}))


def test_bert_fx_two_all_reduces_per_layer_and_half_the_sharded_bytes(bert_graphs, h):
    gm, args, kwargs = bert_graphs
    graph, result = _annotated(gm)
    stats = result.stats
    assert stats["groups_sharded"] == 4 and stats["layers"] == 2
    assert stats["all_reduces_per_layer"] == 2
    plan = json.loads(graph.meta[PLAN_KEY])
    assert plan["all_reduces_per_layer"] == {"encoder.layer.0": 2, "encoder.layer.1": 2}
    assert tensor_parallel_plan(gm) == tensor_parallel_plan(graph)  # planned on a copy
    assert PLAN_KEY not in gm.meta
    assert stats["all_reduces"] == 5  # + the vocab-parallel word embedding
    shards = [shard(graph, r, group_name="sim") for r in range(2)]
    outs, collectives = run_fx_ranks([s.graph for s in shards], flat_inputs(args, kwargs))
    assert collectives == 5
    _close(outs, reference(gm, args, kwargs))
    assert measure(shards[0].graph).bytes == stats["bytes_per_rank"]
    assert stats["bytes_total"] == measure(gm).bytes
    sharded = stats["bytes_total"] - stats["bytes_per_rank"]  # = the half each rank drops
    assert sharded > 0.4 * stats["bytes_total"]


def test_bert_world_8_replicates_heads_but_shards_the_ffn(bert_graphs):
    gm, args, kwargs = bert_graphs
    graph, result = _annotated(gm, world=8)  # 4 heads, vocabulary 100: not divisible by 8
    plan = json.loads(graph.meta[PLAN_KEY])
    kinds = {(g["kind"], g["sharded"]) for g in plan["groups"]}
    assert kinds == {("heads", False), ("ffn", True)}
    assert not plan["vocab"][0]["sharded"]
    assert result.stats["all_reduces_per_layer"] == 1
    outs, _ = run_fx_ranks([shard(graph, r, group_name="sim").graph for r in range(8)],
                           flat_inputs(args, kwargs))
    _close(outs, reference(gm, args, kwargs))


def test_llama_gqa_fx_shards_kv_heads_with_their_query_heads(llama_graphs):
    gm, args, kwargs = llama_graphs
    graph, result = _annotated(gm)
    plan = json.loads(graph.meta[PLAN_KEY])
    heads = [g for g in plan["groups"] if g["kind"] == "heads"]
    assert [g["units"] for g in heads] == [2, 2] and all(g["sharded"] for g in heads)
    assert result.stats["all_reduces_per_layer"] == 2 and result.stats["all_gathers"] == 1
    shards = [shard(graph, r, group_name="sim") for r in range(2)]
    weights = dict(shards[1].graph.named_buffers())
    q = next(t for k, t in weights.items() if "layers_0_self_attn_q_proj" in k)
    k_ = next(t for k, t in weights.items() if "layers_0_self_attn_k_proj" in k)
    assert q.shape == (32, 64) and k_.shape == (16, 64)  # 2 query heads + their 1 kv head
    outs, collectives = run_fx_ranks([s.graph for s in shards], flat_inputs(args, kwargs))
    assert collectives == 6  # embedding + 2 per layer + the logits' all-gather
    _close(outs, reference(gm, args, kwargs))
    assert measure(shards[0].graph).bytes <= result.stats["bytes_per_rank"]


def test_pipeline_stages_of_a_shard(bert_graphs):
    """partition-pipeline then shard-tensor-parallel: each shard splits into the stages."""
    from graphpress.export.stages import split_stages

    gm, args, kwargs = bert_graphs
    graph = clone(gm)
    from_spec("partition-pipeline:stages=2")(graph)
    ShardTensorParallel(world_size=2)(graph)
    stages = [split_stages(shard(graph, r, group_name="sim").graph) for r in range(2)]
    assert len(stages[0]) == 2
    carried, count = [flat_inputs(args, kwargs)] * 2, 0
    for k in range(2):  # each rank feeds its own next stage
        carried, n = run_fx_ranks([s[k].graph for s in stages], carried, per_rank=True)
        count += n
    assert count == 5
    _close(carried, reference(gm, args, kwargs))


def test_fx_shard_runs_real_collectives_on_the_default_group(tmp_path):
    import torch.distributed as dist

    x = torch.randn(2, 16)
    gm = capture(MLP().eval(), (x,))
    graph, _ = _annotated(gm, world=1)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        one = shard(graph, 0)  # group_name=None: the default group's registered name
        assert json.loads(one.graph.meta["graphpress.shard"])["group"] == \
            dist.group.WORLD.group_name
        with torch.no_grad():
            out = one.graph(x)
    finally:
        dist.destroy_process_group()
    _close([[out]], reference(gm, (x,), {}))


def test_errors_say_what_to_do(bert_graphs):
    gm, _, _ = bert_graphs
    with pytest.raises(PassSpecError, match="world_size=0 must be a positive integer"):
        ShardTensorParallel(world_size=0)
    with pytest.raises(PassSpecError, match="world_size"):
        from_spec("shard-tensor-parallel:world_size=-2")
    with pytest.raises(PreconditionError, match="run optimize"):
        shard(gm, 0)
    graph, _ = _annotated(gm)
    with pytest.raises(PreconditionError, match=r"rank=2 must be an integer in \[0, 2\)"):
        shard(graph, 2, group_name="sim")
    with pytest.raises(PreconditionError, match="initialise the default group"):
        shard(graph, 0)  # FX needs a process group name
    with pytest.raises(PassSpecError, match="unknown style"):
        to_torch_plan({"encoder.layer.0.output.dense": "diagonal"})
    with pytest.raises(PreconditionError, match="already one rank's shard"):
        ShardTensorParallel()(shard(graph, 0, group_name="sim").graph)


def test_a_lone_linear_is_not_modified():
    x = torch.randn(2, 8)
    gm = capture(nn.Linear(8, 8).eval(), (x,))
    result = ShardTensorParallel()(clone(gm))
    assert not result.modified and result.stats["all_reduces"] == 0

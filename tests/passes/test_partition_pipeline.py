"""partition-pipeline: annotations, optimal balance, per-stage report, idempotence, errors.

Chaining the materialised stages is tested in ``tests/export/test_split_stages.py``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from graphpress.graph import (
    PassSpecError,
    PreconditionError,
    UnsupportedGraphError,
    capture,
    clone,
)
from graphpress.graph.costs import node_costs
from graphpress.graph.memory import estimate_memory
from graphpress.passes import optimize
from graphpress.passes.partition import PartitionPipeline
from graphpress.passes.partition._pipeline_costs import pipeline_costs
from graphpress.passes.registry import from_spec

NOT_COMPUTE = ("placeholder", "get_attr", "output")


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    widths = [16, 64, 32, 48, 8]
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def graphs():
    """The MLP as FX and ONNX (input ``[4, 16]``)."""
    from graphpress.export import to_onnx

    x = torch.randn(4, 16)
    gm = capture(mlp(), (x,))
    return {"fx": gm, "onnx": to_onnx(gm, (x,))}


def stage_marks(graph) -> list[int]:
    if isinstance(graph, torch.fx.GraphModule):
        return [n.meta["graphpress.stage"] for n in graph.graph.nodes if n.op not in NOT_COMPUTE]
    return [int(n.metadata_props["graphpress.stage"]) for n in graph.graph]


def plan_of(graph) -> dict:
    raw = graph.meta if isinstance(graph, torch.fx.GraphModule) else graph.metadata_props
    return json.loads(raw["graphpress.pipeline"])


def best_bottleneck(costs: np.ndarray, boundary: np.ndarray, stages: int) -> float:
    """Reference O(S·N²) DP: the smallest largest stage over all contiguous splits."""
    n, prefix = len(costs), np.concatenate([[0.0], np.cumsum(costs)])
    best = [prefix[e + 1] for e in range(n)]
    for _ in range(1, stages):
        best = [min((max(best[p], prefix[e + 1] - prefix[p + 1]) for p in range(e)
                     if math.isfinite(boundary[p])), default=math.inf) for e in range(n)]
    return best[n - 1]


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
@pytest.mark.parametrize("cost", ["flops", "memory", "mixed"])
def test_annotates_contiguous_optimal_stages(graphs, ir_kind, cost):
    graph = clone(graphs[ir_kind])
    result = PartitionPipeline(stages=3, cost=cost)(graph)
    assert result.modified and result.graph is graph
    marks = stage_marks(graph)
    assert marks == sorted(marks) and set(marks) == {0, 1, 2}
    plan = plan_of(graph)
    assert plan["stages"] == 3 and plan["cost"] == cost and len(plan["boundary_bytes"]) == 2
    stats, rows = result.stats, result.layers
    assert [r["layer"] for r in rows] == ["stage0", "stage1", "stage2"]
    assert stats["max_stage_cost"] == max(plan["stage_costs"]) == max(r["cost"] for r in rows)
    mean = sum(plan["stage_costs"]) / 3
    assert stats["imbalance"] == pytest.approx(stats["max_stage_cost"] / mean)
    assert stats["boundary_bytes_total"] == sum(r["boundary_bytes_out"] for r in rows) > 0
    table = node_costs(graph)
    assert sum(r["flops"] for r in rows) == table.flops
    assert sum(r["nodes"] for r in rows) == len(table.nodes)
    assert sum(r["weight_bytes"] for r in rows) == table.param_bytes  # no weight read twice
    assert all(r["activation_peak"] > 0 for r in rows)
    costs = pipeline_costs(table)
    per_node = {"flops": costs.flops, "memory": costs.memory}.get(cost)
    if per_node is None:
        per_node = 0.5 * costs.flops / costs.flops.sum() + 0.5 * costs.memory / costs.memory.sum()
    best = best_bottleneck(per_node, costs.boundary, 3)
    assert stats["max_stage_cost"] == pytest.approx(best, rel=1e-9)
    assert stats["lower_bound"] <= stats["max_stage_cost"]


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_rerunning_is_idempotent_and_the_computation_is_unchanged(graphs, ir_kind):
    graph = clone(graphs[ir_kind])
    x = torch.randn(4, 16)
    if ir_kind == "fx":
        code = graph.code
        want = graph(x)
    first = PartitionPipeline(stages=2)(graph)
    again = PartitionPipeline(stages=2)(graph)
    assert first.modified and not again.modified
    assert dict(first.stats) == dict(again.stats)
    assert PartitionPipeline(stages=3)(graph).modified  # a different plan rewrites the marks
    if ir_kind == "fx":
        assert graph.code == code and torch.equal(graph(x), want)


def test_runs_in_optimize_with_verification_and_leaves_the_input_alone(graphs):
    gm = graphs["fx"]
    result = optimize(gm, ["partition-pipeline:stages=2,cost=mixed"])
    assert result.modified and stage_marks(result.graph)[-1] == 1
    assert result.graph is not gm and all("graphpress.stage" not in n.meta for n in gm.graph.nodes)
    record = result.report.records[0]
    assert record.stats["stages"] == 2 and len(record.layers) == 2


def test_never_cuts_where_a_non_tensor_is_live():
    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            n = x.shape[0]
            h = self.a(x).reshape(n, 2, 4).sum(1)  # the SymInt n is live until here
            return self.c(torch.relu(self.b(torch.cat([h, h], 1))))

    x = torch.randn(4, 8)
    gm = capture(Model(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    symbol = str(next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[0])
    with pytest.raises(UnsupportedGraphError, match=symbol):  # symbolic batch: dims binds it
        PartitionPipeline(stages=2)(gm)
    result = from_spec(f"partition-pipeline:stages=3,dims={symbol}=4")(gm)
    costs = pipeline_costs(node_costs(gm, dims={symbol: 4}))
    size_users = [n for n in gm.graph.nodes if "sym_size" in str(n.target)]
    marks = {n.name: n.meta["graphpress.stage"] for n in gm.graph.nodes if n.op not in NOT_COMPUTE}
    for node in size_users:  # every reader of a SymInt is in its producer's stage
        assert {marks[u.name] for u in node.users} == {marks[node.name]}
    assert result.stats["stages"] == 3 and math.isinf(costs.boundary[0])
    with pytest.raises(PreconditionError, match=r"stages=\d+ or fewer"):
        PartitionPipeline(stages=len(costs.boundary) + 1, dims=(f"{symbol}=4",))(gm)


def test_bad_specs_say_what_to_do(graphs):
    with pytest.raises(PassSpecError, match="stages=0 must be ≥ 1"):
        from_spec("partition-pipeline:stages=0")
    with pytest.raises(PassSpecError, match="cost"):
        from_spec("partition-pipeline:cost=latency")
    with pytest.raises(PassSpecError, match="name=int"):
        from_spec("partition-pipeline:dims=batch")
    with pytest.raises(PassSpecError, match="slack"):
        PartitionPipeline(slack=-0.1)
    nodes = len(node_costs(graphs["fx"]).nodes)
    with pytest.raises(PreconditionError, match=rf"use stages={nodes} or fewer"):
        PartitionPipeline(stages=nodes + 1)(clone(graphs["fx"]))
    single = clone(graphs["onnx"])
    assert PartitionPipeline(stages=1)(single).stats["imbalance"] == 1.0
    assert set(stage_marks(single)) == {0}


def test_thirty_layer_decoder_balances_four_stages():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    gm = capture(model, (), {"input_ids": ids, "use_cache": False})
    for stages, target in ((2, 1.01), (4, 1.05), (8, 1.05)):
        stats = PartitionPipeline(stages=stages)(gm).stats
        assert stats["imbalance"] <= target, (stages, stats)
        assert stats["max_stage_cost"] == stats["optimum"] >= stats["lower_bound"]


def test_memory_cost_is_resident_weights_plus_kv_cache(llama_model):
    """cost=memory on a causal decoder (tied embedding and LM head): a stage costs the stored
    bytes of the weights it reads first plus the KV cache of its attention layers; the
    activations are reported per stage but not balanced, so a longer sequence adds exactly its
    extra cache."""
    from graphpress.export import to_onnx

    model, inputs = llama_model
    ids = inputs["input_ids"]
    longer = {**inputs, "input_ids": torch.cat([ids, ids], dim=1)}
    gm = capture(model, (), inputs)
    totals = {}
    for name, graph in (("fx", gm), ("onnx", to_onnx(gm, (), inputs)),
                        ("fx-long", capture(model, (), longer))):
        graph = clone(graph)
        result = PartitionPipeline(stages=2, cost="memory")(graph)
        estimate, table = estimate_memory(graph), node_costs(graph)
        rows, costs = result.layers, plan_of(graph)["stage_costs"]
        assert estimate.kv_cache == 2 * 2 * 2 * 16 * 4 * ids.shape[0] * graph_seq(graph)
        read = {c for n in table.nodes for c in n.constants}  # (a buffer no node reads: none)
        weights = sum(table.constant_bytes[c] for c in read)
        assert sum(costs) == weights + estimate.kv_cache  # the tied weight counted once
        assert sum(r["kv_cache_bytes"] for r in rows) == estimate.kv_cache
        first_read, seen = [], set()
        for row in rows:  # the weights a stage reads that no earlier stage read
            stage = int(row["layer"].removeprefix("stage"))
            mine = {c for n in table.nodes if marks_by_name(graph)[n.name] == stage
                    for c in n.constants} - seen
            seen |= mine
            first_read.append(sum(table.constant_bytes[c] for c in mine))
        assert costs == [w + r["kv_cache_bytes"] for w, r in zip(first_read, rows)]
        assert rows[-1]["weight_bytes"] > first_read[-1]  # the LM head re-reads the embedding
        assert all(r["activation_peak"] > 0 for r in rows)
        totals[name] = (weights, estimate.kv_cache, sum(costs))
    assert totals["fx-long"][0] == totals["fx"][0]  # same weights, twice the cache
    assert totals["fx-long"][2] - totals["fx"][2] == totals["fx"][1]


def graph_seq(graph) -> int:
    return estimate_memory(graph).seq


def marks_by_name(graph) -> dict[str, int]:
    """Stage mark of every cost-table node, by its table name."""
    if isinstance(graph, torch.fx.GraphModule):
        return {n.name: n.meta["graphpress.stage"] for n in graph.graph.nodes
                if n.op not in NOT_COMPUTE}
    nodes = [n for n in graph.graph if n.op_type != "Constant"]
    return {n.name: int(n.metadata_props["graphpress.stage"]) for n in nodes}

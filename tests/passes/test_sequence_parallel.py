"""shard-sequence-parallel: per-token regions between tensor-parallel collectives, their
reduce-scatter / all-gather annotations and the PyTorch plan with SequenceParallel norms.

The regions are checked numerically: an interpreter runs every region node separately on each
of the world_size token slices (what each rank computes under sequence parallelism) and
concatenates the slices; the graph's outputs must not change. FX shards materialise the
regions (reduce-scatter, local slices, all-gather), simulated over the ranks in one process."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from graphpress.export import to_onnx
from graphpress.export.shards import COLLECTIVE_DIM_KEY, COLLECTIVE_KEY, SP_PLAN_KEY
from graphpress.graph import capture, clone
from graphpress.graph.errors import PreconditionError
from graphpress.passes.partition.sequence_parallel import ShardSequenceParallel
from graphpress.passes.partition.shard import shard
from graphpress.passes.partition.tensor_parallel import (
    ShardTensorParallel,
    tensor_parallel_plan,
    to_torch_plan,
)

_spec = importlib.util.spec_from_file_location("_tp_sim", Path(__file__).with_name("_tp_sim.py"))
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)  # helpers shared with test_tensor_parallel.py


def _sequence_parallel(graph, world: int = 2):
    graph = clone(graph)
    ShardTensorParallel(world_size=world)(graph)
    return graph, ShardSequenceParallel()(graph)


def _sp_plan(graph) -> dict:
    raw = graph.meta[SP_PLAN_KEY] if isinstance(graph, fx.GraphModule) else (
        graph.metadata_props[SP_PLAN_KEY])
    return json.loads(raw)


class _TokenSlices(fx.Interpreter):
    """Runs the region nodes on each token slice separately, as the ranks would."""

    def __init__(self, gm, nodes: set[str], world: int, length: int) -> None:
        super().__init__(gm)
        self.nodes, self.world, self.length = nodes, world, length

    def run_node(self, node):
        if node.name not in self.nodes:
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        size = self.length // self.world

        def piece(x, r):
            tokens = isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-2] == self.length
            return x.narrow(x.dim() - 2, r * size, size) if tokens else x

        parts = []
        for r in range(self.world):
            local_args, local_kwargs = pytree.tree_map(lambda x, r=r: piece(x, r), (args, kwargs))
            parts.append(getattr(self, node.op)(node.target, local_args, local_kwargs))
        return torch.cat(parts, dim=-2) if isinstance(parts[0], torch.Tensor) else parts[0]


@pytest.fixture(scope="module")
def llama_graphs():
    model, args, kwargs = sim.llama()
    gm = capture(model, args, kwargs)
    return model, gm, to_onnx(gm, args, kwargs), args, kwargs


@pytest.fixture(scope="module")
def bert_graphs():
    model, args, kwargs = sim.bert()
    return model, capture(model, args, kwargs), args, kwargs


def test_llama_regions_run_token_sliced_and_give_the_same_outputs(llama_graphs):
    _, gm, _, args, kwargs = llama_graphs
    graph, result = _sequence_parallel(gm)
    assert result.modified
    assert result.stats["reduce_scatters"] == 5 and result.stats["all_gathers"] == 5
    plan = _sp_plan(graph)
    (region,) = plan["regions"]
    assert region["dim"] == 1 and not region["reason"] and region["scatters"] == []
    notes = {n.name: (n.meta.get(COLLECTIVE_KEY), n.meta.get(COLLECTIVE_DIM_KEY))
             for n in graph.graph.nodes if COLLECTIVE_KEY in n.meta}
    assert sum(v == ("reduce_scatter", 1) for v in notes.values()) == 5
    assert sum(v == ("all_gather", 1) for v in notes.values()) == 5
    assert notes["linear_14"] == ("all_gather", -1)  # the LM head's vocab all-gather stays
    with torch.no_grad():
        sliced = _TokenSlices(gm, set(region["nodes"]), 2, 12).run(*sim.flat_inputs(args, kwargs))
    np.testing.assert_allclose(pytree.tree_leaves(sliced)[0].numpy(),
                               sim.reference(gm, args, kwargs)[0].numpy(), atol=1e-5, rtol=0)


def test_llama_torch_plan_has_sequence_norms_and_applies(llama_graphs, tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    model, gm, _, args, kwargs = llama_graphs
    graph, _ = _sequence_parallel(gm)
    plan = tensor_parallel_plan(graph)
    assert sorted(m for m, s in plan.items() if s == "sequence") == [
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
        "model.norm"]
    styles = to_torch_plan(plan)
    assert isinstance(styles["model.norm"], SequenceParallel)
    q, o = styles["model.layers.0.self_attn.q_proj"], styles["model.layers.0.self_attn.o_proj"]
    assert isinstance(q, ColwiseParallel) and q.input_layouts == (Shard(1),)
    assert isinstance(o, RowwiseParallel) and o.output_layouts == (Shard(1),)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        parallel = parallelize_module(copy.deepcopy(model), init_device_mesh("cpu", (1,)), styles)
        with torch.no_grad():
            out = parallel(*args, **kwargs).logits
    finally:
        dist.destroy_process_group()
    np.testing.assert_allclose(out.numpy(), sim.reference(gm, args, kwargs)[0].numpy(),
                               atol=1e-5, rtol=0)


def test_llama_onnx_regions_match_fx(llama_graphs):
    _, _, model, _, _ = llama_graphs
    graph, result = _sequence_parallel(model)
    plan = _sp_plan(graph)
    assert plan["torch"] and plan["sequence_dim"] == 1
    assert result.stats["reduce_scatters"] == 5 and len(plan["norm_modules"]) == 5
    kinds = [n.metadata_props.get(COLLECTIVE_KEY) for n in graph.graph]
    assert kinds.count("reduce_scatter") == 5 and kinds.count("all_gather") == 6


def test_bert_position_embeddings_are_split_locally_and_torch_plan_stays_tp(bert_graphs):
    _, gm, args, kwargs = bert_graphs
    graph, result = _sequence_parallel(gm)
    plan = _sp_plan(graph)
    assert sorted(plan["scatters"]) == ["embedding_1", "embedding_2"]  # type + position
    assert not plan["torch"] and "local split" in plan["torch_reason"]
    assert "sequence" not in tensor_parallel_plan(graph).values()
    assert "encoder.layer.0.attention.output.LayerNorm" in plan["norm_modules"]
    (region,) = plan["regions"]
    with torch.no_grad():
        sliced = _TokenSlices(gm, set(region["nodes"]), 2, 8).run(*sim.flat_inputs(args, kwargs))
    for got, want in zip(pytree.tree_leaves(sliced), sim.reference(gm, args, kwargs)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0)
    shards = [shard(graph, r, group_name="sim") for r in range(2)]  # embeddings sliced locally
    outs, _ = sim.run_fx_ranks([s.graph for s in shards], sim.flat_inputs(args, kwargs))
    np.testing.assert_allclose(outs[1][0].numpy(), sim.reference(gm, args, kwargs)[0].numpy(),
                               atol=1e-5, rtol=0)


def test_region_ending_at_a_graph_output_keeps_its_all_reduce():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up1, self.down1 = nn.Linear(16, 32), nn.Linear(32, 16)
            self.norm = nn.LayerNorm(16)
            self.up2, self.down2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            h = self.norm(x + self.down1(torch.relu(self.up1(x))))
            return self.down2(torch.relu(self.up2(h)))

    x = torch.randn(2, 6, 16)
    gm = capture(Block().eval(), (x,))
    graph, result = _sequence_parallel(gm)
    plan = _sp_plan(graph)
    reasons = sorted(r["reason"] for r in plan["regions"])
    assert reasons == ["", "no per-token node between the collectives"]
    notes = {n.name: n.meta.get(COLLECTIVE_KEY) for n in graph.graph.nodes}
    assert notes["linear_1"] == "reduce_scatter" and notes["linear_3"] == "all_reduce"
    assert notes["layer_norm"] == "all_gather" and plan["scatters"] == ["x"]
    assert result.stats["regions_sequence_parallel"] == 1
    outs, collectives = sim.run_fx_ranks([shard(graph, r, group_name="sim").graph
                                          for r in range(2)], [x])
    assert collectives == 3  # reduce-scatter, all-gather, then the output's all-reduce
    for rank_out in outs:
        np.testing.assert_allclose(rank_out[0].numpy(), sim.reference(gm, (x,), {})[0].numpy(),
                                   atol=1e-5, rtol=0)


def test_needs_the_tensor_parallel_plan(bert_graphs):
    _, gm, _, _ = bert_graphs
    with pytest.raises(PreconditionError, match="shard-tensor-parallel"):
        ShardSequenceParallel()(clone(gm))


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_fx_shards_run_the_regions_on_token_slices(which, bert_graphs, llama_graphs):
    if which == "bert":
        _, gm, args, kwargs = bert_graphs
    else:
        _, gm, _, args, kwargs = llama_graphs
    graph, _ = _sequence_parallel(gm)
    shards = [shard(graph, r, group_name="sim") for r in range(2)]
    ops = Counter(str(n.target) for n in shards[0].graph.graph.nodes)
    assert ops["_c10d_functional.reduce_scatter_tensor.default"] == 5
    assert ops["_c10d_functional.all_reduce.default"] == 0
    length = args[0].shape[1]
    norm = next(n for n in shards[1].graph.graph.nodes  # a region node: half the tokens
                if n.name in ("layer_norm_1", "mul_10"))
    assert norm.meta["val"].shape[1] == length // 2
    outs, collectives = sim.run_fx_ranks([s.graph for s in shards], sim.flat_inputs(args, kwargs))
    assert collectives == (10 if which == "bert" else 11)  # + the logits' all-gather
    for rank_out in outs:
        for got, want in zip(rank_out, sim.reference(gm, args, kwargs)):
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0)

"""shard-tensor-parallel and shard() on ONNX exports: per-rank models cut into segments at the
collective points, run segment by segment in ONNX Runtime for every rank with the collectives
computed over the ranks in between (``_tp_sim``), against the unsharded model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from graphpress.export import to_onnx
from graphpress.export.shards import COLLECTIVE_KEY, SEGMENT_KEY, SHARD_KEY, TP_KEY, Collective
from graphpress.graph import capture, clone, measure
from graphpress.passes.partition.shard import shard
from graphpress.passes.partition.tensor_parallel import ShardTensorParallel, tensor_parallel_plan
from graphpress.passes.registry import from_spec

_spec = importlib.util.spec_from_file_location("_tp_sim", Path(__file__).with_name("_tp_sim.py"))
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)  # helpers shared with test_tensor_parallel.py


def _annotated(graph, world: int = 2):
    graph = clone(graph)
    return graph, ShardTensorParallel(world_size=world)(graph)


def _close(outs, ref) -> None:
    for rank_out in outs:
        for got, want in zip(rank_out, ref, strict=True):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)


def _graphs(make):
    model, args, kwargs = make()
    gm = capture(model, args, kwargs)
    return gm, to_onnx(gm, args, kwargs), args, kwargs


@pytest.fixture(scope="module")
def bert_graphs():
    return _graphs(sim.bert)


@pytest.fixture(scope="module")
def llama_graphs():
    return _graphs(sim.llama)


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_segments_with_collectives_between(which, bert_graphs, llama_graphs, h):
    gm, model, args, kwargs = bert_graphs if which == "bert" else llama_graphs
    graph, result = _annotated(model)
    assert result.stats["all_reduces_per_layer"] == 2
    snapshot = h.onnx_snapshot(graph)
    shards = [shard(graph, r) for r in range(2)]
    assert h.onnx_snapshot(graph) == snapshot  # the input is not modified
    kinds = [c.kind for c in shards[0].collectives]
    assert kinds.count("all_reduce") == 5  # 2 per layer + the vocab-parallel embedding
    assert kinds[-1] == ("all_gather" if which == "llama" else "all_reduce")
    assert len(shards[0].segments) == len(kinds) + 1
    segments = [int(n.metadata_props[SEGMENT_KEY]) for n in shards[0].graph.graph]
    assert segments == sorted(segments)  # contiguous, in graph order
    outs = sim.run_onnx_ranks(shards, sim.onnx_feeds(model, sim.flat_inputs(args, kwargs)))
    _close(outs, sim.reference(gm, args, kwargs))
    sizes = [measure(s.graph).bytes for s in shards]
    assert abs(sizes[0] - result.stats["bytes_per_rank"]) < 256  # + a few index constants
    assert sizes[0] < 0.55 * measure(model).bytes


def test_pipeline_stages_nest_segments(bert_graphs):
    """partition-pipeline, then tensor parallel: each stage runs a range of segments."""
    gm, model, args, kwargs = bert_graphs
    graph = clone(model)
    from_spec("partition-pipeline:stages=2")(graph)
    ShardTensorParallel(world_size=2)(graph)
    shards = [shard(graph, r) for r in range(2)]
    stages = json.loads(shards[0].graph.metadata_props[SHARD_KEY])["segment_stages"]
    assert stages == sorted(stages) and set(stages) == {0, 1}
    boundary = stages.index(1) - 1  # the pipeline cut: a boundary without collective
    assert shards[0].collectives[boundary].values == ()
    outs = sim.run_onnx_ranks(shards, sim.onnx_feeds(model, sim.flat_inputs(args, kwargs)))
    _close(outs, sim.reference(gm, args, kwargs))


def test_annotations_and_torch_plan_match_fx(bert_graphs):
    gm, model, _, _ = bert_graphs
    graph, _ = _annotated(model)
    notes = [(json.loads(n.metadata_props[TP_KEY])["role"], n.metadata_props.get(COLLECTIVE_KEY))
             for n in graph.graph if TP_KEY in n.metadata_props]
    assert notes.count(("row", "all_reduce")) == 4 and notes.count(("column", None)) == 8
    assert notes.count(("vocab_row", "all_reduce")) == 1
    fx_graph, _ = _annotated(gm)
    plan = tensor_parallel_plan(graph)  # module paths from the exporter's namespaces
    assert plan == tensor_parallel_plan(fx_graph)
    assert plan["encoder.layer.1.intermediate.dense"] == "colwise"
    assert plan["encoder.layer.1.output.dense"] == "rowwise"
    assert plan["embeddings.word_embeddings"] == "vocab_rowwise"


def test_collective_checks_its_fields():
    assert Collective("all_gather", ("x",), -1).dim == -1
    with pytest.raises(ValueError, match="needs the dim"):
        Collective("all_gather", ("x",))
    with pytest.raises(ValueError, match="is not one of"):
        Collective("broadcast", ("x",))

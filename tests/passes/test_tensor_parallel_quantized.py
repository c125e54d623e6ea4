"""shard-tensor-parallel after quantization: quantized linears pair like float ones.

Each model (BERT, LLaMA with grouped-query attention; random weights, 2 layers) is quantized
(insert-qdq calibrated, quantize-dynamic, 8-bit blocks, 4-bit blocks of 32/64), annotated for
2 ranks and materialised per rank; the ranks are simulated in one process (``_tp_sim``) and
their outputs must equal the unsharded QUANTIZED graph's (ONNX Runtime for ONNX, the FX graph
itself for FX) within 1e-5, with each sliced tensor holding half its bytes per rank."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from graphpress.export import to_onnx
from graphpress.export.shards import PLAN_KEY
from graphpress.graph import capture, clone, measure
from graphpress.graph.analysis import fx_tensor_attrs, onnx_constants
from graphpress.graph.channels import channel_groups
from graphpress.graph.errors import UnsupportedGraphError
from graphpress.passes.partition._tp_annotate import read_plan
from graphpress.passes.partition.sequence_parallel import ShardSequenceParallel
from graphpress.passes.partition.shard import shard
from graphpress.passes.partition.tensor_parallel import ShardTensorParallel
from graphpress.passes.prune._shrink_nbits import NBitsArrays, slice_nbits
from graphpress.passes.quantize._blockwise import quantize_rtn
from graphpress.passes.quantize._packing import pack_zero_points
from graphpress.passes.registry import from_spec

_spec = importlib.util.spec_from_file_location("_tp_sim", Path(__file__).with_name("_tp_sim.py"))
sim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sim)  # helpers shared with test_tensor_parallel.py

MODES = {"qdq": "insert-qdq", "dynamic": "quantize-dynamic",
         "dynamic-block32": "quantize-dynamic:block_size=32",
         "nbits4-block32": "quantize-weights:bits=4,block_size=32",
         "nbits4-block64": "quantize-weights:bits=4,block_size=64"}


@pytest.fixture(scope="module")
def graphs():
    """Per model: the FX graph, its ONNX export and the positional inputs."""
    found = {}
    for name, make in (("bert", sim.bert), ("llama", sim.llama)):
        model, args = sim.positional(make)
        gm = capture(model, args)
        found[name] = (gm, to_onnx(gm, args), args)
    return found


def _quantized(graphs, which: str, mode: str, ir: str):
    gm, model, args = graphs[which]
    graph = clone(gm if ir == "fx" else model)
    spec = MODES[mode]
    if mode == "qdq":  # calibrated on the very inputs
        batches = [args] if ir == "fx" else [sim.onnx_feeds(model, list(args))]
        from_spec(spec)(graph, calibration=batches)
    else:
        from_spec(spec)(graph)
    return graph, args


def _sharded(graph, world: int = 2):
    annotated = clone(graph)
    result = ShardTensorParallel(world_size=world)(annotated)
    return annotated, result


def _close(outs, ref) -> None:
    for rank_out in outs:
        assert len(rank_out) == len(ref)
        for got, want in zip(rank_out, ref):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def _half_of_sliced_onnx(model, shards) -> None:
    """Every new ``.tp`` tensor of a rank is a slice of an original one; together they hold
    half of the originals' bytes (zero points packed two blocks per byte round up)."""
    original = onnx_constants(model)
    for one in shards:
        made = {v.name: v.meta.get("prune.origin") for v in one.graph.graph.initializers.values()
                if v.meta.get("prune.origin")}
        assert made and all(".tp" in name and ".prune" not in name for name in made)
        constants = onnx_constants(one.graph)
        before = sum(original[o].nbytes for o in set(made.values()))
        after = sum(constants[name].nbytes for name in made)
        assert after == pytest.approx(before / 2, rel=0.03)


def _half_of_sliced_fx(gm, shards) -> None:
    original = {name.replace(".", "_"): t for name, t in fx_tensor_attrs(gm).items()}
    for one in shards:
        made = {name: t for name, t in fx_tensor_attrs(one.graph).items() if name.endswith("_tp")}
        assert made and not any(name.endswith("_prune") for name in fx_tensor_attrs(one.graph))
        before = sum(original[n[:-3]].numel() * original[n[:-3]].element_size() for n in made)
        after = sum(t.numel() * t.element_size() for t in made.values())
        assert after == pytest.approx(before / 2, rel=0.03)


@pytest.mark.parametrize("mode", ["qdq", "dynamic", "dynamic-block32", "nbits4-block32"])
@pytest.mark.parametrize("which", ["bert", "llama"])
def test_onnx_quantized_shards_equal_the_quantized_model(graphs, which, mode, h):
    model, args = _quantized(graphs, which, mode, "onnx")
    annotated, result = _sharded(model)
    assert result.stats["groups_sharded"] == 4 and result.stats["groups_replicated"] == 0
    assert result.stats["all_reduces_per_layer"] == 2  # attention + FFN, as in float
    shards = [shard(annotated, r) for r in range(2)]
    feeds = sim.onnx_feeds(model, list(args))
    _close(sim.run_onnx_ranks(shards, feeds), h.ort_outputs(model, feeds))
    _half_of_sliced_onnx(model, shards)
    kinds = [c.kind for c in shards[0].collectives]
    if mode == "dynamic":  # every row-parallel input's range is gathered before its product
        assert result.stats["range_syncs"] == 4
        assert kinds.count("all_gather") == 4 and kinds.count("all_reduce") >= 4
        ops = [n.op_type for n in shards[0].graph.graph]
        assert ops.count("MatMulIntegerToFloat") == 4 and ops.count("DynamicQuantizeMatMul") > 0
    else:
        assert "all_gather" not in kinds[:-1] and result.stats["range_syncs"] == 0


@pytest.mark.parametrize("mode", ["qdq", "dynamic", "nbits4-block32"])
@pytest.mark.parametrize("which", ["bert", "llama"])
def test_fx_quantized_shards_equal_the_quantized_graph(graphs, which, mode):
    gm, args = _quantized(graphs, which, mode, "fx")
    annotated, result = _sharded(gm)
    assert result.stats["groups_sharded"] == 4 and result.stats["all_reduces_per_layer"] == 2
    shards = [shard(annotated, r, group_name="tp") for r in range(2)]
    outs, count = sim.run_fx_ranks([s.graph for s in shards], list(args))
    _close(outs, sim.reference(gm, args, {}))
    _half_of_sliced_fx(gm, shards)
    sums = 4 + result.stats["vocab_sharded"]
    # dynamic activation quantization: each row input's [-min, max] is max-reduced over ranks
    assert count == sums + (4 if mode == "dynamic" else 0) + result.stats["all_gathers"]
    assert result.stats["range_syncs"] == (8 if mode == "dynamic" else 0)


@pytest.mark.parametrize("ir", ["fx", "onnx"])
def test_blocks_of_64_split_the_ffn_and_keep_16_channel_heads_whole(graphs, ir, h):
    """4-bit blocks of 64 input channels: the FFN down projection (128 → 64 per rank) splits
    at a block boundary, the attention output (64 → 32 per rank) would cut a block."""
    graph, args = _quantized(graphs, "llama", "nbits4-block64", ir)
    annotated, result = _sharded(graph)
    plan = read_plan(annotated, PLAN_KEY)
    kinds = {g["kind"]: g for g in plan["groups"]}
    assert kinds["ffn"]["sharded"] and not kinds["heads"]["sharded"]
    assert "blocks of 64 input channels; a rank's 32 are not whole blocks" in \
        kinds["heads"]["reason"]
    shards = [shard(annotated, r, group_name="tp") for r in range(2)]
    if ir == "fx":
        outs, _ = sim.run_fx_ranks([s.graph for s in shards], list(args))
        _close(outs, sim.reference(graph, args, {}))
        _half_of_sliced_fx(graph, shards)
    else:
        feeds = sim.onnx_feeds(graph, list(args))
        _close(sim.run_onnx_ranks(shards, feeds), h.ort_outputs(graph, feeds))
        _half_of_sliced_onnx(graph, shards)


def test_sequence_parallel_regions_on_a_dynamically_quantized_graph(graphs):
    """Norm regions on token slices between the collectives; the row inputs' ranges are still
    combined over the ranks."""
    gm, args = _quantized(graphs, "llama", "dynamic", "fx")
    annotated, _ = _sharded(gm)
    assert ShardSequenceParallel()(annotated).stats["regions_sequence_parallel"] == 1
    shards = [shard(annotated, r, group_name="tp") for r in range(2)]
    outs, _ = sim.run_fx_ranks([s.graph for s in shards], list(args))
    _close(outs, sim.reference(gm, args, {}))


def test_channel_groups_see_through_quantized_layers(graphs):
    gm, model, _ = graphs["llama"]
    heads = next(g for g in channel_groups(gm) if g.kind == "heads")
    units = {u.tensor.split(".")[-2]: u.unit for u in heads.uses if u.role == "out"}
    assert heads.units == 2 and heads.blockers == ()  # GQA: 2 kv heads, each with 2 q heads
    assert units == {"q_proj": 32, "k_proj": 16, "v_proj": 16}
    quantized, _ = _quantized(graphs, "llama", "qdq", "onnx")
    groups = {g.kind: g for g in channel_groups(quantized)}
    ffn = groups["ffn"]
    assert not ffn.prunable and ffn.blockers == () and "prune before quantizing" in ffn.reason
    roles = {(u.role, u.tensor.rsplit(".", 1)[-1]) for u in ffn.uses}
    assert {("out", "q"), ("out", "scale"), ("out", "zero_point"), ("in", "q")} <= roles
    dynamic, _ = _quantized(graphs, "llama", "dynamic", "fx")
    ffn = next(g for g in channel_groups(dynamic) if g.kind == "ffn")
    ranges = [u for u in ffn.uses if u.role == "range"]
    assert len(ranges) == 2 and all(u.tensor == "" and u.unit == 0 for u in ranges)


def test_pruning_leaves_quantized_groups_alone(graphs):
    quantized, _ = _quantized(graphs, "bert", "nbits4-block32", "onnx")
    result = from_spec("prune-channels:ratio=0.5")(quantized)
    assert result.modified is False


def test_tied_quantized_table_keeps_the_embedding_whole(graphs, h):
    """LLaMA ties its embedding to the LM head; once quantized the head cannot be split, so
    slicing the table for the embedding alone would hold it twice."""
    model, args = _quantized(graphs, "llama", "qdq", "onnx")
    annotated, result = _sharded(model)
    plan = read_plan(annotated, PLAN_KEY)
    (row,) = [s for s in plan["vocab"] if s["role"] == "vocab_row"]
    assert not row["sharded"] and "also read by" in row["reason"]
    shards = [shard(annotated, r) for r in range(2)]
    assert all(measure(s.graph).bytes == result.stats["bytes_per_rank"] for s in shards)


def test_nbits_slices_equal_slices_of_the_dequantized_weight():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 128)).astype(np.float32)
    bq = quantize_rtn(w, 4, 32, False)  # asymmetric: zero points packed two per byte
    packed = NBitsArrays(bq.packed(), bq.scales.reshape(-1), pack_zero_points(bq.zero_points, 4),
                         12, 128, 4, 32, True)
    full = bq.dequantize()
    rows = slice_nbits(packed, 0, np.arange(6, 12))
    assert rows.codes.shape == (6, 4, 16) and rows.scales.shape == (24,)
    np.testing.assert_array_equal(_dequantize(rows), full[6:])
    kept = np.r_[32:64, 96:128]
    blocks = slice_nbits(packed, 1, kept)
    assert (blocks.n, blocks.k, blocks.zero_points.shape) == (12, 64, (12, 1))
    np.testing.assert_array_equal(_dequantize(blocks), full[:, kept])
    with pytest.raises(UnsupportedGraphError, match="not aligned blocks"):
        slice_nbits(packed, 1, np.arange(16, 80))
    with pytest.raises(UnsupportedGraphError, match="only lose whole blocks"):
        slice_nbits(packed, 1, np.arange(0, 48))


def _dequantize(a: NBitsArrays) -> np.ndarray:
    from graphpress.passes.quantize._packing import unpack, unpack_zero_points

    codes = unpack(a.codes, a.bits).reshape(a.n, a.blocks, a.block).astype(np.float32)
    zero = unpack_zero_points(a.zero_points.reshape(a.n, -1), a.bits, a.blocks)[..., None]
    return ((codes - zero) * a.scales.reshape(a.n, a.blocks, 1)).reshape(a.n, -1)[:, :a.k]


def test_range_syncs_run_on_a_real_process_group(graphs, tmp_path):
    """The min/max all-reduces are real ``torch.distributed`` collectives (one rank here)."""
    import torch.distributed as dist

    gm, args = _quantized(graphs, "bert", "dynamic", "fx")
    annotated, result = _sharded(gm, world=1)
    assert result.stats["range_syncs"] == 8
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        with torch.no_grad():
            out = shard(annotated, 0).graph(*args)
    finally:
        dist.destroy_process_group()
    _close([[out]], sim.reference(gm, args, {}))

"""graph.memory: KV-cache geometry found on a LLaMA-style decoder, activation estimates against
measured peaks (fx.Interpreter and torch.profiler), weights equal to ``measure``, and the
batch/seq rules."""

from __future__ import annotations

import pytest
import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from graphpress.export import to_onnx
from graphpress.graph import UnsupportedGraphError, capture, measure
from graphpress.graph.costs import node_costs, peak_live_bytes
from graphpress.graph.measured import allocator_peak, run_peak_bytes, storage_bytes
from graphpress.graph.memory import estimate_memory, kv_cache_by_node, kv_cache_bytes
from graphpress.passes import optimize

SENTENCES = ["Return the sum of a sequence of numbers.", "Open a file and return a stream.",
             "Split the pathname path into a pair.", "Return a new sorted list from the items."]


class LiveBytes(fx.Interpreter):
    """Runs the graph and records the peak bytes of distinct non-constant storages alive
    while a node runs (the Interpreter frees a value after its last use)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.peak = 0
        self.constants = {t.untyped_storage().data_ptr()
                          for t in [*gm.parameters(), *gm.buffers()]}

    def run_node(self, node: fx.Node):
        out = super().run_node(node)
        live = {}
        for value in [*self.env.values(), out]:
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in self.constants:
                        live[storage.data_ptr()] = storage.nbytes()
        self.peak = max(self.peak, sum(live.values()))
        return out


def interpreter_peak(gm: fx.GraphModule, *args) -> int:
    runner = LiveBytes(gm)
    with torch.no_grad():
        runner.run(*args)
    return runner.peak


# LLaMA-style decoder: 2 layers, hidden 64, 4 heads of 16, 2 KV heads ---------------------------
@pytest.fixture(scope="module")
def llama(llama_model):
    model, inputs = llama_model
    gm = capture(model, (), inputs)
    return gm, to_onnx(gm, (), inputs), inputs


def test_decoder_kv_cache_geometry_is_detected(llama):
    gm, onnx_model, inputs = llama
    batch, seq = inputs["input_ids"].shape
    expected = 2 * 2 * 2 * 16 * 4 * batch * seq  # K and V · layers · kv heads · dim · fp32
    for graph in (gm, onnx_model):
        estimate = estimate_memory(graph)
        assert (estimate.layers, estimate.kv_heads, estimate.head_dim) == (2, 2, 16)
        assert estimate.causal and (estimate.batch, estimate.seq) == (batch, seq)
        assert estimate.kv_cache == expected == kv_cache_bytes(
            layers=2, kv_heads=2, head_dim=16, batch=batch, seq=seq, bytes_per_element=4)
        assert estimate.weights == measure(graph).bytes
        assert estimate.total == estimate.weights + estimate.activations_peak + expected
        assert estimate_memory(graph, kv_cache=False).kv_cache is None
        fp16 = estimate_memory(graph, layers=30, cache_bytes=2)
        assert fp16.kv_cache == 2 * 30 * 2 * 16 * 2 * batch * seq


def test_decoder_kv_cache_splits_by_attention_node(llama):
    """Each attention node keeps 2·kv_heads·head_dim·4 B·batch·seq; the shares add up to the
    whole cache and name nodes of the cost table (where partition-pipeline places them)."""
    gm, onnx_model, inputs = llama
    batch, seq = inputs["input_ids"].shape
    for graph in (gm, onnx_model):
        shares = kv_cache_by_node(graph)
        assert list(shares.values()) == [2 * 2 * 16 * 4 * batch * seq] * 2
        assert sum(shares.values()) == estimate_memory(graph).kv_cache
        assert set(shares) <= {n.name for n in node_costs(graph).nodes}
        assert kv_cache_by_node(graph, kv_cache=False) == {}


def test_decoder_activations_match_measured_peaks(llama):
    gm, _, inputs = llama
    estimate = estimate_memory(gm).activations_peak
    measured = interpreter_peak(gm, inputs["input_ids"], inputs["use_cache"])
    assert abs(estimate - measured) <= 0.1 * measured
    # the profiler sees allocations during the call (op temporaries too) but not the inputs
    allocated = allocator_peak(lambda: gm(**inputs)) + inputs["input_ids"].nbytes
    assert abs(estimate - allocated) <= 0.1 * allocated


def test_decoder_stage_peaks_are_bounded_by_the_whole_peak(llama):
    """A later stage may exceed the whole graph's peak by at most what enters it (its inputs
    are held by the caller for the whole stage)."""
    gm, _, _ = llama
    table = node_costs(gm)
    whole, half = peak_live_bytes(table), len(table.nodes) // 2
    parts = [peak_live_bytes(table, 0, half), peak_live_bytes(table, half)]
    made = {v.name for n in table.nodes[:half] for v in n.outputs} | {v.name for v in table.inputs}
    sizes = ({v.name: v.bytes for n in table.nodes for v in n.outputs}
             | {v.name: v.bytes for v in table.inputs})
    later = {name for n in table.nodes[half:] for name in n.inputs} | set(table.outputs)
    entering = sum(sizes[name] for name in made & later)
    assert parts[0] <= whole and parts[1] <= whole + entering and min(parts) > 0


def test_static_graph_refuses_another_batch(llama):
    gm, onnx_model, inputs = llama
    batch, seq = inputs["input_ids"].shape
    for graph in (gm, onnx_model):
        assert estimate_memory(graph, batch=batch, seq=seq).batch == batch
        with pytest.raises(UnsupportedGraphError, match="static batch.*dynamic shapes"):
            estimate_memory(graph, batch=batch + 1)


# all-MiniLM-L6-v2 (real weights): an encoder ---------------------------------------------------
@pytest.fixture(scope="module")
def minilm_graphs(minilm_tokenizer):
    model, tokenizer = minilm_tokenizer
    enc = tokenizer(SENTENCES, padding="max_length", max_length=32, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    gm = capture(model, (), inputs)
    return gm, to_onnx(gm, (), inputs), inputs


def test_encoder_weights_equal_measure_and_no_cache(minilm_graphs):
    gm, onnx_model, _ = minilm_graphs
    for graph in (gm, onnx_model):
        estimate = estimate_memory(graph)
        assert estimate.weights == measure(graph).bytes
        assert (estimate.batch, estimate.seq, estimate.layers) == (4, 32, 6)
        assert not estimate.causal and estimate.kv_cache is None  # encoder: no cache by default
        forced = estimate_memory(graph, kv_cache=True)
        assert forced.kv_cache == 2 * 6 * 12 * 32 * 4 * 4 * 32
        assert kv_cache_by_node(graph) == {}  # not causal: no cache share anywhere
        assert sum(kv_cache_by_node(graph, kv_cache=True).values()) == forced.kv_cache


def test_encoder_activations_match_the_interpreter(minilm_graphs):
    gm, _, inputs = minilm_graphs
    estimate = estimate_memory(gm).activations_peak
    measured = interpreter_peak(gm, inputs["input_ids"], inputs["attention_mask"])
    assert abs(estimate - measured) <= 0.1 * measured


def test_fused_multi_head_attention_is_costed_and_detected(minilm_graphs):
    _, onnx_model, _ = minilm_graphs
    fused = optimize(onnx_model, ["fuse-attention"]).graph
    table = node_costs(fused)
    mha = [n for n in table.nodes if n.op == "com.microsoft::MultiHeadAttention"]
    assert len(mha) == 6
    b, h, s, d = 4, 12, 32, 32
    assert {n.flops for n in mha} == {4 * b * h * s * s * d + b * h * s * s}
    estimate = estimate_memory(fused, kv_cache=True)
    assert (estimate.layers, estimate.kv_heads, estimate.head_dim) == (6, 12, 32)


def test_symbolic_inputs_need_batch_and_seq():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8)).eval()
    ids = torch.randint(0, 50, (2, 5))
    dims = ({0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=64)},)
    gm = capture(model, (ids,), dynamic_shapes=dims)
    for graph in (gm, to_onnx(gm, (ids,), dynamic_shapes=dims)):
        with pytest.raises(UnsupportedGraphError, match="batch=N and seq=N"):
            estimate_memory(graph)
        small, large = estimate_memory(graph, batch=2, seq=5), estimate_memory(graph, batch=4, seq=10)
        assert (large.batch, large.seq) == (4, 10)
        assert large.activations_peak == 4 * small.activations_peak  # every value is B·S-sized
        assert small.kv_cache is None and small.layers is None


def test_batch_needs_a_token_input():
    model = torch.nn.Linear(4, 4).eval()
    gm = capture(model, (torch.randn(3, 4),))
    assert estimate_memory(gm).batch is None
    with pytest.raises(UnsupportedGraphError, match="integer \\[batch, seq\\] input"):
        estimate_memory(gm, batch=3)
    with pytest.raises(UnsupportedGraphError, match="kv_cache=True needs layers"):
        estimate_memory(gm, kv_cache=True)


def test_measured_helpers_see_allocations_and_count_storages_once():
    weight = torch.zeros(256, 256)
    assert storage_bytes([weight, weight[:10], weight.t()]) == weight.nbytes
    assert allocator_peak(lambda: torch.ones(512, 512) + 1) >= 2 * 512 * 512 * 4
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64)
    assert run_peak_bytes(linear, (x,)) >= x.nbytes + 8 * 32 * 4

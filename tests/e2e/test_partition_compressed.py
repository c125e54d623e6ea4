"""Issue 6, point 5: partitioning works on compressed graphs and its costs reflect compression.

Real compression passes run on a small BERT (from a transformers config) and an MLP, then
``partition-pipeline`` and ``export.split_stages``:

* FX: low-rank, channel pruning, sparsity, static/dynamic fake-quant, weight-only and ternary
  quantization change the cost table as their math says (a factored linear costs
  ``2·M·r·(K+N)`` FLOPs; pruned FFN linears half; quantized weights at their stored bytes),
  and the split stages, chained, reproduce the compressed graph;
* ONNX: after ``quantize-dynamic``, ``quantize-weights`` (MatMulNBits), ``insert-qdq`` and
  ``fuse-attention`` the weight estimate is ``measure(model).bytes``, quantized linears cost
  ≈1/4 (int8) and ≈1/7 (4-bit) of fp32, the memory split is the optimal one, and the stages
  (contrib ops and their opsets included) chained in ORT sessions reproduce ORT on the model;
* per-stage memory: each FX stage's estimate (weights + activation peak) is within 10% of its
  measured storage + CPU allocator peak (torch.profiler memory events), the eager temporaries
  of the decomposed (de)quantize ops included.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch.utils import _pytree as pytree

from graphpress.export import split_stages, to_onnx
from graphpress.graph import capture, clone, measure
from graphpress.graph.costs import node_costs
from graphpress.graph.measured import module_storage_bytes, run_peak_bytes
from graphpress.graph.memory import estimate_memory
from graphpress.passes import optimize
from graphpress.passes.partition import PartitionPipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FX_SPECS = [
    "factor-low-rank:rank=8",
    "prune-channels:scope=ffn,ratio=0.5",
    "sparsify:sparsity=0.5",
    "insert-qdq",
    "quantize-dynamic",
    "quantize-weights:bits=4",
    "quantize-weights:bits=8",
    "quantize-ternary",
]
ONNX_SPECS = {
    "quantize-dynamic": ["quantize-dynamic"],
    "quantize-weights": ["quantize-weights"],
    "insert-qdq": ["insert-qdq"],
    "fuse-attention": ["fuse-attention"],
    "fuse-attention+quantize-weights": ["fuse-attention", "quantize-weights"],
}
QUANTIZED_PRODUCTS = {"DynamicQuantizeMatMul", "MatMulNBits"}
#: the ops each compression leaves in the graph, which every stage split must keep
EXPECTED_OPS = {
    "quantize-dynamic": {"DynamicQuantizeMatMul"},
    "quantize-weights": {"MatMulNBits", "GatherBlockQuantized"},
    "insert-qdq": {"QuantizeLinear", "DequantizeLinear"},
    "fuse-attention": {"MultiHeadAttention"},
    "fuse-attention+quantize-weights": {"MultiHeadAttention", "MatMulNBits"},
}


# models ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert():
    """A 2-layer BERT (hidden 64, 4 heads, FFN 256) captured on a padded batch [2, 16]."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=256, vocab_size=100,
                                     max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 11:] = 0
    inputs = {"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": mask}
    return capture(model, (), inputs), inputs


@pytest.fixture(scope="module")
def bert_onnx(bert):
    gm, inputs = bert
    return to_onnx(gm, (), inputs)


class ResidualMLP(torch.nn.Module):
    """``x + down(gelu(up(norm(x))))`` blocks: activations of 0.5–2 MB at batch 512."""

    def __init__(self, width: int = 256, hidden: int = 1024, blocks: int = 4) -> None:
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(width) for _ in range(blocks))
        self.ups = torch.nn.ModuleList(torch.nn.Linear(width, hidden) for _ in range(blocks))
        self.downs = torch.nn.ModuleList(torch.nn.Linear(hidden, width) for _ in range(blocks))

    def forward(self, x):
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            x = x + down(torch.nn.functional.gelu(up(norm(x))))
        return x


@pytest.fixture(scope="module")
def residual_mlp():
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    return capture(ResidualMLP().eval(), (x,)), x


@pytest.fixture(scope="module")
def fx_compressed(bert):
    """``spec -> compressed GraphModule`` (each pass run once per module)."""
    gm, inputs = bert
    cache: dict[str, torch.fx.GraphModule] = {}

    def get(spec: str) -> torch.fx.GraphModule:
        if spec not in cache:
            batches = [inputs] if spec.startswith("insert-qdq") else None
            cache[spec] = optimize(gm, [spec], calibration=batches).graph
        return cache[spec]

    return get


@pytest.fixture(scope="module")
def onnx_compressed(bert, bert_onnx):
    _, inputs = bert
    feeds = {k: v.numpy() for k, v in inputs.items()}
    calibration = [feeds, {k: v[::-1].copy() for k, v in feeds.items()}]
    cache: dict[str, ir.Model] = {}

    def get(name: str) -> ir.Model:
        if name not in cache:
            specs = ONNX_SPECS[name]
            batches = calibration if "insert-qdq" in specs else None
            cache[name] = optimize(bert_onnx, specs, calibration=batches).graph
        return cache[name]

    return get


# helpers ---------------------------------------------------------------------------------------
def linear_rows(table) -> list:
    return [n for n in table.nodes if n.op == "aten.linear"]


def weight_of(node) -> str:
    """The constant weight of ``aten.linear(x, W, b)`` (read first, before the bias)."""
    return node.constants[0]


def shape_of(table, node) -> tuple[int, int, int]:
    """``(M, N, K)`` of an fp32 ``aten.linear`` row: M rows, N outputs, K inputs."""
    n_out = node.outputs[0].shape[-1]
    rows = int(np.prod(node.outputs[0].shape)) // n_out
    return rows, n_out, table.constant_bytes[weight_of(node)] // (4 * n_out)


def flat(name: str) -> str:
    """The name a pass gives buffers derived from the weight ``name`` (dots → underscores)."""
    return name.replace(".", "_")


def constant_derived(gm: torch.fx.GraphModule) -> set[str]:
    """Names of the FX nodes computed from ``get_attr`` tensors alone (dequantisation chains)."""
    found: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.all_input_nodes and all(
                a.op == "get_attr" or a.name in found for a in node.all_input_nodes):
            found.add(node.name)
    return found


def tensors(result) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]


def fx_chain(stages, inputs: dict) -> dict[str, torch.Tensor]:
    values = dict(inputs)
    for stage in stages:
        with torch.no_grad():
            outs = stage.graph(*(values[v.name] for v in stage.inputs))
        values.update(zip((v.name for v in stage.outputs), outs))
    return values


def session(model: ir.Model, *, fuse: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not fuse:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def plan(graph) -> dict:
    raw = graph.meta if isinstance(graph, torch.fx.GraphModule) else graph.metadata_props
    return json.loads(raw["graphpress.pipeline"])


def _constant_bytes(value: ir.Value) -> int:
    """Stored bytes of an initializer or of a ``Constant`` node's tensor."""
    if value.const_value is not None:
        return value.const_value.nbytes
    (attr,) = value.producer().attributes.values()
    return attr.value.nbytes if hasattr(attr.value, "nbytes") else np.asarray(attr.value).nbytes


def resident_costs(model: ir.Model) -> tuple[np.ndarray, set[str]]:
    """Reference of ``cost=memory`` on an encoder (no KV cache), read off the IR: per node not
    computed from constants alone, in graph order, the stored bytes of the constants it reads
    first, directly or through constant-only nodes (a ``Transpose`` of a weight, the
    ``Reshape``/``Cast`` feeding ``MatMulNBits``); and the names of the constant-derived values."""
    def is_constant(value: ir.Value) -> bool:
        producer = value.producer()
        return not value.is_graph_input() and (value.const_value is not None or (
            producer is not None and producer.op_type == "Constant"))

    derived: dict[int, frozenset] = {}  # constant-derived value -> the constants it reads
    sizes, names, seen, costs = {}, set(), set(), []
    for node in model.graph:
        if node.op_type == "Constant":
            continue
        sources, only_constants = set(), True
        for value in (v for v in node.inputs if v is not None):
            if is_constant(value):
                sources.add(id(value))
                sizes[id(value)] = _constant_bytes(value)
            elif id(value) in derived:
                sources |= derived[id(value)]
            else:
                only_constants = False
        if only_constants and any(v is not None for v in node.inputs):
            derived.update((id(out), frozenset(sources)) for out in node.outputs)
            names.update(out.name for out in node.outputs)
            continue
        fresh = sources - seen
        seen |= fresh
        costs.append(sum(sizes[c] for c in fresh))
    return np.array(costs, dtype=np.float64), names


def dequantize_spans(model: ir.Model) -> np.ndarray:
    """Per cut after planned node ``p`` (nodes not computed from constants alone, in graph
    order): True where an activation ``DequantizeLinear`` output is live across it — the
    planner keeps those with their readers."""
    _, derived = resident_costs(model)
    planned = [n for n in model.graph if n.op_type != "Constant"
               and not {v.name for v in n.outputs} <= derived]
    position = {id(n): p for p, n in enumerate(planned)}
    blocked = np.zeros(max(len(planned) - 1, 0), dtype=bool)
    for p, node in enumerate(planned):
        if node.op_type == "DequantizeLinear":
            readers = [position[id(u)] for v in node.outputs for u, _ in v.uses()]
            blocked[p:max(readers, default=p)] = True
    return blocked


def best_three_way_split(costs: np.ndarray, blocked: np.ndarray | None = None) -> float:
    """Brute force: the smallest largest-stage cost over all contiguous 3-stage splits (cuts
    after nodes i < j), never cutting where ``blocked``."""
    prefix = np.cumsum(costs)
    total, cuts = prefix[-1], np.arange(len(costs) - 1)
    first, second = np.meshgrid(cuts, cuts, indexing="ij")
    valid = first < second
    if blocked is not None:
        valid &= ~blocked[first] & ~blocked[second]
    worst = np.maximum(np.maximum(prefix[first], prefix[second] - prefix[first]),
                       total - prefix[second])
    return float(worst[valid].min())


# FX: the cost table sees the compression --------------------------------------------------------
def test_fx_low_rank_costs_two_thin_products(bert, fx_compressed):
    base, rank = node_costs(bert[0]), 8
    table = node_costs(fx_compressed("factor-low-rank:rank=8"))
    by_const = {c: n for n in table.nodes for c in n.constants}
    saved_flops = saved_bytes = 0
    for node in linear_rows(base):
        m, n_out, k = shape_of(base, node)
        first = by_const[f"{flat(weight_of(node))}_lowrank_b"]
        second = by_const[f"{flat(weight_of(node))}_lowrank_a"]
        assert second.inputs == (first.name,)
        assert first.flops + second.flops == 2 * m * rank * (k + n_out)
        factors = [f"{flat(weight_of(node))}_lowrank_{r}" for r in "ab"]
        assert sum(table.constant_bytes[c] for c in factors) == 4 * rank * (k + n_out)
        saved_flops += node.flops - 2 * m * rank * (k + n_out)
        saved_bytes += 4 * n_out * k - 4 * rank * (k + n_out)
    assert base.flops - table.flops == saved_flops > 0
    assert base.param_bytes - table.param_bytes == saved_bytes > 0


def test_fx_pruned_ffn_costs_half(bert, fx_compressed):
    base = node_costs(bert[0])
    table = node_costs(fx_compressed("prune-channels:scope=ffn,ratio=0.5"))
    before, after = linear_rows(base), linear_rows(table)
    assert len(before) == len(after) == 13
    pruned = 0
    for old, new in zip(before, after):
        name = weight_of(old)
        ffn = ".intermediate." in name or (".output.dense" in name and ".attention." not in name)
        if ffn:  # 256 → 128 neurons: half the products and half the weight, sliced anew
            assert new.flops * 2 == old.flops and weight_of(new) == f"{flat(name)}_prune"
            assert table.constant_bytes[weight_of(new)] * 2 == base.constant_bytes[name]
            pruned += 1
        else:
            assert new.flops == old.flops and weight_of(new) == name
            assert table.constant_bytes[name] == base.constant_bytes[name]
    assert pruned == 4
    assert table.param_bytes == measure(fx_compressed("prune-channels:scope=ffn,ratio=0.5")).bytes
    # the FFN weights lose half their bytes, the intermediate biases too (256 → 128 floats)
    assert base.param_bytes - table.param_bytes == 4 * (64 * 256 * 4 // 2) + 2 * 128 * 4


def test_fx_sparsified_weights_stay_dense(bert, fx_compressed):
    """sparsify zeroes half of each weight but stores and multiplies it densely: same costs."""
    gm = fx_compressed("sparsify:sparsity=0.5")
    base, table = node_costs(bert[0]), node_costs(gm)
    assert (table.flops, table.param_bytes) == (base.flops, base.param_bytes)
    state = dict(gm.named_parameters()) | dict(gm.named_buffers())
    for node in linear_rows(table):
        weight = state[weight_of(node)]
        assert (weight == 0).float().mean().item() >= 0.5


def _quantized_bytes(spec: str, n_out: int, k: int) -> int:
    """Stored bytes of one quantized [N, K] linear weight (codes, scales, zero points)."""
    if spec == "insert-qdq":  # int8 codes, float32 scale and int64 zero point per channel
        return n_out * k + 4 * n_out + 8 * n_out
    if spec == "quantize-dynamic":  # int8 codes, float32 scale per channel (symmetric)
        return n_out * k + 4 * n_out
    if spec == "quantize-ternary":  # 2-bit codes, a float32 scale per block of 64
        return n_out * k // 4 + 4 * n_out * -(-k // 64)
    bits = int(spec.rsplit("=", 1)[1])  # blocks of 32: packed codes, float32 scale, uint8 zp
    blocks = -(-k // 32)
    return n_out * blocks * (32 * bits // 8) + 4 * n_out * blocks + n_out * blocks


@pytest.mark.parametrize("spec", ["insert-qdq", "quantize-dynamic", "quantize-weights:bits=4",
                                  "quantize-weights:bits=8", "quantize-ternary"])
def test_fx_quantized_weights_at_their_storage(bert, fx_compressed, spec):
    base, gm = node_costs(bert[0]), fx_compressed(spec)
    table = node_costs(gm)
    tag = {"insert-qdq": "qdq", "quantize-dynamic": "qdyn",
           "quantize-ternary": "ternary"}.get(spec, "weights")
    ratios, replaced = [], 0
    for node in linear_rows(base):
        _, n_out, k = shape_of(base, node)
        prefix = f"{flat(weight_of(node))}_{tag}_"
        stored = [c for c in table.constant_bytes if c.startswith(prefix)]
        assert len(stored) >= 2 and weight_of(node) not in table.constant_bytes
        got = sum(table.constant_bytes[c] for c in stored)
        assert got == _quantized_bytes(spec, n_out, k)
        ratios.append(got / (4 * n_out * k))
        replaced += 4 * n_out * k - got
    low, high = {"quantize-weights:bits=4": (1 / 6.5, 1 / 5.9),
                 "quantize-weights:bits=8": (0.28, 0.30),
                 "quantize-ternary": (1 / 13, 1 / 12.5)}.get(spec, (0.25, 0.25 + 12 / 64))
    assert low <= min(ratios) and max(ratios) <= high, ratios
    assert table.param_bytes == measure(gm).bytes
    assert table.param_bytes <= base.param_bytes - replaced  # (embeddings may shrink too)
    # the products themselves cost what they did; dequantisation adds elementwise FLOPs
    assert [n.flops for n in linear_rows(table)] == [n.flops for n in linear_rows(base)]
    assert table.flops > base.flops


@pytest.mark.parametrize("cost", ["flops", "memory"])
@pytest.mark.parametrize("spec", FX_SPECS)
def test_fx_compressed_stages_chained_reproduce_the_graph(bert, fx_compressed, spec, cost):
    _, inputs = bert
    gm = clone(fx_compressed(spec))
    result = PartitionPipeline(stages=3, cost=cost)(gm)
    split = split_stages(gm)
    assert len(split) == 3
    sent = [sum(v.bytes for v in stage.inputs) for stage in split[1:]]
    assert sent == plan(gm)["boundary_bytes"]  # what crosses is what the planner costed
    derived = constant_derived(gm)  # a dequantised weight is recomputed, never sent
    quantized = spec.startswith(("insert-qdq", "quantize-"))  # (BERT's position ids are too)
    assert bool(derived - constant_derived(bert[0])) == quantized
    assert not derived & {v.name for stage in split for v in stage.inputs}
    for stage in split:  # every chain a stage reads is computed inside it
        made = {n.name for n in stage.graph.graph.nodes}
        for node in stage.graph.graph.nodes:
            if node.op == "call_function" and node.name not in derived:
                assert {a.name for a in node.all_input_nodes if a.name in derived} <= made
    assert all(v.shape is not None and v.bytes > 0 for stage in split for v in stage.inputs)
    for stage, row in zip(split, result.layers):
        assert module_storage_bytes(stage.graph) == row["weight_bytes"]  # compressed storage per stage
    values = fx_chain(split, inputs)
    with torch.no_grad():
        want = tensors(gm(**inputs))
    got = [values[v.name] for v in split[-1].outputs]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ONNX: the cost table sees the compression ------------------------------------------------------
def _linear_weights(model: ir.Model) -> dict[str, tuple[int, int]]:
    """fp32 ``MatMul``/``Gemm`` weights of the unquantized export: name -> (K, N) as stored."""
    found = {}
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1:
            value = node.inputs[1]
            if value is not None and value.const_value is not None and len(value.shape) == 2:
                found[value.name] = tuple(value.shape)
    return found


def _reads_dequantized_weight(model: ir.Model, node_name: str) -> bool:
    """A QDQ product: one input is ``DequantizeLinear`` of a constant (int8) weight."""
    node = next(n for n in model.graph if n.name == node_name)
    for value in node.inputs:
        producer = value.producer() if value is not None else None
        if producer is not None and producer.op_type == "DequantizeLinear":
            codes = producer.inputs[0]
            if codes.const_value is not None or codes.producer() is None:
                return True
    return False


@pytest.mark.parametrize("name", list(ONNX_SPECS))
def test_onnx_weights_at_their_storage(bert_onnx, onnx_compressed, name):
    model = onnx_compressed(name)
    table, estimate = node_costs(model), estimate_memory(model)
    assert estimate.weights == measure(model).bytes == table.param_bytes
    base = node_costs(bert_onnx)
    linears = _linear_weights(bert_onnx)
    assert len(linears) == 13
    ratios = []
    for weight, (k, n_out) in linears.items():
        stored = [c for c in table.constant_bytes if c.startswith(f"{weight}.")]
        if name.startswith("fuse-attention") and "quantize" not in name:
            assert weight in table.constant_bytes and not stored
            continue
        assert stored and weight not in table.constant_bytes
        got = sum(table.constant_bytes[c] for c in stored)
        if "quantize-weights" in name:  # MatMulNBits: packed 4-bit, fp16 scales, 4-bit zp
            blocks = -(-k // 32)
            assert got == n_out * blocks * 16 + 2 * n_out * blocks + n_out * -(-blocks // 2)
        else:  # int8 codes, float32 scale (+ int8 zero point) per output channel
            assert n_out * k + 4 * n_out <= got <= n_out * k + 4 * n_out + n_out + 4 * k
        ratios.append(got / (4 * k * n_out))
    if ratios:
        low, high = (1 / 7.5, 1 / 6.5) if "quantize-weights" in name else (0.25, 0.25 + 10 / 64)
        assert low <= min(ratios) and max(ratios) <= high, ratios
        assert table.param_bytes < base.param_bytes / 3
        # the weight products cost what the fp32 ones did: 2·M·N·K each
        dense = sum(n.flops for n in base.nodes if n.op in ("MatMul", "Gemm") and n.constants)
        quantized = [n for n in table.nodes if n.op.split("::")[-1] in QUANTIZED_PRODUCTS
                     or (n.op in ("MatMul", "Gemm") and _reads_dequantized_weight(model, n.name))]
        assert len(quantized) == 13 and sum(n.flops for n in quantized) == dense
    if name.startswith("fuse-attention"):
        fused = [n for n in table.nodes if n.op == "com.microsoft::MultiHeadAttention"]
        products = [n for n in base.nodes if n.op == "MatMul" and not n.constants]
        softmax = [n for n in base.nodes if n.op == "Softmax"]
        assert len(fused) == 2 and len(products) == 4
        assert sum(n.flops for n in fused) == sum(n.flops for n in products + softmax)


@pytest.mark.parametrize("name", list(ONNX_SPECS))
def test_onnx_memory_split_is_optimal_and_stages_reproduce_ort(bert, onnx_compressed, name):
    _, inputs = bert
    model = onnx_compressed(name).clone()
    result = PartitionPipeline(stages=3, cost="memory")(model)
    table = node_costs(model)
    costs, derived = resident_costs(model)
    stage_costs = plan(model)["stage_costs"]
    assert sum(stage_costs) == pytest.approx(costs.sum())  # compressed bytes, as stored
    # optimal: no contiguous 3-way split has a smaller largest stage (ONNX: every cut allowed
    # but those between an activation's dequantisation and its reader)
    assert max(stage_costs) == pytest.approx(best_three_way_split(costs, dequantize_spans(model)))
    assert max(stage_costs) <= costs.sum() / 3 + costs.max()
    weights = [row["weight_bytes"] for row in result.layers]
    assert sum(weights) >= table.param_bytes  # every constant is in a stage (shared: in more)

    split = split_stages(model)
    assert [sum(v.bytes for v in s.inputs) for s in split[1:]] == plan(model)["boundary_bytes"]
    assert all(v.shape is not None and v.bytes > 0 for stage in split[1:] for v in stage.inputs)
    assert not derived & {v.name for stage in split for v in stage.inputs}  # recomputed instead
    feeds = {v.name: inputs[v.name].numpy() for v in model.graph.inputs}
    # no cut separates an activation's DequantizeLinear from its reader, so ORT fuses the same
    # QDQ units into int8 kernels in the stages as in the whole model: compared with fusions on
    dequantized = {v.name for n in model.graph if n.op_type == "DequantizeLinear" for v in n.outputs}
    assert not dequantized & {v.name for stage in split for v in stage.inputs}
    want = session(model).run(None, feeds)
    values = dict(feeds)
    copies: Counter = Counter()
    for stage in split:
        onnx.checker.check_model(ir.serde.serialize_model(stage.graph))
        if any(n.domain == "com.microsoft" for n in stage.graph.graph):
            assert stage.graph.opset_imports["com.microsoft"] == 1
        copies.update(n.name for n in stage.graph.graph)
        outs = session(stage.graph).run(None, {v.name: values[v.name] for v in stage.inputs})
        values.update(zip((v.name for v in stage.outputs), outs))
    for node in model.graph:  # nothing lost or added; only constant-only nodes may repeat
        chain = node.op_type == "Constant" or {v.name for v in node.outputs} <= derived
        assert 1 <= copies[node.name] <= (3 if chain else 1), node.name
    assert EXPECTED_OPS[name] <= {n.op_type for stage in split for n in stage.graph.graph}
    for value, expected in zip(model.graph.outputs, want):
        np.testing.assert_allclose(values[value.name], expected, rtol=0, atol=1e-5)


def test_onnx_memory_split_balances_the_compressed_weights():
    """Blocks 0–2 of a 6-block MLP quantized to 4 bits, blocks 3–5 left fp32: the memory split
    balances the stored weight bytes (activations are not resident), so the first stage takes
    the cheap quantized blocks and more."""
    from graphpress.passes.quantize.weights import QuantizeWeights

    torch.manual_seed(0)
    small = torch.randn(2, 256)
    gm = capture(ResidualMLP(blocks=6).eval(), (small,))
    fp32 = to_onnx(gm, (small,))
    mixed = optimize(fp32, [QuantizeWeights(exclude=("*.[345].weight",))]).graph
    # the float bias of a rewritten Gemm moved to the new Add: the original is not left behind
    assert all(v.uses() for v in mixed.graph.initializers.values())
    linear = {"Gemm", "MatMul", "MatMulNBits"}
    per_stage = {}
    for name, model in (("fp32", fp32.clone()), ("mixed", mixed.clone())):
        result = PartitionPipeline(stages=3, cost="memory")(model)
        table = node_costs(model)
        weights = [row["weight_bytes"] for row in result.layers]
        costs = plan(model)["stage_costs"]  # a shared constant counts in its first stage
        assert sum(costs) == table.param_bytes == measure(model).bytes
        assert max(costs) == best_three_way_split(resident_costs(model)[0])
        largest = max(table.constant_bytes.values())
        assert max(costs) <= sum(costs) / 3 + largest  # balanced up to one weight
        assert 0 <= sum(weights) - table.param_bytes <= 2 * 3 * 1024  # shared norm constants
        assert all(0 <= w - c <= 2 * 1024 for w, c in zip(weights, costs))
        per_stage[name] = [sum(n.op_type in linear for n in stage.graph.graph)
                           for stage in split_stages(model)]
    assert per_stage["fp32"] == [4, 4, 4]
    # each fp32 linear stores 1 MiB, the six 4-bit ones 0.9 MiB together: the optimum puts them
    # with two fp32 linears in stage 0 (3.0 MiB); one fp32 fewer there leaves three (3.1 MiB)
    # for a later stage
    assert per_stage["mixed"] == [8, 2, 2]
    quantized = sum(n.op_type == "MatMulNBits" for n in mixed.graph)
    assert quantized == 6


# per-stage memory: estimate vs measured -------------------------------------------------------
@pytest.mark.parametrize("spec", [None, "factor-low-rank:rank=32,method=randomized",
                                  "prune-channels:scope=ffn,ratio=0.5", "insert-qdq",
                                  "quantize-dynamic", "quantize-weights:bits=4"])
def test_fx_stage_memory_estimate_matches_measured(residual_mlp, spec):
    gm, x = residual_mlp
    specs = [spec] if spec else []
    batches = [(x,)] if spec == "insert-qdq" else None
    result = optimize(gm, [*specs, "partition-pipeline:stages=3,cost=memory"],
                      calibration=batches)
    rows = result.report.records[-1].layers
    split = split_stages(result.graph)
    values = {"x": x}
    for stage, row in zip(split, rows):
        args = tuple(values[v.name] for v in stage.inputs)
        estimated = row["weight_bytes"] + row["activation_peak"]
        measured = module_storage_bytes(stage.graph) + run_peak_bytes(stage.graph, args)
        assert abs(estimated - measured) <= 0.1 * measured, (stage.index, estimated, measured)
        with torch.no_grad():
            values.update(zip((v.name for v in stage.outputs), stage.graph(*args)))


class _QuantOp(torch.nn.Module):
    """One decomposed quantization op on a [1024, 256] tensor (codes and qparams as buffers)."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.register_buffer("codes", torch.randint(-128, 127, (1024, 256), dtype=torch.int8))
        self.register_buffer("scales", torch.rand(1024) + 0.5)
        zp_dtype = {"dq_channel_int64": torch.int64, "dq_channel_int32": torch.int32}.get(case)
        self.register_buffer("zero_points", torch.zeros(1024, dtype=zp_dtype)
                             if zp_dtype else None)

    def forward(self, x):
        qd = torch.ops.quantized_decomposed
        if self.case == "q_tensor":
            return qd.quantize_per_tensor(x, 0.05, 3, 0, 255, torch.uint8)
        if self.case == "dq_tensor":
            return qd.dequantize_per_tensor(self.codes, 0.05, 3, -128, 127, torch.int8)
        if self.case == "fake_quant":
            return torch.fake_quantize_per_tensor_affine(x, 0.05, 3, 0, 255)
        return qd.dequantize_per_channel(self.codes, self.scales, self.zero_points, 0, -128, 127,
                                         torch.int8)


@pytest.mark.parametrize("case", ["q_tensor", "dq_tensor", "fake_quant", "dq_channel_int64",
                                  "dq_channel_int32", "dq_channel_none"])
def test_fx_quantization_op_temporaries_match_the_allocator(case):
    """The cost table's workspace of each decomposed (de)quantize op + its output = what the CPU
    allocator really hands out while it runs (the peak of the stage tests depends on it)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401 (registers quantized_decomposed)

    torch.manual_seed(0)
    x = torch.randn(1024, 256)
    gm = capture(_QuantOp(case).eval(), (x,))
    table = node_costs(gm)
    (node,) = [n for n in table.nodes if n.flops]
    estimated = table.workspace.get(node.name, 0) + node.outputs[0].bytes
    measured = run_peak_bytes(gm, (x,)) - x.nbytes
    assert table.workspace.get(node.name, 0) > 0
    assert abs(estimated - measured) <= 0.01 * measured, (estimated, measured)

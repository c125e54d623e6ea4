"""graph.costs: FLOPs equal hand computation on FX and ONNX, compressed weights at their real
size, liveness on a hand-built chain, symbolic dims, and the caller's graph untouched."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graphpress.export import to_onnx
from graphpress.graph import UnsupportedGraphError, capture, measure
from graphpress.graph.costs import CostTable, NodeCost, ValueInfo, node_costs, peak_live_bytes
from graphpress.passes import optimize

MATMUL_OPS = {"aten.linear", "aten.matmul", "aten.bmm", "aten.mm", "MatMul", "Gemm"}


class Block(torch.nn.Module):
    """x[B, S, 8] → q, k, v (Linear 8→16, 2 heads of 8) → SDPA → Linear 16→8."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(8, 16) for _ in range(3))
        self.o = torch.nn.Linear(16, 8)

    def forward(self, x):
        b, s, _ = x.shape
        heads = [p(x).view(b, s, 2, 8).transpose(1, 2) for p in (self.q, self.k, self.v)]
        y = torch.nn.functional.scaled_dot_product_attention(*heads)
        return self.o(y.transpose(1, 2).reshape(b, s, 16))


@pytest.fixture(scope="module")
def block_graphs():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 6, 8)
    gm = capture(model, (x,))
    return gm, to_onnx(gm, (x,))


def test_linear_and_attention_flops_match_hand_computation(block_graphs):
    gm, model = block_graphs
    fx_table, onnx_table = node_costs(gm), node_costs(model)
    # linears: 2·(B·S)·N·K with B·S = 12
    linears = [n.flops for n in fx_table.nodes if n.op == "aten.linear"]
    assert linears == [2 * 12 * 16 * 8] * 3 + [2 * 12 * 8 * 16]
    # SDPA: 4·B·H·Sq·Sk·D + B·H·Sq·Sk for the softmax
    (sdpa,) = [n for n in fx_table.nodes if n.op == "aten.scaled_dot_product_attention"]
    assert sdpa.flops == 4 * 2 * 2 * 6 * 6 * 8 + 2 * 2 * 6 * 6
    # the ONNX export spells attention as two MatMuls: the same matrix-product FLOPs
    fx_products = sum(linears) + sdpa.flops - 2 * 2 * 6 * 6
    onnx_products = sum(n.flops for n in onnx_table.nodes if n.op in MATMUL_OPS)
    assert onnx_products == fx_products == 4 * 3072 + 4 * 2 * 2 * 6 * 6 * 8
    # views, transposes and reshapes are free; the softmax costs one FLOP per element
    assert all(n.flops == 0 for n in onnx_table.nodes if n.op in ("Transpose", "Reshape"))
    assert [n.flops for n in onnx_table.nodes if n.op == "Softmax"] == [2 * 2 * 6 * 6]


def test_conv_flops_match_hand_computation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, groups=2)
    ).eval()
    x = torch.randn(1, 3, 10, 10)
    gm = capture(model, (x,))
    # out [1,8,10,10]: 2·800·3·9; grouped out [1,4,8,8]: 2·256·(8/2)·9
    expected = [2 * 800 * 3 * 9, 2 * 256 * 4 * 9]
    for graph, op in ((gm, "aten.conv2d"), (to_onnx(gm, (x,)), "Conv")):
        table = node_costs(graph)
        assert [n.flops for n in table.nodes if n.op == op] == expected
        assert [n.flops for n in table.nodes if n.op in ("aten.relu", "Relu")] == [800]


def test_caller_graphs_are_not_modified(block_graphs):
    gm, model = block_graphs
    code, proto = gm.code, ir.serde.serialize_model(model).SerializeToString()
    node_costs(gm), node_costs(model)
    assert gm.code == code and ir.serde.serialize_model(model).SerializeToString() == proto


@pytest.fixture(scope="module")
def mlp_graphs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)
    ).eval()
    x = torch.randn(4, 64)
    gm = capture(model, (x,))
    return gm, to_onnx(gm, (x,))


def test_dynamic_quantization_counts_int8_weights_at_one_byte(mlp_graphs):
    _, model = mlp_graphs
    before = node_costs(model)
    quantized = optimize(model, ["quantize-dynamic"]).graph
    after = node_costs(quantized)
    assert after.param_bytes == measure(quantized).bytes
    int8 = {name: t for name, t in quantized.graph.initializers.items()
            if t.const_value.dtype == ir.DataType.INT8}
    assert len(int8) == 2
    assert all(after.constant_bytes[name] == v.const_value.size for name, v in int8.items())
    # fp32 weights 4·(64·128 + 128·64) -> int8 1 B each (+ biases and per-channel scales)
    assert before.param_bytes - after.param_bytes == 3 * 2 * 64 * 128 - 4 * (128 + 64)
    products = [n.flops for n in after.nodes if n.op.endswith("DynamicQuantizeMatMul")]
    assert products == [2 * 4 * 128 * 64, 2 * 4 * 64 * 128]


def test_int4_weights_count_packed_codes_and_matmulnbits_flops(mlp_graphs):
    _, model = mlp_graphs
    quantized = optimize(model, ["quantize-weights:bits=4,block_size=32"]).graph
    table = node_costs(quantized)
    assert table.param_bytes == measure(quantized).bytes < node_costs(model).param_bytes / 4
    codes = {n: b for n, b in table.constant_bytes.items() if n.endswith("codes")}
    assert sorted(codes.values()) == sorted([128 * 64 // 2, 64 * 128 // 2])  # half a byte each
    nbits = [n for n in table.nodes if n.op == "com.microsoft::MatMulNBits"]
    # shapes come from shape inference on a copy plus the contrib rule
    assert [n.outputs[0].shape for n in nbits] == [(4, 128), (4, 64)]
    assert [n.flops for n in nbits] == [2 * 4 * 128 * 64, 2 * 4 * 64 * 128]
    assert all(quantized.graph.node(n.name).outputs[0].shape is None for n in nbits)


def test_fx_weight_only_quantization_gets_shapes_without_touching_the_graph(mlp_graphs):
    gm, _ = mlp_graphs
    quantized = optimize(gm, ["quantize-weights:bits=4,block_size=32"]).graph
    bare = [n.name for n in quantized.graph.nodes if n.op == "call_function" and "val" not in n.meta]
    assert bare  # nodes the pass added carry no fake value
    table = node_costs(quantized)
    assert table.param_bytes == measure(quantized).bytes
    assert [n.flops for n in table.nodes if n.op == "aten.linear"] == [2 * 4 * 128 * 64] * 2
    rebuilt = {n.name: n.outputs[0] for n in table.nodes}
    assert all(rebuilt[name].shape is not None for name in bare)  # FakeTensorProp on a copy
    assert [n.name for n in quantized.graph.nodes if "val" not in n.meta and
            n.op == "call_function"] == bare


def test_tied_weights_are_counted_once(llama_model):
    model, inputs = llama_model
    gm = capture(model, (), inputs)
    table = node_costs(gm)
    assert table.param_bytes == measure(gm).bytes
    (gather,) = [n for n in table.nodes if n.op == "aten.embedding"]
    head = [n for n in table.nodes if n.op == "aten.linear"][-1]
    assert gather.constants == head.constants  # one tensor, one canonical name
    assert table.constant_bytes[head.constants[0]] == 256 * 64 * 4


def test_symbolic_dims_must_be_bound():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    x = torch.randn(4, 64)
    dynamic = ({0: torch.export.Dim("batch", max=64)},)
    gm = capture(model, (x,), dynamic_shapes=dynamic)
    onnx_model = to_onnx(gm, (x,), dynamic_shapes=dynamic)
    symbol = str(next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[0])
    for graph, name in ((gm, symbol), (onnx_model, "batch")):
        with pytest.raises(UnsupportedGraphError, match=rf"{name}.*dims="):
            node_costs(graph)
        table = node_costs(graph, dims={name: 5})
        assert table.nodes[-1].outputs[0].bytes == 5 * 32 * 4
        assert table.flops >= 2 * 5 * 32 * 64


def test_onnx_without_value_info_is_inferred_on_a_copy():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = ir.serde.deserialize_model(proto)
    table = node_costs(model, dims={"n": 3})
    assert [n.flops for n in table.nodes] == [2 * 3 * 6 * 4, 3 * 6]
    assert [n.outputs[0].bytes for n in table.nodes] == [3 * 6 * 4] * 2
    assert model.graph.node(0).outputs[0].shape is None  # the caller's model is unchanged


def _chain() -> CostTable:
    """x → a → b; (a, b) → c; d = view(c); (d, x) → e. Bytes: x 100, a 200, b 50, c 400, e 10."""
    def v(name: str, size: int) -> ValueInfo:
        return ValueInfo(name, (size,), "uint8", size, True)

    def node(name: str, inputs: tuple[str, ...], size: int, consts=()) -> NodeCost:
        return NodeCost(name, "op", 0, inputs, (v(name, size),), consts)

    nodes = (node("a", ("x",), 200), node("b", ("a",), 50), node("c", ("a", "b"), 400),
             node("d", ("c",), 400), node("w2", (), 64, ("w",)), node("e", ("d", "x", "w2"), 10))
    return CostTable(nodes, (v("x", 100),), ("e",), {"w": 64}, {"d": "c", "w2": "w"})


@pytest.mark.parametrize(("start", "stop", "expected"), [
    (0, None, 750),  # at c: x (read again by e) + a + b + c
    (0, 2, 350),     # at b: x + a + b (a, x needed later)
    (1, 3, 750),     # entering a and the threaded x; c made here, needed later
    (3, 6, 510),     # d views entering c; at e: x + c + e; w2 views a constant
    (4, 5, 500),     # only w2 runs: the threaded x and c stay live
    (2, 2, 0),
])
def test_peak_live_bytes_on_a_hand_built_chain(start, stop, expected):
    assert peak_live_bytes(_chain(), start, stop) == expected


def test_peak_live_bytes_rejects_bad_ranges():
    with pytest.raises(ValueError, match="start"):
        peak_live_bytes(_chain(), 4, 2)

"""split_stages: the stages of a partitioned graph, chained, reproduce the whole graph.

FX stages are called in sequence and compared with the unsplit GraphModule; ONNX stages run
in ONNX Runtime sessions fed by name and are compared with ORT on the unsplit model.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch.utils import _pytree as pytree

from graphpress.export import to_onnx
from graphpress.export.stages import split_stages
from graphpress.graph import UnsupportedGraphError, capture, clone
from graphpress.passes.partition import PartitionPipeline


class MaskedResidual(torch.nn.Module):
    """Blocks ``h = h + relu(W h) * mask``: the input ``mask`` is read by every block, and the
    first block's output is also returned (an output produced early)."""

    def __init__(self, width: int = 16, blocks: int = 4) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(blocks))

    def forward(self, x, mask):
        first = h = x + torch.relu(self.blocks[0](x)) * mask
        for block in self.blocks[1:]:
            h = h + torch.relu(block(h)) * mask
        return h, first


def fx_chain(stages, inputs: dict) -> list[torch.Tensor]:
    values = [inputs[info.name] for info in stages[0].inputs]
    for stage in stages:
        assert [v.name for v in stage.inputs] == [v.name for v in (stages[stage.index - 1].outputs
                                                                  if stage.index else stage.inputs)]
        with torch.no_grad():
            values = stage.graph(*values)
        assert isinstance(values, tuple) and len(values) == len(stage.outputs)
    return list(values)


def session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def onnx_chain(stages, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    values = dict(feeds)
    for stage in stages:
        proto = ir.serde.serialize_model(stage.graph)
        onnx.checker.check_model(proto)
        outs = session(stage.graph).run(None, {v.name: values[v.name] for v in stage.inputs})
        values = dict(zip((v.name for v in stage.outputs), outs))
    return values


def assert_bytes_match_the_plan(split, plan_json: str) -> None:
    """What the splitter sends across each boundary is what the planner costed."""
    plan = json.loads(plan_json)
    sent = [sum(v.bytes for v in stage.inputs) for stage in split[1:]]
    assert sent == plan["boundary_bytes"]


def tensors(result) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]


@pytest.fixture(scope="module")
def residual():
    torch.manual_seed(0)
    model = MaskedResidual().eval()
    inputs = {"x": torch.randn(3, 16), "mask": (torch.rand(3, 16) > 0.3).float()}
    gm = capture(model, (), inputs)
    return gm, inputs, to_onnx(gm, (), inputs)


@pytest.fixture(scope="module")
def bert():
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100,
                                     max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, 5:] = 0
    inputs = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": mask}
    gm = capture(model, (), inputs)
    return gm, inputs, to_onnx(gm, (), inputs)


@pytest.fixture(scope="module")
def llama(llama_model):
    model, inputs = llama_model
    gm = capture(model, (), inputs)
    return gm, inputs, to_onnx(gm, (), inputs)


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("name", ["residual", "bert", "llama"])
def test_fx_stages_chained_reproduce_the_graph(request, name, stages):
    gm, inputs, _ = request.getfixturevalue(name)
    gm = clone(gm)
    PartitionPipeline(stages=stages)(gm)
    code = gm.code
    split = split_stages(gm)
    assert len(split) == stages and gm.code == code
    assert_bytes_match_the_plan(split, gm.meta["graphpress.pipeline"])
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert [v.name for v in split[0].inputs] == placeholders
    got = fx_chain(split, inputs)
    with torch.no_grad():
        want = tensors(gm(**inputs))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("name", ["residual", "bert", "llama"])
def test_onnx_stages_chained_reproduce_ort(request, name, stages):
    _, inputs, model = request.getfixturevalue(name)
    model = model.clone()
    PartitionPipeline(stages=stages)(model)
    before = ir.serde.serialize_model(model).SerializeToString()
    split = split_stages(model)
    assert ir.serde.serialize_model(model).SerializeToString() == before
    assert_bytes_match_the_plan(split, model.metadata_props["graphpress.pipeline"])
    feeds = {v.name: inputs[v.name].numpy() for v in model.graph.inputs}
    want = session(model).run(None, feeds)
    got = onnx_chain(split, feeds)
    for value, expected in zip(model.graph.outputs, want):
        np.testing.assert_allclose(got[value.name], expected, rtol=0, atol=1e-6)
    for stage in split:
        assert stage.graph.opset_imports == model.opset_imports
        for name, value in stage.graph.graph.initializers.items():  # shared, not copied
            assert value.const_value is model.graph.initializers[name].const_value


def test_skips_late_inputs_and_early_outputs_are_threaded(residual):
    gm, inputs, _ = residual
    PartitionPipeline(stages=4)(gm)
    split = split_stages(gm)
    early = split[-1].outputs[1].name  # 'first', the first block's output
    made = next(s.index for s in split if early in [v.name for v in s.outputs])
    assert made < len(split) - 1  # produced early, then carried through every later stage
    for stage in split[1:]:
        names = [v.name for v in stage.inputs]
        assert "mask" in names  # the graph input read by every block
        assert (early in names) == (stage.index > made)
    for prev, nxt in zip(split, split[1:]):
        assert prev.outputs == nxt.inputs
        assert all(v.is_tensor and v.bytes == 3 * 16 * 4 and v.shape == (3, 16) for v in nxt.inputs)


def test_fx_stages_share_the_weights(residual):
    gm, _, _ = residual
    PartitionPipeline(stages=2)(gm)
    source = dict(gm.named_parameters())
    for stage in split_stages(gm):
        params = dict(stage.graph.named_parameters())
        assert params and all(p is source[name] for name, p in params.items())


def test_other_annotation_names_split_too(residual):
    gm, inputs, _ = residual
    gm = clone(gm)
    compute = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module")]
    for i, node in enumerate(compute):
        node.meta.pop("graphpress.stage", None)
        node.meta["graphpress.segment"] = 0 if i < len(compute) // 2 else 1
    with pytest.raises(UnsupportedGraphError, match="partition-pipeline first"):
        split_stages(gm)
    split = split_stages(gm, annotation="graphpress.segment")
    assert len(split) == 2
    with torch.no_grad():
        want = gm(inputs["x"], inputs["mask"])
    for a, b in zip(fx_chain(split, inputs), want):
        assert torch.equal(a, b)


def test_decreasing_stage_indices_are_refused(residual):
    gm, _, _ = residual
    gm = clone(gm)
    compute = [n for n in gm.graph.nodes if n.op == "call_function"]
    for i, node in enumerate(compute):
        node.meta["graphpress.stage"] = 1 if i < 2 else 0
    with pytest.raises(UnsupportedGraphError, match="contiguous"):
        split_stages(gm)


def test_fx_non_tensor_crossing_names_the_value():
    class Flatten(torch.nn.Module):
        def forward(self, x):
            n = x.shape[0]
            return (torch.relu(x) * 2).reshape(n, -1)

    x = torch.randn(4, 2, 3)
    gm = capture(Flatten(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    size = next(n for n in gm.graph.nodes if "sym_size" in str(n.target))
    later = False
    for node in gm.graph.nodes:
        later |= node is size
        if node.op == "call_function":
            node.meta["graphpress.stage"] = 1 if later and node is not size else 0
    with pytest.raises(UnsupportedGraphError, match=f"'{size.name}'.*only tensors"):
        split_stages(gm)


def test_onnx_non_tensor_crossing_names_the_value():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("SequenceConstruct", ["a", "a"], ["seq"], name="make"),
        helper.make_node("SequenceAt", ["seq", "i"], ["y"], name="at"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("i", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    for node, stage in zip(model.graph, (0, 0, 1)):
        node.metadata_props["graphpress.stage"] = str(stage)
    with pytest.raises(UnsupportedGraphError, match="'seq'.*only tensors"):
        split_stages(model)
    for node, stage in zip(model.graph, (0, 1, 1)):
        node.metadata_props["graphpress.stage"] = str(stage)
    split = split_stages(model)
    assert [v.name for v in split[1].inputs] == ["i", "a"]  # graph order: inputs first
    feeds = {"x": np.array([-1.0, 2.0], np.float32), "i": np.array(1, np.int64)}
    assert np.array_equal(onnx_chain(split, feeds)["y"], [0.0, 2.0])


def test_onnx_subgraph_reads_constants_and_untyped_values_cross():
    """An ``If`` whose branches read outer values (``a`` from stage 0, the ``Constant`` ``k``
    also read in stage 0): the stage's inputs include what the branches capture, each stage
    keeps its own copy of the ``Constant``, and untyped boundary values get inferred types."""
    then_branch = helper.make_graph([helper.make_node("Add", ["a", "k"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["b"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    k = helper.make_tensor("kv", TensorProto.FLOAT, [2], [10, 20])
    nodes = [
        helper.make_node("Constant", [], ["k"], value=k),
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Sub", ["k", "x"], ["b"], name="sub"),
        helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_branch,
                         else_branch=else_branch),
        helper.make_node("Mul", ["y", "w"], ["z"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
        [onnx.numpy_helper.from_array(np.array([2, 3], np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model = ir.serde.deserialize_model(proto)  # no shape inference: a and b are untyped
    for node, stage in zip(model.graph, (0, 0, 0, 1, 1)):
        node.metadata_props["graphpress.stage"] = str(stage)
    before = ir.serde.serialize_model(model).SerializeToString()
    split = split_stages(model)
    assert ir.serde.serialize_model(model).SerializeToString() == before
    assert [v.name for v in split[1].inputs] == ["c", "a", "b"]
    assert all(v.dtype == "float32" and v.shape == (2,) for v in split[1].inputs[1:])
    for stage in split:
        assert [n.op_type for n in stage.graph.graph].count("Constant") == 1
    for flag in (True, False):
        feeds = {"x": np.array([-1.0, 2.0], np.float32), "c": np.array(flag)}
        want = session(model).run(None, feeds)[0]
        assert np.array_equal(onnx_chain(split, feeds)["z"], want)


# constant-only chains: recomputed in every stage that reads them, never sent -----------------
class Twice(torch.nn.Module):
    """``b(relu(a(relu(a(x)))))``: the weight of ``a`` is read by two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


def from_constants(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """FX nodes computed from ``get_attr`` tensors alone, in graph order."""
    found: list[torch.fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.all_input_nodes and all(
                a.op == "get_attr" or a in found for a in node.all_input_nodes):
            found.append(node)
    return found


@pytest.mark.parametrize("spec", ["quantize-weights:bits=4", "quantize-dynamic", "insert-qdq"])
def test_fx_cut_inside_a_dequantisation_chain_recomputes_it(spec):
    """Three stages: ``a``'s dequantised weight is read by stages 0 and 1, and stage 2 starts
    in the middle of the chain dequantising ``b``'s weight. No stage receives a dequantised
    weight: each computes the ones it reads from the shared stored tensors, and the chained
    stages equal the unsplit graph."""
    from graphpress.passes import optimize

    torch.manual_seed(0)
    x = torch.randn(4, 64)
    gm = optimize(capture(Twice().eval(), (x,)), [spec], calibration=[(x,)]).graph
    chain = from_constants(gm)
    linears = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    a_chain = [n for n in chain if linears[0] in _readers(n)]
    b_chain = [n for n in chain if linears[2] in _readers(n) and n not in a_chain]
    assert len(linears) == 3 and a_chain and b_chain
    assert all(linears[1] in _readers(n) for n in a_chain)  # one chain, read twice
    starts = {linears[0].next: 1, b_chain[len(b_chain) // 2]: 2}  # annotation only: ignored
    stage = 0
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr", "output"):
            stage = starts.get(node, stage)
            node.meta["graphpress.stage"] = stage
    split = split_stages(gm)
    assert len(split) == 3
    names = {n.name for n in chain}
    members = [{n.name for n in part.graph.graph.nodes} for part in split]
    assert [{n.name for n in a_chain} <= m for m in members] == [True, True, False]
    assert [bool({n.name for n in b_chain} & m) for m in members] == [False, False, True]
    assert {n.name for n in b_chain} <= members[2]
    for part in split[1:]:  # only activations cross
        assert not names & {v.name for v in part.inputs}
        assert all(v.shape == (4, 64) for v in part.inputs)
    source = dict(gm.named_buffers()) | dict(gm.named_parameters())
    for part in split:  # the stored (quantized) tensors are shared, not copied
        for name, tensor in [*part.graph.named_buffers(), *part.graph.named_parameters()]:
            assert tensor is source[name]
    with torch.no_grad():
        want = gm(x)
    got = fx_chain(split, {"x": x})
    assert torch.equal(got[0], want)


def _readers(node: torch.fx.Node) -> set[torch.fx.Node]:
    """Nodes reading ``node`` directly or through other nodes computed from constants."""
    found, stack = set(), [node]
    while stack:
        for user in stack.pop().users:
            if user not in found:
                found.add(user)
                stack.append(user)
    return found


def transposed_weight_model() -> ir.Model:
    """``Transpose(W)`` (a weight read as ``[K, N]``) feeds the first and the last MatMul; the
    middle one reads ``W`` itself."""
    w = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["w"], ["t"], perm=[1, 0], name="transpose_w"),
        helper.make_node("MatMul", ["x", "t"], ["h"], name="first"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w"], ["m"], name="middle"),
        helper.make_node("Tanh", ["m"], ["a"], name="tanh"),
        helper.make_node("MatMul", ["a", "t"], ["y"], name="last"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [onnx.numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


@pytest.mark.parametrize("how", ["manual", "planned"])
def test_onnx_transposed_weight_is_recomputed_per_stage(how):
    model = transposed_weight_model()
    if how == "manual":  # the Transpose marked in stage 0, read again by stage 2
        for node, stage in zip(model.graph, (0, 0, 1, 1, 2, 2)):
            node.metadata_props["graphpress.stage"] = str(stage)
    else:
        result = PartitionPipeline(stages=3, cost="memory")(model)
        # the first reader holds the transposed weight (128 B), the middle MatMul the weight
        # itself (the same tensor: counted once), the stored bytes balance as far as they can
        assert json.loads(model.metadata_props["graphpress.pipeline"])["stage_costs"][0] == 128
        assert [r["weight_bytes"] for r in result.layers].count(128) >= 2
    split = split_stages(model)
    assert len(split) == 3
    if how == "planned":
        assert_bytes_match_the_plan(split, model.metadata_props["graphpress.pipeline"])
    for stage in split:
        assert "t" not in {v.name for v in stage.inputs}
        ops = [n.op_type for n in stage.graph.graph]
        reads_t = any(v is not None and v.name == "t" for n in stage.graph.graph
                      for v in n.inputs if n.op_type == "MatMul")
        assert ("Transpose" in ops) == reads_t
        for name, value in stage.graph.graph.initializers.items():
            assert value.const_value is model.graph.initializers[name].const_value
    assert sum("Transpose" in [n.op_type for n in s.graph.graph] for s in split) == 2
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)}
    want = session(model).run(None, feeds)[0]
    np.testing.assert_array_equal(onnx_chain(split, feeds)["y"], want)

"""graph.summary / format / diff / to_dot / to_svg on tiny hand-counted FX and ONNX graphs."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graphpress.graph import (
    UnsupportedGraphError,
    capture,
    clone,
    diff,
    format,
    load,
    summary,
    to_dot,
    to_svg,
)
from graphpress.graph.fx import mark as fx_mark
from graphpress.graph.onnx import mark as onnx_mark


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


def _tiny_fx():
    return capture(Tiny(), (torch.randn(2, 3),))


def _tiny_onnx(weight_dtype=np.float32):
    """x[2,3] @ w[3,4] (+ Cast if w is not float32) + b[4] → Relu "act" → Reshape(shape) → y."""
    w = numpy_helper.from_array(np.full((3, 4), 0.123456, weight_dtype), "w")
    b = numpy_helper.from_array(np.ones(4, np.float32), "b")
    shape = numpy_helper.from_array(np.array([4, 2], np.int64))
    nodes = []
    if weight_dtype != np.float32:
        nodes.append(helper.make_node("Cast", ["w"], ["w32"], name="cast_w", to=TensorProto.FLOAT))
    nodes += [
        helper.make_node("MatMul", ["x", "w32" if nodes else "w"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "b"], ["biased"], name="bias"),
        helper.make_node("Relu", ["biased"], ["h"], name="act"),
        helper.make_node("Identity", ["h"], ["h2"]),
        helper.make_node("Constant", [], ["shape"], name="shape_const", value=shape),
        helper.make_node("Reshape", ["h2", "shape"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])],
        [w, b],
    )
    return load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_summary_fx_hand_counted():
    s = summary(_tiny_fx())
    assert s.kind == "fx"
    assert s.ops["aten.linear"] == 1 and s.ops["aten.relu"] == 1
    assert s.nodes == sum(s.ops.values())
    assert s.nodes - s.ops.get("call_module:_guards_fn", 0) == 2
    assert s.params == 3 * 4 + 4
    assert s.bytes == 16 * 4 and s.bytes_by_dtype == {"float32": 64}
    assert s.compression_ratio is None and s.baseline_bytes is None
    assert "16 params" in str(s) and "aten.linear" in str(s)


def test_summary_onnx_hand_counted_and_ratio():
    s = summary(_tiny_onnx())
    assert s.ops == {"Add": 1, "Constant": 1, "Identity": 1, "MatMul": 1, "Relu": 1, "Reshape": 1}
    assert (s.nodes, s.params) == (6, 12 + 4 + 2)
    assert s.bytes_by_dtype == {"float32": 48 + 16, "int64": 16} and s.bytes == 80
    half = _tiny_onnx(np.float16)
    r = summary(half, baseline=_tiny_onnx())
    assert r.bytes == 24 + 16 + 16 and r.baseline_bytes == 80
    assert r.compression_ratio == pytest.approx(80 / 56)
    assert summary(half, baseline=s).compression_ratio == pytest.approx(80 / 56)
    assert "compression ratio 1.43x" in str(r)
    assert json.loads(json.dumps(r.to_dict()))["bytes_by_dtype"]["float16"] == 24


def test_format_fx_is_deterministic_and_readable():
    gm = _tiny_fx()
    text = format(gm)
    assert text == format(clone(gm))
    assert text == format(_tiny_fx())  # a second capture (other weights) formats the same
    lines = text.splitlines()
    assert "%fc_weight = get_attr[fc.weight] : float32[4,3]" in lines
    assert "%linear = aten.linear(%x, %fc_weight, %fc_bias) : float32[2,4]" in lines
    assert lines[-1] == "return (%relu,)"
    assert "0x" not in text and "tensor(" not in text


def test_format_onnx_is_deterministic_without_values_and_marks_provenance():
    model = _tiny_onnx()
    text = format(model)
    assert text == format(clone(model)) == format(_tiny_onnx())
    assert "const w : float32[3,4]" in text.splitlines()
    assert "act: h = Relu(biased)" in text.splitlines()
    assert "h2 = Identity(h)" in text.splitlines()
    assert "shape_const: shape = Constant() {value=tensor(int64[2])}" in text.splitlines()
    assert "0.123" not in text  # never tensor values
    onnx_mark(model.graph.node("act"), "fold-batchnorm")
    assert "act: h = Relu(biased)  # by fold-batchnorm" in format(model).splitlines()


def test_diff_onnx_rewritten_added_removed():
    before = _tiny_onnx()
    after = clone(before)
    g = after.graph
    g.node("act").op_type = "Sigmoid"  # rewritten
    identity = next(n for n in g if n.op_type == "Identity")  # removed (bypassed)
    identity.outputs[0].replace_all_uses_with(identity.inputs[0])
    g.remove(identity, safe=True)
    neg = ir.node("Neg", [g.node("mm").outputs[0]], name="mm.negate")  # added, marked
    onnx_mark(neg, "my-pass")
    g.insert_after(g.node("mm"), neg)
    g.node("bias").replace_input_with(0, neg.outputs[0])  # rewritten: new input
    d = diff(before, after)
    assert d and d.kind == "onnx"
    assert [(c.key, c.provenance) for c in d.added] == [("mm.negate", "my-pass")]
    assert [c.key for c in d.removed] == ["Identity(h2)"]
    assert sorted(c.key for c in d.rewritten) == ["act", "bias", "reshape"]
    act = next(c for c in d.rewritten if c.key == "act")
    assert (act.before, act.after) == ("act: h = Relu(biased)", "act: h = Sigmoid(biased)")
    lines = str(d).splitlines()
    assert lines[0] == "graph diff (onnx): 1 added, 1 removed, 3 rewritten"
    assert "- h2 = Identity(h)" in lines
    assert any(x.startswith("+ mm.negate:") and x.endswith("# by my-pass") for x in lines)
    assert "~ → act: h = Sigmoid(biased)" in lines
    assert json.loads(json.dumps(d.to_dict()))["added"][0]["provenance"] == "my-pass"
    assert not d.constants_added and not d.constants_removed


def test_diff_onnx_lists_initializer_changes():
    before = _tiny_onnx()
    after = clone(before)
    after.graph.node("bias").replace_input_with(1, after.graph.node("mm").outputs[0])
    after.graph.initializers.pop("b")  # now dead: removed, as a cleanup pass would
    d = diff(before, after)
    assert d and [c.before for c in d.constants_removed] == ["const b : float32[4]"]
    assert str(d).splitlines()[0].endswith("1 rewritten; constants 0 added, 1 removed")


def test_diff_onnx_unnamed_node_op_change_is_rewritten():
    before = _tiny_onnx()
    after = clone(before)
    next(n for n in after.graph if n.op_type == "Identity").op_type = "Neg"
    d = diff(before, after)
    assert not d.added and not d.removed
    assert [(c.before, c.after) for c in d.rewritten] == [("h2 = Identity(h)", "h2 = Neg(h)")]


def test_onnx_subgraphs_are_formatted_and_diffed():
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"], name="then_relu")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    graph = helper.make_graph(
        [node],
        "main",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    lines = format(model).splitlines()
    at = lines.index("  then_branch of branch: graph then")
    assert lines[at + 1] == "    then_relu: t = Relu(x)"
    after = clone(model)
    after.graph.node("branch").attributes["then_branch"].value.node("then_relu").op_type = "Sigmoid"
    d = diff(model, after)
    assert [c.key for c in d.rewritten] == ["then_relu"] and not d.added and not d.removed


def test_diff_fx_after_clone_and_rewrite():
    before = _tiny_fx()
    after = clone(before)
    relu = next(n for n in after.graph.nodes if n.name == "relu")
    with after.graph.inserting_after(relu):
        sig = fx_mark(after.graph.call_function(torch.ops.aten.sigmoid.default, relu.args), "swap")
    relu.replace_all_uses_with(sig)
    after.graph.erase_node(relu)
    after.recompile()
    d = diff(before, after)
    assert [(c.key, c.op, c.provenance) for c in d.added] == [(sig.name, "aten.sigmoid", "swap")]
    assert [c.key for c in d.removed] == ["relu"]
    assert [c.key for c in d.rewritten] == ["output"]
    assert format(before) == format(_tiny_fx())  # the original is untouched


def test_diff_identical_is_empty_and_mixed_kinds_raise():
    gm, model = _tiny_fx(), _tiny_onnx()
    assert not diff(gm, clone(gm)) and not diff(model, clone(model))
    assert str(diff(model, model)) == "no changes"
    with pytest.raises(UnsupportedGraphError, match="same kind"):
        diff(gm, model)


def test_dot_and_svg_color_by_provenance():
    model = _tiny_onnx()
    onnx_mark(model.graph.node("act"), "fold-batchnorm")
    dot = to_dot(model)
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    assert '"node:act" [label="act\\nRelu", fillcolor="#8dd3c7"' in dot
    assert '"node:mm" -> "node:bias";' in dot
    svg = ET.fromstring(to_svg(model))
    groups = svg.findall("{http://www.w3.org/2000/svg}g")
    assert len(groups) == 1 + 6 + 1  # input, 6 nodes, output (constants left out)
    assert any(g.find("{http://www.w3.org/2000/svg}title").text == "act: Relu (by fold-batchnorm)" for g in groups)
    assert to_svg(model) == to_svg(clone(model))
    onnx_mark(model.graph.initializers["b"], "fold-batchnorm")  # a pass-made constant is drawn
    assert '"const:b" [label="b\\nconst", fillcolor="#8dd3c7"' in to_dot(model)
    assert len(ET.fromstring(to_svg(model)).findall("{http://www.w3.org/2000/svg}g")) == 9


def _big_onnx(chain: int, fan: int) -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, value = [], x
    for i in range(chain):
        nodes.append(ir.node("Neg", [value], name=f"neg{i}"))
        value = nodes[-1].outputs[0]
    nodes += [ir.node("Relu", [value], name=f"relu{i}") for i in range(fan)]
    graph = ir.Graph([x], [nodes[-1].outputs[0]], nodes=nodes, opset_imports={"": 17})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize(("chain", "fan"), [(1000, 0), (3, 1000)])
def test_big_graph_drawing_is_bounded(chain, fan):
    model = _big_onnx(chain, fan)
    text = to_svg(model, max_nodes=400, max_per_row=40)
    root = ET.fromstring(text)
    groups = root.findall("{http://www.w3.org/2000/svg}g")
    assert len(groups) <= 400 and len(text) < 400_000
    note = next(t.text for t in root.iter("{http://www.w3.org/2000/svg}text") if t.get("class") == "note")
    assert f"of {chain + fan + 2} nodes drawn" in note
    assert ("first 400" in note) if chain else ("hidden in wide rows" in note)

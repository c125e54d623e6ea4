"""Tests of the cleanup passes: ``dce`` (EliminateDeadCode) and ``eliminate-identity``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from graphpress.graph import capture, verify
from graphpress.graph.errors import PreconditionError, UnsupportedGraphError
from graphpress.passes import from_spec, optimize
from graphpress.passes.cleanup import EliminateDeadCode, EliminateIdentity

F = TensorProto.FLOAT
X = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)


class DeadBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.register_buffer("unused", torch.ones(3))

    def forward(self, x):
        self.b(x).relu()  # dead
        torch.rand(3)  # dead but random: impure, stays
        return torch.relu(self.a(x)).to(torch.float32)


class Identities(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)

    def forward(self, x):
        y = self.drop(self.fc(x)).clone().detach().contiguous().to(torch.float32)
        z = x.transpose(0, 1).contiguous().view(-1)  # contiguous changes strides: stays
        return y.relu(), z


# ----------------------------------------------------------------------------- dce, FX


def test_dce_fx_removes_dead_ops_and_weights(h):
    model, x = DeadBranch(), torch.from_numpy(X)
    gm = capture(model, (x,))
    snapshot = h.fx_snapshot(gm)
    result = optimize(gm, ["dce"])
    out = result.graph
    assert h.fx_ops(out) == [
        "call_module:_guards_fn", "aten.rand", "aten.linear", "aten.relu",
        "aten._assert_tensor_metadata", "aten.to",
    ]
    assert not hasattr(out.b, "weight") and not hasattr(out.b, "bias")
    assert "unused" not in dict(out.named_buffers())
    assert result.report.records[0].stats == {"nodes_removed": 5, "attributes_removed": 3}
    torch.testing.assert_close(out(x), model(x))
    verify(out)
    h.assert_fx_unchanged(gm, snapshot)


def test_dce_fx_keeps_attribute_another_node_uses(h):
    gm = capture(nn.Linear(4, 4), (torch.from_numpy(X),))
    weight = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "weight")
    with gm.graph.inserting_after(weight):
        extra = gm.graph.get_attr("weight")  # a second, dead reference to the same tensor
        gm.graph.call_function(torch.ops.aten.neg.default, (extra,))
    result = EliminateDeadCode()(gm)
    assert result.stats == {"nodes_removed": 2, "attributes_removed": 0}
    assert isinstance(gm.weight, torch.Tensor)
    verify(gm)


def test_dce_fx_noop(h):
    gm = capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.from_numpy(X),))
    code = gm.code
    result = EliminateDeadCode()(gm)
    assert result.modified is False and result.stats["nodes_removed"] == 0
    assert gm.code == code


# ----------------------------------------------------------------------------- dce, ONNX


def test_dce_onnx_removes_dead_nodes_and_initializers(h):
    model = h.make_onnx(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Neg", ["r"], ["d1"]),
            helper.make_node("Mul", ["d1", "wd"], ["d2"]),
            helper.make_node("Add", ["r", "b"], ["y"]),
        ],
        [("x", F, [2, 4])], [("y", F, [2, 4])],
        {"b": np.ones(4, np.float32), "wd": np.ones(4, np.float32), "unused": np.zeros(2, np.float32)},
    )
    snapshot = h.onnx_snapshot(model)
    result = optimize(model, ["dce"])
    out = result.graph
    assert h.onnx_ops(out) == ["Relu", "Add"]
    assert list(out.graph.initializers) == ["b"]
    assert [v.name for v in out.graph.outputs] == ["y"]
    assert result.report.records[0].stats == {"nodes_removed": 2, "initializers_removed": 2}
    np.testing.assert_allclose(h.ort_outputs(out, {"x": X})[0], h.ort_outputs(model, {"x": X})[0])
    verify(out)
    assert h.onnx_snapshot(model) == snapshot


def _branch(name, nodes, output):
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, F, [2, 4])])


def test_dce_onnx_cleans_subgraphs_and_releases_outer_values(h):
    then = _branch("then", [
        helper.make_node("Neg", ["s"], ["inner_dead"]),  # only user of outer "s"
        helper.make_node("Relu", ["x"], ["t"]),
    ], "t")
    other = _branch("else", [helper.make_node("Abs", ["x"], ["e"])], "e")
    model = h.make_onnx(
        [
            helper.make_node("Sin", ["x"], ["s"]),
            helper.make_node("Cos", ["x"], ["c"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
            helper.make_node("If", ["cond"], ["dead_if"], then_branch=_branch(
                "t2", [helper.make_node("Exp", ["c"], ["t2"])], "t2"), else_branch=_branch(
                "e2", [helper.make_node("Log", ["c"], ["e2"])], "e2")),
        ],
        [("x", F, [2, 4]), ("cond", TensorProto.BOOL, [])], [("y", F, [2, 4])],
    )
    result = EliminateDeadCode()(model)
    assert h.onnx_ops(model) == ["If"]
    assert [n.op_type for n in model.graph[0].attributes["then_branch"].value] == ["Relu"]
    assert result.stats["nodes_removed"] == 4
    verify(model)
    for cond in (True, False):
        feeds = {"x": X, "cond": np.array(cond)}
        expected = np.maximum(X, 0) if cond else np.abs(X)
        np.testing.assert_allclose(h.ort_outputs(model, feeds)[0], expected)


def test_dce_onnx_keeps_overridable_initializer(h):
    model = h.make_onnx(
        [helper.make_node("Relu", ["x"], ["y"])],
        [("x", F, [2, 4]), ("opt", F, [4])], [("y", F, [2, 4])], {"opt": np.ones(4, np.float32)},
    )
    result = EliminateDeadCode()(model)
    assert result.modified is False and "opt" in model.graph.initializers


# ----------------------------------------------------------------------------- identity, FX


def test_identity_fx_removes_dropout_copies_and_casts(h):
    model, x = Identities(), torch.randn(3, 4)
    gm = capture(model, (x,))
    snapshot = h.fx_snapshot(gm)
    result = optimize(gm, ["eliminate-identity"])
    out = result.graph
    assert h.fx_ops(out) == [
        "call_module:_guards_fn", "aten.linear", "aten._assert_tensor_metadata",
        "aten.transpose", "aten.contiguous", "aten.view", "aten.relu",
    ]
    assert result.report.records[0].stats == {"identities_removed": 4}
    for got, want in zip(out(x), model.eval()(x)):
        torch.testing.assert_close(got, want)
    verify(out)
    h.assert_fx_unchanged(gm, snapshot)


def test_identity_fx_keeps_copies_protecting_mutation_or_inputs(h):
    class Mutates(nn.Module):
        def forward(self, x):
            z = x.clone()
            z.add_(1)
            return z

    class ReturnsCopy(nn.Module):
        def forward(self, x):
            return x.clone(), x.relu()

    for module in (Mutates(), ReturnsCopy()):
        gm = capture(module, (torch.randn(3, 4),))
        assert EliminateIdentity()(gm).modified is False
        assert "aten.clone" in h.fx_ops(gm)


def test_identity_fx_keeps_training_dropout(h):
    gm = capture(nn.Dropout(0.5), (torch.randn(3, 4),))
    dropout = next(n for n in gm.graph.nodes if "dropout" in str(n.target))
    dropout.args = (dropout.args[0], 0.5, True)
    assert EliminateIdentity()(gm).modified is False


def test_identity_fx_noop(h):
    gm = capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(3, 4),))
    assert EliminateIdentity()(gm).modified is False


# ----------------------------------------------------------------------------- identity, ONNX


def test_identity_onnx_removes_and_keeps_output_name(h):
    model = h.make_onnx(
        [
            helper.make_node("Identity", ["x"], ["i1"]),
            helper.make_node("Dropout", ["i1"], ["d"]),
            helper.make_node("Cast", ["d"], ["c"], to=F),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Identity", ["r"], ["out"]),
        ],
        [("x", F, [2, 4])], [("out", F, [2, 4])],
    )
    snapshot = h.onnx_snapshot(model)
    result = optimize(model, ["eliminate-identity"])
    out = result.graph
    assert h.onnx_ops(out) == ["Relu"]
    assert [v.name for v in out.graph.outputs] == ["out"]
    assert out.graph[0].outputs[0].name == "out"
    np.testing.assert_allclose(h.ort_outputs(out, {"x": X})[0], np.maximum(X, 0))
    verify(out)
    assert h.onnx_snapshot(model) == snapshot


def test_identity_onnx_keeps_non_identities(h):
    model = h.make_onnx(
        [
            helper.make_node("Cast", ["x"], ["half"], to=TensorProto.FLOAT16),  # changes dtype
            helper.make_node("Dropout", ["x"], ["dm", "mask"]),  # mask used
            helper.make_node("Dropout", ["x", "ratio", "train"], ["dt"]),  # training mode
            helper.make_node("Identity", ["x"], ["passthrough"]),  # input straight to output
            helper.make_node("Identity", ["w"], ["weight_out"]),  # initializer to output
        ],
        [("x", F, [2, 4])],
        [("half", TensorProto.FLOAT16, [2, 4]), ("dm", F, [2, 4]), ("mask", TensorProto.BOOL, [2, 4]),
         ("dt", F, [2, 4]), ("passthrough", F, [2, 4]), ("weight_out", F, [4])],
        {"w": np.ones(4, np.float32), "ratio": np.array(0.5, np.float32), "train": np.array(True)},
    )
    assert EliminateIdentity()(model).modified is False
    assert len(model.graph) == 5


def test_identity_onnx_inside_subgraph(h):
    then = _branch("then", [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Identity", ["r"], ["t"]),  # removed: r takes the name t
    ], "t")
    other = _branch("else", [helper.make_node("Identity", ["x"], ["e"])], "e")  # outer: stays
    model = h.make_onnx(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        [("x", F, [2, 4]), ("cond", TensorProto.BOOL, [])], [("y", F, [2, 4])],
    )
    result = EliminateIdentity()(model)
    assert result.stats == {"identities_removed": 1}
    branches = model.graph[0].attributes
    assert [n.op_type for n in branches["then_branch"].value] == ["Relu"]
    assert [n.op_type for n in branches["else_branch"].value] == ["Identity"]
    verify(model)
    for cond in (True, False):
        got = h.ort_outputs(model, {"x": X, "cond": np.array(cond)})[0]
        np.testing.assert_allclose(got, np.maximum(X, 0) if cond else X)


def test_identity_onnx_noop(h):
    model = h.make_onnx([helper.make_node("Relu", ["x"], ["y"])], [("x", F, [2, 4])], [("y", F, [2, 4])])
    assert EliminateIdentity()(model).modified is False


# ----------------------------------------------------------------------------- preconditions


@pytest.mark.parametrize("spec", ["dce", "eliminate-identity"])
def test_rejects_non_graphs(spec):
    pass_ = from_spec(spec)
    for bad in (nn.Linear(2, 2), "model.onnx", None):
        with pytest.raises(UnsupportedGraphError):
            pass_(bad)


@pytest.mark.parametrize("spec", ["dce", "eliminate-identity"])
def test_rejects_non_canonical_fx(spec):
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(PreconditionError, match="re-capture"):
        from_spec(spec)(traced)


def test_specs_round_trip():
    assert isinstance(from_spec("dce"), EliminateDeadCode)
    assert isinstance(from_spec("eliminate-identity"), EliminateIdentity)
    assert from_spec("dce").spec() == "dce"

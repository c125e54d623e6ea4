"""PassManager / optimize(): copying, verification modes, reports, instruments, onnx_ir passes.

The passes here are small local ones (not registered) so the manager is tested on its own.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import pytest
import torch
from onnx import TensorProto, helper

from graphpress import export
from graphpress.graph import (
    PreconditionError,
    UnsupportedGraphError,
    VerificationError,
    capture,
    load,
)
from graphpress.graph.fx import mark
from graphpress.passes import (
    DiffAfter,
    DumpIR,
    Pass,
    PassManager,
    PassResult,
    PrintAfter,
    Timing,
    optimize,
)
from graphpress.passes.instruments import from_env


@dataclass(frozen=True)
class ReluToSigmoid(Pass):
    """Rewrite every ReLU into a Sigmoid (not exact: visible in outputs)."""

    name: ClassVar[str] = "relu-to-sigmoid"

    def run_fx(self, gm):
        count = 0
        for node in gm.graph.nodes:
            if node.target == torch.ops.aten.relu.default:
                node.target = torch.ops.aten.sigmoid.default
                mark(node, self.name)
                count += 1
        gm.recompile()
        return PassResult(gm, count > 0, {"rewritten": count})

    def run_onnx(self, model):
        count = 0
        for node in model.graph:
            if node.op_type == "Relu":
                node.op_type = "Sigmoid"
                count += 1
        return PassResult(model, count > 0, {"rewritten": count})


@dataclass(frozen=True)
class BreakGraph(Pass):
    """Leave the ONNX graph invalid: a node reads a value that no longer has a producer."""

    name: ClassVar[str] = "break-graph"
    supports: ClassVar[frozenset[str]] = frozenset({"onnx"})

    def run_onnx(self, model):
        first = next(iter(model.graph))
        model.graph.remove(first)  # its consumer now reads an undefined value
        return PassResult(model, True, {})


def _onnx_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["y"], name="act"),
    ]
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32) - 6)
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _weights() -> np.ndarray:
    return np.arange(12, dtype=np.float32).reshape(4, 3) - 6


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return export.session(model, providers="cpu").run({"x": x})[0]


def _fx_model():
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    return module, capture(module, (torch.randn(2, 4),))


def test_optimize_fx_leaves_caller_graph_untouched():
    _, gm = _fx_model()
    before = [(n.name, n.target) for n in gm.graph.nodes]
    result = optimize(gm, [ReluToSigmoid()])
    assert result.modified and result.graph is not gm
    assert [(n.name, n.target) for n in gm.graph.nodes] == before
    x = -torch.ones(2, 4) * 10
    assert (gm(x) >= 0).all() and (result.graph(x) > 0).all()
    sig = [n for n in result.graph.graph.nodes if n.target == torch.ops.aten.sigmoid.default]
    assert sig and sig[0].meta["graphpress.pass"] == "relu-to-sigmoid"


def test_optimize_onnx_leaves_caller_model_untouched():
    model = load(_onnx_model())
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    expected = _run(model, x)
    result = optimize(model, [ReluToSigmoid()])
    assert [n.op_type for n in model.graph] == ["MatMul", "Relu"]
    np.testing.assert_array_equal(_run(model, x), expected)
    assert [n.op_type for n in result.graph.graph] == ["MatMul", "Sigmoid"]


def test_optimize_copy_false_rewrites_in_place():
    model = load(_onnx_model())
    result = optimize(model, [ReluToSigmoid()], copy=False)
    assert result.graph is model and model.graph.node(1).op_type == "Sigmoid"


def test_optimize_accepts_path_bytes_and_proto(tmp_path):
    proto = _onnx_model()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    original = path.read_bytes()
    for source in (path, str(path), proto.SerializeToString(), proto):
        result = optimize(source, [ReluToSigmoid()])
        assert result.graph.graph.node(1).op_type == "Sigmoid"
    assert path.read_bytes() == original


def test_report_records_counts_and_serialises():
    result = optimize(load(_onnx_model()), [ReluToSigmoid(), ReluToSigmoid()])
    first, second = result.report.records
    assert first.modified and not second.modified
    assert first.stats == {"rewritten": 1} and second.stats == {"rewritten": 0}
    assert first.before.nodes == first.after.nodes == 2
    assert first.before.params == 12 and first.before.bytes == 48
    assert result.report.compression_ratio == pytest.approx(1.0)
    data = json.loads(result.report.to_json())
    assert [p["name"] for p in data["passes"]] == ["relu-to-sigmoid"] * 2
    assert "relu-to-sigmoid" in str(result.report) and "2→2" in str(result.report)


def test_verify_each_catches_broken_graph_and_off_does_not():
    with pytest.raises(VerificationError, match="after pass .break-graph.*before it is defined"):
        optimize(load(_onnx_model()), [BreakGraph()])
    result = optimize(load(_onnx_model()), [BreakGraph()], verify="off")
    assert result.modified
    with pytest.raises(VerificationError):
        optimize(load(_onnx_model()), [BreakGraph()], verify="end")


def test_unsupported_kind_fails_before_any_pass_runs():
    _, gm = _fx_model()
    with pytest.raises(UnsupportedGraphError, match="break-graph.*onnx"):
        optimize(gm, [ReluToSigmoid(), BreakGraph()])


def test_non_canonical_fx_and_plain_module_are_refused():
    module, _ = _fx_model()
    with pytest.raises(PreconditionError, match="capture"):
        optimize(torch.fx.symbolic_trace(module), [ReluToSigmoid()])
    with pytest.raises(UnsupportedGraphError, match="capture"):
        optimize(module, [ReluToSigmoid()])
    with pytest.raises(UnsupportedGraphError):
        optimize(42, [ReluToSigmoid()])


def test_onnx_ir_passes_run_in_the_same_list():
    proto = _onnx_model()
    proto.graph.node.insert(0, helper.make_node("Identity", ["x"], ["unused"], name="dead"))
    model = load(proto)
    passes = [ReluToSigmoid(), ir.passes.common.RemoveUnusedNodesPass()]
    result = optimize(model, passes)
    assert [n.op_type for n in result.graph.graph] == ["MatMul", "Sigmoid"]
    assert result.report.records[1].spec == "onnx-ir:RemoveUnusedNodesPass"
    assert result.report.records[1].modified


def test_instruments_print_diff_dump_and_time(tmp_path):
    printed, diffs, timed = io.StringIO(), io.StringIO(), io.StringIO()
    timing = Timing(stream=timed)
    optimize(
        load(_onnx_model()),
        [ReluToSigmoid()],
        instruments=[PrintAfter(printed), DiffAfter(diffs), DumpIR(tmp_path), timing],
    )
    assert "Sigmoid" in printed.getvalue()
    assert "Relu" in diffs.getvalue() and "Sigmoid" in diffs.getvalue()
    dumped = sorted(p.name for p in tmp_path.iterdir())
    assert dumped == ["01-relu-to-sigmoid.onnx", "01-relu-to-sigmoid.txt"]
    assert load(tmp_path / "01-relu-to-sigmoid.onnx").graph.node(1).op_type == "Sigmoid"
    assert timing.seconds and timing.seconds[0][0] == "relu-to-sigmoid"
    assert "relu-to-sigmoid:" in timed.getvalue()


def test_graphpress_debug_env_switches_instruments(monkeypatch, tmp_path):
    found = from_env(f"print,diff,dump:{tmp_path},time")
    assert [type(i).__name__ for i in found] == ["PrintAfter", "DiffAfter", "DumpIR", "Timing"]
    monkeypatch.setenv("GRAPHPRESS_DEBUG", f"dump:{tmp_path / 'd'}")
    optimize(load(_onnx_model()), [ReluToSigmoid()])
    assert (tmp_path / "d" / "01-relu-to-sigmoid.txt").exists()
    with pytest.raises(Exception, match="unknown instrument 'prnt'"):
        from_env("prnt")


def test_pass_manager_rejects_bad_verify_mode():
    with pytest.raises(Exception, match="verify"):
        PassManager([ReluToSigmoid()], verify="sometimes")


def test_optimize_model_with_external_data_from_another_folder(tmp_path, monkeypatch):
    from graphpress.graph import io

    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 0)  # even the tiny weight goes external
    folder = tmp_path / "model"
    io.save(load(_onnx_model()), folder / "m.onnx", external_data=True)
    assert (folder / "m.onnx.data").stat().st_size == 48
    monkeypatch.chdir(tmp_path)  # the checker must not resolve data files against the cwd
    result = optimize(folder / "m.onnx", [ReluToSigmoid()])
    assert [n.op_type for n in result.graph.graph] == ["MatMul", "Sigmoid"]
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(_run(result.graph, x), 1 / (1 + np.exp(-(x @ _weights()))), rtol=1e-5)

"""``graphpress inspect --groups``: one line per coupled channel group, and JSON."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpress.cli import main


@pytest.fixture()
def mlp_path(tmp_path):
    """x[2,4] → MatMul(w1) → Add(b1) → Relu → MatMul(w2) → y[2,3]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w1", (4, 6)), ("b1", (6,)), ("w2", (6, 3)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    path = tmp_path / "mlp.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(proto), path)
    return path


def test_inspect_groups_prints_one_line_per_group(mlp_path, capsys):
    assert main(["inspect", "--groups", str(mlp_path)]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("channel groups:"):].splitlines()
    assert lines[0] == "channel groups: 2 (1 prunable)"
    assert lines[1].split() == ["fc1:out", "ffn", "6/1", "3", "uses", "prunable"]
    assert lines[2].split()[:5] == ["fc2:out", "linear", "3/1", "1", "uses"]
    assert lines[2].endswith("not prunable: reaches graph output 'y'")
    assert len(lines) == 3


def test_inspect_groups_json_and_default(mlp_path, capsys):
    assert main(["inspect", str(mlp_path), "--groups", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["channel_groups"]
    assert [(g["name"], g["size"], g["prunable"]) for g in groups] == [
        ("fc1:out", 6, True), ("fc2:out", 3, False)]
    assert {(u["node"], u["tensor"], u["axis"], u["role"]) for u in groups[0]["uses"]} == {
        ("fc1", "w1", 1, "out"), ("bias1", "b1", 0, "out"), ("fc2", "w2", 0, "in")}
    assert main(["inspect", str(mlp_path)]) == 0
    assert "channel groups" not in capsys.readouterr().out  # only when asked

"""``graphpress inspect --memory``: weights, activations, KV cache, top nodes; JSON; errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpress.cli import main
from graphpress.export import to_onnx
from graphpress.graph import capture, load, measure, save
from graphpress.graph.memory import estimate_memory


@pytest.fixture(scope="module")
def llama_path(llama_model, tmp_path_factory):
    model, inputs = llama_model
    path = tmp_path_factory.mktemp("memory") / "llama.onnx"
    save(to_onnx(capture(model, (), inputs), (), inputs), path)
    return path


@pytest.fixture()
def dynamic_mlp(tmp_path):
    """x[batch, 4] → MatMul(w1 [4, 6]) → Relu → MatMul(w2 [6, 3]) → y[batch, 3]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w1", (4, 6)), ("w2", (6, 3)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    path = tmp_path / "mlp.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(proto), path)
    return path


def test_inspect_memory_prints_estimate_and_top_nodes(llama_path, capsys):
    assert main(["inspect", "--memory", "--top", "3", str(llama_path)]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("memory at batch 2, seq 12:"):].splitlines()
    assert lines[1].split()[0] == "weights" and lines[2].split()[0] == "activations"
    assert lines[3].startswith("  kv cache") and "2 layers × 2 kv heads × 16 head dim" in lines[3]
    assert lines[3].split()[2:4] == ["12.00", "KiB"]  # 2·2·2·16·4 B·2·12 = 12288 B
    assert lines[5].startswith("flops: ")
    assert lines[6] == "top 3 nodes by FLOPs:" and len(lines) == 10
    assert lines[7].split()[:2] == ["node_linear_14", "MatMul"]  # the LM head: 2·24·256·64
    assert lines[7].split()[2:4] == ["786.43", "kFLOP"]


def test_inspect_memory_json_matches_the_library(llama_path, capsys):
    assert main(["inspect", str(llama_path), "--memory", "--json", "--kv-cache", "no"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    model = load(llama_path)
    expected = estimate_memory(model, kv_cache=False)
    assert memory["weights"] == measure(model).bytes == expected.weights
    assert memory["activations_peak"] == expected.activations_peak
    assert memory["kv_cache"] is None and memory["total"] == expected.total
    flops = [row["flops"] for row in memory["top_nodes"]]
    assert len(flops) == 10 and flops == sorted(flops, reverse=True)


def test_inspect_memory_binds_symbolic_dims(dynamic_mlp, capsys):
    assert main(["inspect", "--memory", str(dynamic_mlp)]) == 2
    assert "'batch'" in capsys.readouterr().err
    assert main(["inspect", "--memory", "--json", "--dim", "batch=5", str(dynamic_mlp)]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["dims"] == {"batch": 5} and memory["weights"] == (24 + 18) * 4
    # the caller holds x [5, 4] throughout; at act: x + h [5, 6] + r [5, 6]
    assert memory["activations_peak"] == 5 * (4 + 6 + 6) * 4
    assert memory["flops"] == 2 * 5 * 6 * 4 + 5 * 6 + 2 * 5 * 3 * 6


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch", "4"], "only used by --memory"),
    (["--memory", "--dim", "batch"], "NAME=N"),
    (["--memory", "--batch", "3"], "static batch of 2"),
])
def test_inspect_memory_errors_are_one_line(llama_path, capsys, argv, message):
    assert main(["inspect", *argv, str(llama_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("graphpress: error:") and message in err and "\n" not in err

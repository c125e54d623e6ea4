"""The CLI: each command works, and every bad input is one readable line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpress.cli import main


def _model_proto() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "w")
    nodes = [
        helper.make_node("Identity", ["x"], ["x1"], name="id"),
        helper.make_node("MatMul", ["x1", "w"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["y"], name="act"),
        helper.make_node("Sigmoid", ["h"], ["unused"], name="dead"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.fixture()
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_model_proto(), path)
    return path


def _run_ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("graphpress: error: ")
    return err[0]


def test_optimize_writes_model_report_and_keeps_input(model_path, tmp_path, capsys):
    before = model_path.read_bytes()
    out, report, js = tmp_path / "out.onnx", tmp_path / "r.html", tmp_path / "r.json"
    code = main(
        ["optimize", str(model_path), "-p", "eliminate-identity", "-p", "dce", "-o", str(out),
         "--report", str(report), "--json-report", str(js)]
    )
    assert code == 0
    assert model_path.read_bytes() == before
    optimised = onnx.load(out)
    assert [n.op_type for n in optimised.graph.node] == ["MatMul", "Relu"]
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(_run_ort(out, x), _run_ort(model_path, x), rtol=1e-6)
    assert "<table" in report.read_text() and "eliminate-identity" in report.read_text()
    assert [p["name"] for p in json.loads(js.read_text())["passes"]] == ["eliminate-identity", "dce"]
    assert "dce" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx", "r.html", "r.json"]


def test_inspect_and_diff_and_passes(model_path, tmp_path, capsys):
    assert main(["inspect", str(model_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["params"] == 12
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model_path), "-p", "dce", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["diff", str(model_path), str(out)]) == 0
    assert "Sigmoid" in capsys.readouterr().out
    assert main(["passes", "--json"]) == 0
    names = {p["name"] for p in json.loads(capsys.readouterr().out)}
    assert {"dce", "fold-constants", "eliminate-identity", "fold-batchnorm"} <= names


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: d / "missing.onnx", "no such file"),
        (lambda d: d, "is a folder"),
        (lambda d: _write(d / "notes.onnx", b"this is not a model\n"), "not a valid ONNX model"),
        (lambda d: _write(d / "cut.onnx", _model_proto().SerializeToString()[:60]), "not a valid ONNX"),
        (lambda d: _external(d, "../secret.bin"), "outside the model's folder"),
    ],
)
def test_bad_model_is_one_line_exit_2_and_no_output(tmp_path, capsys, make_input, message):
    source = make_input(tmp_path)
    snapshot = source.read_bytes() if source.is_file() else None
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(source), "-p", "dce", "-o", str(out)])
    assert code == 2
    assert message in _error_line(capsys)
    assert not out.exists()
    if snapshot is not None:
        assert source.read_bytes() == snapshot


@pytest.mark.parametrize(
    "spec, message",
    [("dcee", "did you mean 'dce'"), ("fold-constants:max_bytez=3", "did you mean 'max_bytes'")],
)
def test_unknown_pass_or_option_suggests(model_path, tmp_path, capsys, spec, message):
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model_path), "-p", spec, "-o", str(out)]) == 2
    assert message in _error_line(capsys)
    assert not out.exists()


def test_output_over_input_is_refused(model_path, capsys):
    before = model_path.read_bytes()
    assert main(["optimize", str(model_path), "-p", "dce", "-o", str(model_path)]) == 2
    assert "is the input model" in _error_line(capsys)
    assert model_path.read_bytes() == before


def test_usage_error_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["optimize"])
    assert info.value.code == 2
    assert _error_line(capsys)


def test_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "graphpress", "inspect", str(tmp_path / "nope.onnx")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("graphpress: error:") and "no such file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _external(folder, location: str):
    proto = _model_proto()
    tensor = proto.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "48")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (folder.parent / "secret.bin").write_bytes(b"\0" * 48)
    return _write(folder / "evil.onnx", proto.SerializeToString())


def test_optimize_with_calibration_file(model_path, tmp_path, capsys):
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32))
    out = tmp_path / "q.onnx"
    code = main(["optimize", str(model_path), "-p", "insert-qdq:keep_float=0,smoothquant=none",
                 "-o", str(out), "--calibration", str(data), "--calibration-batch", "2"])
    assert code == 0, capsys.readouterr().err
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_calibrating_pass_without_data_and_bad_calibration_file(model_path, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(model_path), "-p", "insert-qdq", "-o", str(out)]) == 2
    assert "calibration" in _error_line(capsys)
    bad = _write(tmp_path / "bad.npz", b"not a zip")
    assert main(["optimize", str(model_path), "-p", "insert-qdq", "-o", str(out),
                 "--calibration", str(bad)]) == 2
    assert "cannot read calibration data" in _error_line(capsys)
    assert not out.exists()


def test_clean_onnx_file_sample_runs(model_path, tmp_path):
    sample = Path(__file__).resolve().parents[2] / "samples" / "clean_onnx_file.py"
    out, report = tmp_path / "clean.onnx", tmp_path / "report.html"
    proc = subprocess.run([sys.executable, str(sample), str(model_path), str(out), str(report)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [n.op_type for n in onnx.load(out).graph.node] == ["MatMul", "Relu"]
    assert "<svg" in report.read_text() and "removed" in proc.stdout


def _mlp_path(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (8, 16)), ("b1", (16,)), ("w2", (16, 4)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
                              inits)
    path = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=10), path)
    return path


def test_prune_with_reconstruction_from_the_command_line(tmp_path, capsys):
    path, data = _mlp_path(tmp_path), tmp_path / "calib.npz"
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    np.savez(data, x=x)
    spec = "prune-channels:ratio=0.5,importance=activation,reconstruct=true"
    plain, refit = tmp_path / "plain.onnx", tmp_path / "refit.onnx"
    assert main(["optimize", str(path), "-p", spec.replace(",reconstruct=true", ""), "-o",
                 str(plain), "--calibration", str(data)]) == 0, capsys.readouterr().err
    assert main(["optimize", str(path), "-p", spec, "-o", str(refit), "--calibration",
                 str(data)]) == 0, capsys.readouterr().err
    shapes = {t.name: list(t.dims) for t in onnx.load(refit).graph.initializer}
    assert [8, 8] in shapes.values() and [8, 4] in shapes.values()  # 16 hidden units -> 8
    expected = _run_ort(path, x)
    plain_error = np.square(_run_ort(plain, x) - expected).mean()
    assert np.square(_run_ort(refit, x) - expected).mean() < 0.7 * plain_error
    assert main(["optimize", str(path), "-p", spec, "-o", str(tmp_path / "no.onnx")]) == 2
    assert "reconstruct=true needs calibration" in _error_line(capsys)

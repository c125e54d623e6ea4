"""The benchmark harness's metrics (benchmarks/_eval.py) on synthetic arrays and a tiny model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "_eval.py"
_spec = importlib.util.spec_from_file_location("bench_eval", _PATH)
ev = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ev)


def test_cosine_rows():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [4.0, -3.0]])
    np.testing.assert_allclose(ev.cosine_rows(a, b), [1.0, -1.0, 0.0], atol=1e-12)


def test_topk_identical_and_scaled_is_one():
    x = np.random.default_rng(0).normal(size=(40, 8))
    assert ev.topk_agreement(x, x, 5) == 1.0
    assert ev.topk_agreement(x, 3.0 * x, 5) == 1.0  # cosine ignores per-row scale


def test_topk_permutation_gives_expected_overlap():
    # 12 equally spaced directions on a quarter circle: with k=2, point i's neighbours are
    # i-1 and i+1 (0 -> {1, 2}, 11 -> {10, 9}). Swapping the embeddings of rows 0 and 11
    # empties those two rows' overlap, halves rows 1 and 10's, and leaves rows 2..9 intact:
    # (8 * 1 + 2 * 0.5 + 2 * 0) / 12 = 0.75.
    angles = np.linspace(0, np.pi / 2, 12)
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    y = x.copy()
    y[[0, 11]] = x[[11, 0]]
    assert ev.topk_agreement(x, y, 2) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        ev.topk_agreement(x[:2], y[:2], 2)


def test_model_bytes_counts_external_data(tmp_path):
    w = np.ones((256, 256), np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    inline, external = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(model, inline)
    onnx.save(model, external, save_as_external_data=True, location="b.onnx.data")
    assert ev.model_bytes(inline) == inline.stat().st_size > w.nbytes
    assert ev.model_bytes(external) > w.nbytes > external.stat().st_size
    sess = ev.session(inline)
    feed = {"x": np.ones((1, 256), np.float32)}
    med = ev.latencies({"a": sess}, feed, rounds=3, warmup=1)
    assert set(med) == {"a"} and med["a"] > 0

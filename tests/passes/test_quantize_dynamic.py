"""quantize-dynamic: golden op sequences, ORT numerics vs fp32, per-channel vs per-tensor,
exclusion, shared weights, no-op and precondition cases."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import graphpress as gp
from graphpress.graph import verify
from graphpress.passes.quantize.dynamic import QuantizeDynamic, quantize_blocks, quantize_int8

F = TensorProto.FLOAT


def _cos(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _mlp(h, rng, *, k=64, n=96):
    w1 = rng.normal(size=(k, n)).astype(np.float32) * 0.2
    w2 = rng.normal(size=(n, 16)).astype(np.float32) * 0.2
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
        helper.make_node("Gemm", ["r1", "w2t", "b2"], ["y"], name="fc2", transB=1),
    ]
    inits = {"w1": w1, "b1": rng.normal(size=n).astype(np.float32) * 0.1,
             "w2t": np.ascontiguousarray(w2.T), "b2": rng.normal(size=16).astype(np.float32)}
    return h.make_onnx(nodes, [("x", F, ["b", k])], [("y", F, ["b", 16])], inits)


def test_golden_ops_and_numerics(h):
    rng = np.random.default_rng(0)
    model = _mlp(h, rng)
    x = rng.normal(size=(32, 64)).astype(np.float32)
    before = h.onnx_snapshot(model)
    result = gp.optimize(model, ["quantize-dynamic"])
    assert h.onnx_snapshot(model) == before  # the caller's model is untouched
    assert result.modified
    assert h.onnx_ops(result.graph) == ["DynamicQuantizeMatMul", "Relu", "DynamicQuantizeMatMul"]
    assert result.report.records[-1].stats["biases_fused"] == 2
    verify(result.graph)
    ref, = h.ort_outputs(model, {"x": x})
    got, = h.ort_outputs(result.graph, {"x": x})
    assert _cos(ref, got) >= 0.999
    assert [v.name for v in result.graph.graph.outputs] == ["y"]
    node = next(iter(result.graph.graph))
    assert node.metadata_props["graphpress.pass"] == "quantize-dynamic"
    assert node.inputs[1].const_value.numpy().dtype == np.int8
    assert node.inputs[2].const_value.numpy().shape == (96,)  # per output column


def test_blockwise_matmulnbits(h):
    rng = np.random.default_rng(1)
    model = _mlp(h, rng, k=80)  # K = 80: not a multiple of the block, zero-padded
    x = rng.normal(size=(8, 80)).astype(np.float32)
    result = gp.optimize(model, ["quantize-dynamic:block_size=32,min_elements=16"])
    assert h.onnx_ops(result.graph) == ["MatMulNBits", "Relu", "MatMulNBits"]
    ref, = h.ort_outputs(model, {"x": x})
    got, = h.ort_outputs(result.graph, {"x": x})
    assert _cos(ref, got) >= 0.999


def test_asymmetric_weights(h):
    rng = np.random.default_rng(2)
    model = _mlp(h, rng)
    x = rng.normal(size=(16, 64)).astype(np.float32)
    for spec in ("quantize-dynamic:symmetric=false", "quantize-dynamic:symmetric=false,block_size=32"):
        result = gp.optimize(model, [spec])
        ref, = h.ort_outputs(model, {"x": x})
        got, = h.ort_outputs(result.graph, {"x": x})
        assert _cos(ref, got) >= 0.999, spec


def test_per_channel_beats_per_tensor(h):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(64, 96)).astype(np.float32) * np.logspace(-3, 0, 96, dtype=np.float32)
    model = h.make_onnx([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", F, ["b", 64])],
                        [("y", F, ["b", 96])], {"w": w})
    x = rng.normal(size=(64, 64)).astype(np.float32)
    ref, = h.ort_outputs(model, {"x": x})
    errors = {}
    for per_channel in (True, False):
        out = gp.optimize(model, [QuantizeDynamic(per_channel=per_channel)]).graph
        got, = h.ort_outputs(out, {"x": x})  # relative error per output column, averaged
        errors[per_channel] = float(np.mean(np.abs(got - ref).mean(0) / np.abs(ref).mean(0)))
    assert errors[True] < 0.5 * errors[False]


def test_exclusion_and_tiny_weights(h):
    rng = np.random.default_rng(4)
    model = _mlp(h, rng)
    result = gp.optimize(model, ["quantize-dynamic:exclude=fc2"])
    assert h.onnx_ops(result.graph) == ["DynamicQuantizeMatMul", "Relu", "Gemm"]
    result = gp.optimize(model, ["quantize-dynamic:exclude=w1|fc*"])
    assert result.modified is False
    result = gp.optimize(model, ["quantize-dynamic:min_elements=2000"])  # 96*16 = 1536 < 2000
    assert h.onnx_ops(result.graph) == ["DynamicQuantizeMatMul", "Relu", "Gemm"]


def test_no_constant_matmul_is_noop(h):
    model = h.make_onnx([helper.make_node("MatMul", ["x", "w"], ["y"])],
                        [("x", F, [4, 64]), ("w", F, [64, 64])], [("y", F, [4, 64])])
    result = gp.optimize(model, ["quantize-dynamic"])
    assert result.modified is False
    assert h.onnx_ops(result.graph) == ["MatMul"]


def test_weight_with_float_use_stays_and_embedding_gathers(h):
    rng = np.random.default_rng(5)
    table = rng.normal(size=(100, 32)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["m"], name="proj"),
             helper.make_node("Mul", ["w", "w"], ["w2"], name="square")]  # a float use of w
    model = h.make_onnx(nodes, [("ids", TensorProto.INT64, [2, 5])],
                        [("m", F, [2, 5, 48]), ("w2", F, [32, 48])],
                        {"emb": table, "w": rng.normal(size=(32, 48)).astype(np.float32)})
    result = gp.optimize(model, ["quantize-dynamic:min_elements=64"])
    ops = h.onnx_ops(result.graph)
    assert "DynamicQuantizeMatMul" not in ops and "MatMul" in ops  # never grows the model
    assert ops.count("Gather") == 2 and "Cast" in ops  # rows, then scales
    ids = rng.integers(0, 100, size=(2, 5)).astype(np.int64)
    ref = h.ort_outputs(model, {"ids": ids})
    got = h.ort_outputs(result.graph, {"ids": ids})
    assert _cos(ref[0], got[0]) >= 0.9995
    np.testing.assert_array_equal(ref[1], got[1])


def test_quantize_math():
    w = np.array([[1.0, -2.0], [0.5, 4.0]], dtype=np.float32)
    q, scale, zero = quantize_int8(w, axis=1, symmetric=True)
    assert zero is None and np.allclose(scale, [1 / 127, 4 / 127])
    assert q.tolist() == [[127, -64], [64, 127]]
    q, scale, zero = quantize_int8(w, axis=None, symmetric=False)
    assert np.abs((q.astype(np.float64) - zero) * scale - w).max() <= scale / 2 + 1e-7
    q8, s8, z8 = quantize_blocks(np.ones((40, 3), np.float32), 16, symmetric=True)
    assert q8.shape == (3, 3, 16) and s8.shape == (9,) and z8 is None
    assert (q8[:, 2, 8:] == 128).all()  # padding rows quantize to the zero point


def test_spec_errors_and_fx_unsupported(h):
    with pytest.raises(gp.PassSpecError):
        gp.passes.registry.from_spec("quantize-dynamic:block_size=24")
    import torch

    gm = gp.capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(gp.PreconditionError, match="ONNX-only"):  # FX: block_size=0 only
        gp.optimize(gm, ["quantize-dynamic:block_size=32"])

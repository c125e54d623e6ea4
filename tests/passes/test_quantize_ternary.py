"""Tests of ``quantize-ternary``: BitNet b1.58 absmean values, 2-bit MatMulNBits in ORT against
the numpy reference, FX simulation, sharing and no-op cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from graphpress.graph import capture, verify
from graphpress.graph.analysis import measure
from graphpress.graph.errors import PassSpecError
from graphpress.passes import from_spec, optimize
from graphpress.passes.quantize._blockwise import ternary

F = TensorProto.FLOAT
RNG = np.random.default_rng(1)


@pytest.mark.parametrize("per_channel", [False, True])
def test_ternary_values_are_gamma_times_sign(per_channel):
    w = RNG.normal(size=(8, 100))
    bq = ternary(w, 32, per_channel=per_channel)
    deq = bq.dequantize()
    gamma = np.repeat(bq.scales, 32, axis=1)[:, :100]
    assert set(np.unique(np.round(deq / gamma, 6))) <= {-1.0, 0.0, 1.0}
    if per_channel:
        np.testing.assert_allclose(bq.scales[:, 0], np.abs(w).mean(1), rtol=1e-3)  # γ rounded to fp16
    else:
        np.testing.assert_allclose(bq.scales[:, 0], np.abs(w[:, :32]).mean(1), rtol=1e-3)  # γ rounded to fp16
        np.testing.assert_allclose(bq.scales[:, -1], np.abs(w[:, 96:]).mean(1), rtol=1e-3)  # γ rounded to fp16
    assert set(np.unique(bq.q[:, :100])) <= {1, 2, 3}


@pytest.mark.parametrize("k", [128, 300])
def test_ternary_onnx_matches_numpy(h, k):
    w = RNG.normal(size=(k, 40)).astype(np.float32)
    model = h.make_onnx([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", F, [4, k])],
                        [("y", F, [4, 40])], {"w": w})
    result = optimize(model, ["quantize-ternary"])
    out = result.graph
    assert h.onnx_ops(out) == ["Reshape", "Cast", "MatMulNBits"]
    node = next(n for n in out.graph if n.op_type == "MatMulNBits")
    assert node.attributes["bits"].value == 2
    verify(out)
    x = RNG.normal(size=(4, k)).astype(np.float32)
    (got,) = h.ort_outputs(out, {"x": x})
    np.testing.assert_allclose(got, x @ ternary(w.T, 64).dequantize().T, rtol=1e-4, atol=1e-4)
    stats = result.report.records[0].stats
    assert 0.3 < stats["weight_error_mean"] < 0.7  # honest: post-training ternary loses a lot
    assert measure(out).bytes < measure(model).bytes / 10


def test_ternary_fx_and_noop(h):
    model, x = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval(), torch.randn(3, 64)
    gm = capture(model, (x,))
    out = optimize(gm, ["quantize-ternary:block_size=32"]).graph
    verify(out)
    with torch.no_grad():
        expected = x
        for layer in (model[0], model[2]):
            deq = torch.from_numpy(ternary(layer.weight.numpy(), 32).dequantize())
            expected = expected @ deq.T + layer.bias
            expected = torch.relu(expected) if layer is model[0] else expected
        torch.testing.assert_close(out(x), expected, rtol=1e-4, atol=1e-4)
    plain = h.make_onnx([helper.make_node("Relu", ["x"], ["y"])], [("x", F, [2, 4])],
                        [("y", F, [2, 4])])
    assert optimize(plain, ["quantize-ternary"]).modified is False
    with pytest.raises(PassSpecError):
        from_spec("quantize-ternary:block_size=100")

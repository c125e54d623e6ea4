"""``avoid-skip-layernorm``: residual Add → LayerNormalization written as Sum, bitwise equal."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphpress.graph.errors import UnsupportedGraphError
from graphpress.passes import optimize
from graphpress.passes.cpu_layernorm import AvoidSkipLayerNorm

F = TensorProto.FLOAT


def _block(h):
    """x → MatMul + bias (constant Add, kept) → residual Add (rewritten) → LayerNorm → output;
    the residual sum is also a graph output (its name must survive)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "b"], ["lin"]),
             helper.make_node("Add", ["lin", "x"], ["res"]),
             helper.make_node("LayerNormalization", ["res", "g", "beta"], ["y"], axis=-1)]
    inits = {"w": rng.standard_normal((8, 8)).astype(np.float32),
             "b": rng.standard_normal(8).astype(np.float32),
             "g": rng.standard_normal(8).astype(np.float32),
             "beta": rng.standard_normal(8).astype(np.float32)}
    return h.make_onnx(nodes, [("x", F, [2, 3, 8])], [("y", F, [2, 3, 8]), ("res", F, [2, 3, 8])],
                       inits)


def test_residual_add_becomes_sum_bitwise(h):
    model = _block(h)
    result = optimize(model, ["avoid-skip-layernorm"])
    assert h.onnx_ops(result.graph) == ["MatMul", "Add", "Sum", "LayerNormalization"]
    assert h.onnx_ops(model) == ["MatMul", "Add", "Add", "LayerNormalization"]  # caller's
    assert result.report.records[0].stats["adds_rewritten"] == 1
    assert [o.name for o in result.graph.graph.outputs] == ["y", "res"]
    x = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    for got, want in zip(h.ort_outputs(result.graph, {"x": x}), h.ort_outputs(model, {"x": x})):
        np.testing.assert_array_equal(got, want)


def test_bias_adds_and_graphs_without_layernorm_are_left_alone(h):
    nodes = [helper.make_node("Add", ["x", "x"], ["y"])]
    model = h.make_onnx(nodes, [("x", F, [4])], [("y", F, [4])])
    assert not optimize(model, ["avoid-skip-layernorm"]).modified


def test_fx_graphs_are_refused():
    import torch

    from graphpress.graph import capture

    with pytest.raises(UnsupportedGraphError):
        AvoidSkipLayerNorm()(capture(torch.nn.Linear(2, 2), (torch.randn(1, 2),)))

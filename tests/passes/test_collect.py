"""passes._collect: streaming intermediate values for calibration (FX and ONNX)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from graphpress import capture, load
from graphpress.graph import PreconditionError
from graphpress.passes._collect import as_batches, call_arguments, collect


def _onnx():
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) - 5, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return load(model), numpy_helper.to_array(w)


@pytest.mark.parametrize("chunk_size", [1, 64])
def test_onnx_values_match_numpy_for_dict_and_tuple_batches(chunk_size):
    model, w = _onnx()
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((2, 4)).astype(np.float32)},
               (rng.standard_normal((5, 4)).astype(np.float32),)]
    got: dict[str, list] = {}
    collect(model, batches, ["h", "y", "x"], lambda n, a: got.setdefault(n, []).append(a),
            chunk_size=chunk_size)
    xs = [batches[0]["x"], batches[1][0]]
    for index, x in enumerate(xs):
        np.testing.assert_allclose(got["h"][index], x @ w, rtol=1e-6)
        np.testing.assert_allclose(got["y"][index], np.maximum(x @ w, 0), rtol=1e-6)
        np.testing.assert_array_equal(got["x"][index], x)
    assert [o.name for o in model.graph.outputs] == ["y"]  # the caller's model is untouched


def test_fx_values_match_eager():
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    gm = capture(module, (torch.randn(2, 4),))
    names = [n.name for n in gm.graph.nodes if n.op == "call_function"]
    x = torch.randn(2, 4)
    got: dict[str, np.ndarray] = {}
    collect(gm, [(x,)], names, lambda n, a: got.__setitem__(n, a))
    linear = next(n for n in names if "linear" in n)
    np.testing.assert_allclose(got[linear], module[0](x).detach().numpy(), rtol=1e-6)


class _Masked(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x, *, scale):
        return torch.relu(self.linear(x)) * scale


def test_fx_graph_captured_with_args_and_kwargs_takes_pairs():
    module = _Masked().eval()
    x, scale = torch.randn(2, 4), torch.rand(2, 1)
    gm = capture(module, (x,), {"scale": scale})
    linear = next(n.name for n in gm.graph.nodes if "linear" in n.name and n.op != "get_attr")
    got: dict[str, np.ndarray] = {}
    collect(gm, [((x,), {"scale": scale})], [linear], lambda n, a: got.__setitem__(n, a))
    np.testing.assert_allclose(got[linear], module.linear(x).detach().numpy(), rtol=1e-6)
    assert call_arguments([x]) == ((x,), {}) and call_arguments({"x": x}) == ((), {"x": x})


def test_bad_batches_and_names_are_precondition_errors():
    model, _ = _onnx()
    with pytest.raises(PreconditionError, match="no batches"):
        as_batches([])
    with pytest.raises(PreconditionError, match="tuple of inputs"):
        as_batches([np.zeros(3)])
    with pytest.raises(PreconditionError, match="no values named"):
        collect(model, [{"x": np.zeros((1, 4), np.float32)}], ["nope"], lambda n, a: None)
    with pytest.raises(PreconditionError, match="lacks model inputs"):
        collect(model, [{"z": np.zeros((1, 4), np.float32)}], ["h"], lambda n, a: None)

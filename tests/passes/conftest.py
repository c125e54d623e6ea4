"""Small shared helpers for the pass tests, handed to tests as the session fixture ``h``:
build ONNX models, run them in ONNX Runtime, list op sequences, snapshot a graph to prove the
caller's copy is not mutated, and give batch norms non-trivial statistics."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from graphpress.graph import op_name

OPSET = 18


def make_onnx(nodes, inputs, outputs, initializers=(), *, infer=True, opset=OPSET) -> ir.Model:
    """An ``onnx_ir.Model`` from ``onnx.helper`` nodes; ``inputs``/``outputs`` are
    ``(name, elem_type, shape)`` triples and ``initializers`` maps names to arrays."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(*spec) for spec in inputs],
        [helper.make_tensor_value_info(*spec) for spec in outputs],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in dict(initializers).items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(proto)
    if infer:  # value dtypes/shapes, as real exporters provide them
        proto = onnx.shape_inference.infer_shapes(proto)
    return ir.serde.deserialize_model(proto)


def ort_outputs(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = ir.serde.serialize_model(model).SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def onnx_ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def fx_ops(gm: torch.fx.GraphModule) -> list[str]:
    return [op_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_module")]


def fx_snapshot(gm: torch.fx.GraphModule) -> tuple:
    """Code, tensor identities and values: everything a pass could wrongly change."""
    state = {k: (id(v), v.detach().clone()) for k, v in gm.state_dict(keep_vars=True).items()}
    return gm.code, state


def assert_fx_unchanged(gm: torch.fx.GraphModule, snapshot: tuple) -> None:
    code, state = snapshot
    assert gm.code == code
    now = gm.state_dict(keep_vars=True)
    assert set(now) == set(state)
    for key, (ident, value) in state.items():
        assert id(now[key]) == ident and torch.equal(now[key], value), key


def onnx_snapshot(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def randomize_bn(module: torch.nn.Module) -> torch.nn.Module:
    """Give every batch norm non-trivial statistics and affine parameters (in place)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                if m.affine:
                    m.weight.uniform_(0.5, 2)
                    m.bias.uniform_(-1, 1)
    return module.eval()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def graph_of(model: torch.nn.Module, x: torch.Tensor, ir_kind: str):
    """``model`` captured to FX (``ir_kind="fx"``) or captured and exported to ONNX."""
    from graphpress.export import to_onnx
    from graphpress.graph import capture

    gm = capture(model, (x,))
    return gm if ir_kind == "fx" else to_onnx(gm, (x,))


def run_graph(graph, x: torch.Tensor) -> np.ndarray:
    """The first output of an FX graph (eager) or an ONNX model (ORT) on one input."""
    if isinstance(graph, torch.fx.GraphModule):
        with torch.no_grad():
            return graph(x).numpy()
    return ort_outputs(graph, {graph.graph.inputs[0].name: x.numpy()})[0]


@pytest.fixture(scope="session")
def h() -> SimpleNamespace:
    return SimpleNamespace(
        make_onnx=make_onnx,
        ort_outputs=ort_outputs,
        onnx_ops=onnx_ops,
        fx_ops=fx_ops,
        fx_snapshot=fx_snapshot,
        assert_fx_unchanged=assert_fx_unchanged,
        onnx_snapshot=onnx_snapshot,
        randomize_bn=randomize_bn,
        graph_of=graph_of,
        run_graph=run_graph,
    )

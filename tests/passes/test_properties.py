"""Property tests: on random small graphs, running all four passes keeps the outputs equal.

FX: random stacks of Conv/BatchNorm/Dropout/Identity/ReLU/residual blocks/constant
subexpressions, then Linear/BatchNorm1d/... on the pooled features, captured with
``graphpress.graph.capture``; eager PyTorch vs the rewritten GraphModule. ONNX: random graphs
with Identity, Dropout, same-dtype Cast, constant subexpressions, dead branches and
BatchNormalization after Conv/Gemm/MatMul; ONNX Runtime before vs after.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from graphpress.graph import capture
from graphpress.passes import optimize

PASSES = ["fold-batchnorm", "eliminate-identity", "fold-constants", "dce"]
SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
F = TensorProto.FLOAT

# ----------------------------------------------------------------------------- FX

CONV_OPS = ["conv1", "conv3", "convbn", "bn", "drop", "id", "relu", "res", "const"]
DENSE_OPS = ["linear", "linearbn", "bn", "drop", "id", "relu", "res", "const"]


class Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


class ConstantAdd(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("k", torch.rand(shape) + 0.5)

    def forward(self, x):
        return x + (self.k * 2).sqrt() - torch.ones(self.k.shape) * 0.5


def _conv_layer(op: str, c: int, width: int) -> tuple[nn.Module, int]:
    if op == "conv1":
        return nn.Conv2d(c, width, 1), width
    if op == "conv3":
        return nn.Conv2d(c, width, 3, padding=1, bias=False), width
    if op == "convbn":
        return nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width)), width
    if op == "bn":
        return nn.BatchNorm2d(c), c
    if op == "res":
        return Residual(nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))), c
    if op == "const":
        return ConstantAdd((c, 1, 1)), c
    return {"drop": nn.Dropout(0.3), "id": nn.Identity(), "relu": nn.ReLU()}[op], c


def _dense_layer(op: str, c: int, width: int) -> tuple[nn.Module, int]:
    if op == "linear":
        return nn.Linear(c, width), width
    if op == "linearbn":
        return nn.Sequential(nn.Linear(c, width), nn.BatchNorm1d(width)), width
    if op == "bn":
        return nn.BatchNorm1d(c), c
    if op == "res":
        return Residual(nn.Sequential(nn.Linear(c, c), nn.BatchNorm1d(c))), c
    if op == "const":
        return ConstantAdd((c,)), c
    return {"drop": nn.Dropout(0.3), "id": nn.Identity(), "relu": nn.ReLU()}[op], c


class Pool(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


@SETTINGS
@given(
    conv_ops=st.lists(st.tuples(st.sampled_from(CONV_OPS), st.integers(1, 5)), max_size=5),
    dense_ops=st.lists(st.tuples(st.sampled_from(DENSE_OPS), st.integers(1, 5)), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_fx_passes_preserve_outputs(h, conv_ops, dense_ops, seed):
    torch.manual_seed(seed)
    layers, c = [], 3
    for op, width in conv_ops:
        layer, c = _conv_layer(op, c, width)
        layers.append(layer)
    layers.append(Pool())
    for op, width in dense_ops:
        layer, c = _dense_layer(op, c, width)
        layers.append(layer)
    model = h.randomize_bn(nn.Sequential(*layers))
    x = torch.randn(2, 3, 5, 5)
    gm = capture(model, (x,))
    snapshot = h.fx_snapshot(gm)
    result = optimize(gm, PASSES)
    ops = h.fx_ops(result.graph)
    assert not any(op in ops for op in ("aten.dropout", "aten.clone", "aten.detach"))
    with torch.no_grad():
        torch.testing.assert_close(result.graph(x), model(x), rtol=1e-5, atol=1e-5)
    h.assert_fx_unchanged(gm, snapshot)


# ----------------------------------------------------------------------------- ONNX

ONNX_OPS = ["identity", "dropout", "cast", "const", "dead", "convbn", "conv", "relu"]
HEADS = ["gemmbn", "gemm_t_bn", "matmuladdbn", "matmulbn", "none"]


class _Builder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.nodes, self.inits, self.count = rng, [], {}, 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def init(self, array: np.ndarray) -> str:
        name = self.name("w")
        self.inits[name] = np.asarray(array, dtype=np.float32)
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def bn(self, v: str, c: int) -> str:
        r = self.rng
        params = [r.uniform(0.5, 2, c), r.normal(size=c), r.normal(size=c), r.uniform(0.5, 2, c)]
        return self.node("BatchNormalization", [v, *map(self.init, params)],
                         epsilon=float(r.choice([1e-5, 1e-3])))


def _onnx_model(h, ops, head, seed):
    b, c = _Builder(np.random.default_rng(seed)), 3
    r, v = b.rng, "x"
    for op, width in ops:
        if op == "identity":
            v = b.node("Identity", [v])
        elif op == "dropout":
            v = b.node("Dropout", [v])
        elif op == "cast":
            v = b.node("Cast", [v], to=F)
        elif op == "relu":
            v = b.node("Relu", [v])
        elif op == "const":  # Sqrt(k * k) + 1 with k a Constant node
            k = b.name("k")
            b.nodes.append(helper.make_node("Constant", [], [k], value=numpy_helper.from_array(
                r.normal(size=(c, 1, 1)).astype(np.float32))))
            folded = b.node("Add", [b.node("Sqrt", [b.node("Mul", [k, k])]), b.init(np.ones(1))])
            v = b.node("Add", [v, folded])
        elif op == "dead":
            b.node("Neg", [b.node("Relu", [v])])
        else:  # conv / convbn
            v = b.node("Conv", [v, b.init(r.normal(size=(width, c, 3, 3)) * 0.3), b.init(r.normal(size=width))],
                       pads=[1, 1, 1, 1])
            c = width
            if op == "convbn":
                v = b.bn(v, c)
    v = b.node("ReduceMean", [v, "axes"], keepdims=0)
    b.inits["axes"] = np.int64([2, 3])
    if head in ("gemmbn", "gemm_t_bn"):
        trans = head == "gemm_t_bn"
        w = b.init(r.normal(size=(4, c) if trans else (c, 4)))
        v = b.bn(b.node("Gemm", [v, w, b.init(r.normal(size=4))], transB=int(trans),
                        alpha=float(r.uniform(0.5, 2)), beta=float(r.uniform(0.5, 2))), 4)
    elif head in ("matmuladdbn", "matmulbn"):
        v = b.node("MatMul", [v, b.init(r.normal(size=(c, 4)))])
        if head == "matmuladdbn":
            v = b.node("Add", [v, b.init(r.normal(size=4))])
        v = b.bn(v, 4)
    b.nodes.append(helper.make_node("Identity", [v], ["y"]))
    b.inits = {k: (a if k == "axes" else a.astype(np.float32)) for k, a in b.inits.items()}
    width = c if head == "none" else 4
    return h.make_onnx(b.nodes, [("x", F, [2, 3, 5, 5])], [("y", F, [2, width])], b.inits)


@SETTINGS
@given(
    ops=st.lists(st.tuples(st.sampled_from(ONNX_OPS), st.integers(1, 5)), max_size=7),
    head=st.sampled_from(HEADS),
    seed=st.integers(0, 2**16),
)
def test_onnx_passes_preserve_outputs(h, ops, head, seed):
    model = _onnx_model(h, ops, head, seed)
    x = np.random.default_rng(seed).normal(size=(2, 3, 5, 5)).astype(np.float32)
    snapshot = h.onnx_snapshot(model)
    result = optimize(model, PASSES)
    out = result.graph
    remaining = h.onnx_ops(out)
    # every batch norm here follows a Conv/Gemm/MatMul(+Add) with no other user: all fold
    assert not {"Identity", "Dropout", "Cast", "Mul", "Sqrt", "Neg", "BatchNormalization"} & set(
        remaining)
    assert [v.name for v in out.graph.outputs] == ["y"]
    np.testing.assert_allclose(h.ort_outputs(out, {"x": x})[0], h.ort_outputs(model, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
    assert h.onnx_snapshot(model) == snapshot

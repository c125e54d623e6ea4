"""Tests of the fold passes: ``fold-constants`` and ``fold-batchnorm``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from graphpress.graph import capture, verify
from graphpress.graph.errors import PassSpecError, PreconditionError, UnsupportedGraphError
from graphpress.graph.fx import PROVENANCE
from graphpress.passes import from_spec, optimize
from graphpress.passes.fold import FoldBatchNorm, FoldConstants

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)
X = RNG.normal(size=(2, 4)).astype(np.float32)


def _f32(*shape, low=None, high=None):
    if low is not None:
        return RNG.uniform(low, high, size=shape).astype(np.float32)
    return RNG.normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------- fold-constants, FX


class ConstantMath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("k", torch.arange(4.0))

    def forward(self, x):
        scale = (self.k * 2 + 1).sqrt()  # constant subexpression: folds to one tensor
        big = torch.ones(4).expand(256, 4)  # grows 256x to 4 KiB: must not fold
        return self.fc(x) * scale + big.sum(0)


def test_fold_constants_fx_structure_numerics(h):
    model, x = ConstantMath(), torch.from_numpy(X)
    gm = capture(model, (x,))
    snapshot = h.fx_snapshot(gm)
    result = optimize(gm, ["fold-constants"])
    out = result.graph
    assert h.fx_ops(out) == [  # the tiny aten.ones folds, the 256x expand does not
        "call_module:_guards_fn", "aten.expand", "aten.linear", "aten.mul", "aten.sum", "aten.add",
    ]
    stats = result.report.records[0].stats
    assert stats["nodes_folded"] == 4 and stats["attributes_removed"] == 1  # mul, add, sqrt, ones; k
    new = [n for n in out.graph.nodes if n.meta.get(PROVENANCE) == "fold-constants"]
    assert sorted(n.target for n in new) == ["ones_fold_value", "sqrt_fold_value"]
    assert "k" not in dict(out.named_buffers())
    torch.testing.assert_close(out(x), model(x))
    verify(out)
    h.assert_fx_unchanged(gm, snapshot)


def test_fold_constants_fx_respects_size_limits(h):
    gm = capture(ConstantMath(), (torch.from_numpy(X),))
    assert FoldConstants(max_bytes=0)(gm).modified is False
    gm = capture(ConstantMath(), (torch.from_numpy(X),))
    FoldConstants(max_growth=1000.0)(gm)  # now the expand (and its sum) fold as well
    assert "aten.expand" not in h.fx_ops(gm) and "aten.sum" not in h.fx_ops(gm)


def test_fold_constants_fx_skips_random_and_noop(h):
    class Random(nn.Module):
        def forward(self, x):
            return x + torch.rand(4) * 0

    gm = capture(Random(), (torch.from_numpy(X),))
    assert FoldConstants()(gm).modified is False
    assert "aten.rand" in h.fx_ops(gm)
    gm = capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.from_numpy(X),))
    assert FoldConstants()(gm).modified is False


def test_fold_constants_fx_keeps_tensors_written_in_place(h):
    class Accumulate(nn.Module):
        def forward(self, x):
            z = torch.zeros(4)  # constant, but add_ writes it: folding would persist the write
            z.add_(x)
            return z * 1

    model, x = Accumulate(), torch.randn(4)
    gm = capture(model, (x,))
    assert FoldConstants()(gm).modified is False
    for _ in range(2):
        torch.testing.assert_close(gm(x), model(x))


# ----------------------------------------------------------------------------- fold-constants, ONNX


def _constant_chain_model(h):
    k = numpy_helper.from_array(np.float32([2.0, 3.0, 4.0, 5.0]))
    return h.make_onnx(
        [
            helper.make_node("Constant", [], ["k"], value=k),
            helper.make_node("Mul", ["k", "k"], ["k2"]),
            helper.make_node("Sqrt", ["k2"], ["k3"]),
            helper.make_node("Add", ["x", "k3"], ["y"]),
            helper.make_node("Neg", ["k3"], ["negk"]),  # a constant graph output
        ],
        [("x", F, [2, 4])], [("y", F, [2, 4]), ("negk", F, [4])],
    )


def test_fold_constants_onnx_structure_numerics(h):
    model = _constant_chain_model(h)
    snapshot = h.onnx_snapshot(model)
    result = optimize(model, ["fold-constants"])
    out = result.graph
    assert h.onnx_ops(out) == ["Add"]
    assert sorted(out.graph.initializers) == ["k3.fold.value", "negk"]
    assert [v.name for v in out.graph.outputs] == ["y", "negk"]
    init = out.graph.initializers["k3.fold.value"]
    assert init.metadata_props["graphpress.pass"] == "fold-constants"
    assert result.report.records[0].stats == {
        "nodes_folded": 3, "initializers_added": 2, "constants_removed": 1,
    }
    for got, want in zip(h.ort_outputs(out, {"x": X}), h.ort_outputs(model, {"x": X})):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    verify(out)
    assert h.onnx_snapshot(model) == snapshot


def test_fold_constants_onnx_skips_unsafe_nodes(h):
    model = h.make_onnx(
        [
            helper.make_node("Expand", ["one", "shape"], ["big"]),  # 256x growth to 4 KiB
            helper.make_node("RandomNormal", [], ["noise"], shape=[4]),
            helper.make_node("DequantizeLinear", ["q", "scale"], ["dq"]),
            helper.make_node("Neg", ["opt"], ["n"]),  # overridable initializer: not constant
            helper.make_node("Add", ["x", "dq"], ["a"]),
            helper.make_node("Add", ["a", "n"], ["b"]),
            helper.make_node("Add", ["b", "noise"], ["c"]),
            helper.make_node("Add", ["c", "big"], ["y"]),
        ],
        [("x", F, [256, 4]), ("opt", F, [4])], [("y", F, [256, 4])],
        {"one": np.ones(4, np.float32), "shape": np.int64([256, 4]), "scale": np.float32(0.5),
         "q": np.arange(4, dtype=np.int8), "opt": np.zeros(4, np.float32)},
    )
    result = FoldConstants()(model)
    assert result.modified is False
    assert len(model.graph) == 8


def test_fold_constants_onnx_in_subgraph(h):
    then = helper.make_graph(
        [helper.make_node("Mul", ["k3", "two"], ["k6"]),  # outer folded value * inner constant
         helper.make_node("Add", ["x", "k6"], ["t"])],
        "then", [], [helper.make_tensor_value_info("t", F, [2, 4])],
        [numpy_helper.from_array(np.float32(2.0), "two")],
    )
    other = helper.make_graph([helper.make_node("Sub", ["x", "k3"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", F, [2, 4])])  # outer k3
    model = h.make_onnx(
        [helper.make_node("Add", ["k", "k"], ["k3"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        [("x", F, [2, 4]), ("cond", TensorProto.BOOL, [])], [("y", F, [2, 4])],
        {"k": np.float32([1, 2, 3, 4])},
    )
    result = FoldConstants()(model)
    assert result.stats["nodes_folded"] == 2
    assert h.onnx_ops(model) == ["If"]
    branch = model.graph[0].attributes["then_branch"].value
    assert [n.op_type for n in branch] == ["Add"] and "k6.fold.value" in branch.initializers
    assert list(model.graph.initializers) == ["k3.fold.value"]  # k is gone; k3 stays outside
    verify(model)
    for cond, want in ((True, X + np.float32([4, 8, 12, 16])), (False, X - np.float32([2, 4, 6, 8]))):
        got = h.ort_outputs(model, {"x": X, "cond": np.array(cond)})[0]
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_fold_constants_onnx_noop(h):
    model = h.make_onnx([helper.make_node("Add", ["x", "b"], ["y"])], [("x", F, [2, 4])],
                        [("y", F, [2, 4])], {"b": np.ones(4, np.float32)})
    assert FoldConstants()(model).modified is False


def test_fold_constants_options():
    assert from_spec("fold-constants:max_bytes=1024").max_bytes == 1024
    with pytest.raises(PassSpecError):
        from_spec("fold-constants:max_bytes=-1")
    with pytest.raises(PassSpecError):
        FoldConstants(max_growth=-1.0)


# ----------------------------------------------------------------------------- fold-batchnorm, FX


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize(
    ("conv", "bn", "shape", "layer_op"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), (2, 3, 8, 8), "aten.conv2d"),
        (nn.Conv1d(3, 8, 3, bias=False, groups=1), nn.BatchNorm1d(8), (2, 3, 16), "aten.conv1d"),
        (nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8, affine=False), (2, 4, 8, 8), "aten.conv2d"),
        (nn.Linear(6, 5), nn.BatchNorm1d(5), (4, 6), "aten.linear"),
    ],
)
def test_fold_batchnorm_fx(h, conv, bn, shape, layer_op):
    model = h.randomize_bn(ConvBN(conv, bn))
    x = torch.randn(*shape)
    gm = capture(model, (x,))
    snapshot = h.fx_snapshot(gm)
    result = optimize(gm, ["fold-batchnorm", "dce"])
    out = result.graph
    assert h.fx_ops(out) == ["call_module:_guards_fn", layer_op, "aten.relu"]
    assert result.report.records[0].stats["batchnorms_folded"] == 1
    buffers = dict(out.named_buffers())
    assert {"conv_weight_bnfold_weight", "conv_weight_bnfold_bias"} <= set(buffers)
    assert not any(name.startswith("bn.") for name in buffers)
    new = [n for n in out.graph.nodes if n.meta.get(PROVENANCE) == "fold-batchnorm"]
    assert len(new) == 2
    torch.testing.assert_close(out(x), model(x), rtol=1e-5, atol=1e-5)
    verify(out)
    h.assert_fx_unchanged(gm, snapshot)


@pytest.mark.parametrize("layer_op", ["aten.conv2d", "aten.convolution"])
def test_fold_batchnorm_fx_decomposed_dialect(h, layer_op):
    """After run_decompositions: ``_native_batch_norm_legit_no_training`` + ``getitem``."""
    model = h.randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(1, 3, 6, 6)
    program = torch.export.export(model, (x,), strict=False)
    # an empty table keeps aten.conv2d; the default one lowers it to aten.convolution
    program = program.run_decompositions({}) if layer_op == "aten.conv2d" else program.run_decompositions()
    gm = program.module()
    assert "aten._native_batch_norm_legit_no_training" in h.fx_ops(gm)
    result = optimize(gm, ["fold-batchnorm", "dce"])
    assert h.fx_ops(result.graph) == ["call_module:_guards_fn", layer_op, "aten.relu"]
    torch.testing.assert_close(result.graph(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_fx_refuses_unsafe_patterns(h):
    class Residual(nn.Module):  # conv output has a second user
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    class Sequence3d(nn.Module):  # BatchNorm1d on [B, T, N] normalises T, not features
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(self.fc(x))

    for model, x in ((Residual(), torch.randn(1, 3, 6, 6)), (Sequence3d(), torch.randn(2, 5, 4)),
                     (nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)),
                      torch.randn(1, 3, 5, 5))):
        gm = capture(h.randomize_bn(model), (x,))
        assert FoldBatchNorm()(gm).modified is False
        assert "aten.batch_norm" in h.fx_ops(gm)


def test_fold_batchnorm_fx_noop(h):
    gm = capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (torch.randn(1, 3, 6, 6),))
    assert FoldBatchNorm()(gm).modified is False


# ----------------------------------------------------------------------------- fold-batchnorm, ONNX


def _bn(prefix, channels):
    return {f"{prefix}.s": _f32(channels, low=0.5, high=2), f"{prefix}.b": _f32(channels),
            f"{prefix}.m": _f32(channels), f"{prefix}.v": _f32(channels, low=0.5, high=2)}


def _bn_node(inp, prefix, out, **attrs):
    return helper.make_node("BatchNormalization", [inp, *(f"{prefix}.{k}" for k in "sbmv")],
                            [out], **attrs)


def test_fold_batchnorm_onnx_all_layer_kinds(h):
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        _bn_node("c", "bn1", "c_bn", epsilon=1e-3),
        helper.make_node("ReduceMean", ["c_bn", "axes"], ["p"], keepdims=0),
        helper.make_node("Gemm", ["p", "G", "Gb"], ["g"], transB=1, alpha=2.0, beta=0.5),
        _bn_node("g", "bn2", "g_bn"),
        helper.make_node("Gemm", ["g_bn", "H"], ["g2"]),  # transB=0, no bias
        _bn_node("g2", "bn3", "g2_bn"),
        helper.make_node("MatMul", ["g2_bn", "M"], ["mm"]),
        helper.make_node("Add", ["Mb", "mm"], ["ma"]),
        _bn_node("ma", "bn4", "ma_bn"),
        helper.make_node("MatMul", ["ma_bn", "N"], ["mn"]),  # no bias: gets a new Add
        _bn_node("mn", "bn5", "y"),  # graph output keeps its name
    ]
    inits = {"W": _f32(4, 3, 3, 3), "axes": np.int64([2, 3]), "G": _f32(5, 4), "Gb": _f32(5),
             "H": _f32(5, 6), "M": _f32(6, 7), "Mb": _f32(7), "N": _f32(7, 3),
             **_bn("bn1", 4), **_bn("bn2", 5), **_bn("bn3", 6), **_bn("bn4", 7), **_bn("bn5", 3)}
    model = h.make_onnx(nodes, [("x", F, [2, 3, 8, 8])], [("y", F, [2, 3])], inits)
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    snapshot = h.onnx_snapshot(model)
    result = optimize(model, ["fold-batchnorm"])
    out = result.graph
    assert h.onnx_ops(out) == ["Conv", "ReduceMean", "Gemm", "Gemm", "MatMul", "Add", "MatMul", "Add"]
    assert result.report.records[0].stats == {"batchnorms_folded": 5}
    assert [v.name for v in out.graph.outputs] == ["y"] and out.graph[-1].outputs[0].name == "y"
    assert out.graph[-1].metadata_props["graphpress.pass"] == "fold-batchnorm"
    assert {"W.bnfold.weight", "W.bnfold.bias", "N.bnfold.bias"} <= set(out.graph.initializers)
    assert not any(name.startswith("bn") for name in out.graph.initializers)
    assert out.graph[2].attributes.get_float("beta") == 1.0
    np.testing.assert_allclose(h.ort_outputs(out, {"x": x})[0], h.ort_outputs(model, {"x": x})[0],
                               rtol=1e-4, atol=1e-5)
    verify(out)
    assert h.onnx_snapshot(model) == snapshot


def test_fold_batchnorm_onnx_refuses_unsafe_patterns(h):
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"]),  # used twice
        _bn_node("c", "bn1", "c_bn"),
        helper.make_node("Add", ["c", "c_bn"], ["s"]),
        helper.make_node("Conv", ["s", "Wx"], ["c2"]),  # weight is a graph input
        _bn_node("c2", "bn2", "c2_bn"),
        helper.make_node("Reshape", ["c2_bn", "shape"], ["r"]),
        helper.make_node("MatMul", ["r", "M"], ["mm"]),  # 3-D output: BN would normalise dim 1
        _bn_node("mm", "bn3", "y"),
    ]
    inits = {"W": _f32(4, 4, 1, 1), "M": _f32(4, 4), "shape": np.int64([2, 4, 4]),
             **_bn("bn1", 4), **_bn("bn2", 4), **_bn("bn3", 4)}
    model = h.make_onnx(nodes, [("x", F, [2, 4, 2, 2]), ("Wx", F, [4, 4, 1, 1])],
                        [("y", F, [2, 4, 4])], inits)
    assert FoldBatchNorm()(model).modified is False
    assert h.onnx_ops(model).count("BatchNormalization") == 3


def test_fold_batchnorm_onnx_noop(h):
    model = h.make_onnx([helper.make_node("Conv", ["x", "W"], ["y"])], [("x", F, [1, 3, 4, 4])],
                        [("y", F, [1, 2, 2, 2])], {"W": _f32(2, 3, 3, 3)})
    assert FoldBatchNorm()(model).modified is False


# ----------------------------------------------------------------------------- preconditions


@pytest.mark.parametrize("spec", ["fold-constants", "fold-batchnorm"])
def test_rejects_non_graphs_and_non_canonical_fx(spec):
    pass_ = from_spec(spec)
    for bad in (nn.Linear(2, 2), b"not a model", 3):
        with pytest.raises(UnsupportedGraphError):
            pass_(bad)
    with pytest.raises(PreconditionError):
        pass_(torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))))

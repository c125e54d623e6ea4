"""sparsify on FX and ONNX: outputs equal a reference built with the expected masked weights,
exported FX runs in ORT with parity, activation-aware masks from calibration, global and
per-row scopes, N:M, shared weights, no-op, spec/precondition errors, the caller's model
untouched, and sparsify → quantize-dynamic keeping the zeros in ORT."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper

import graphpress as gp
from graphpress.export import to_onnx
from graphpress.graph import verify
from graphpress.graph.errors import PassSpecError, PreconditionError
from graphpress.passes import from_spec
from graphpress.passes.sparsify._masks import global_masks, importance, layer_mask, nm_mask

F = TensorProto.FLOAT
COL_SCALE = np.exp(np.linspace(-2.0, 2.0, 32)).astype(np.float32)  # input features of unequal norm


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (torch.nn.Linear(32, 64), torch.nn.Linear(64, 48),
                                        torch.nn.Linear(48, 8))

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(16, 32) * torch.from_numpy(COL_SCALE)
    return model, x, gp.capture(model, (x,))


def _masked_eager(model: MLP, x: torch.Tensor, masks: dict[str, np.ndarray]) -> np.ndarray:
    ref = MLP().eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, keep in masks.items():
            layer = getattr(ref, name)
            layer.weight.mul_(torch.from_numpy(keep.astype(np.float32)))
        return ref(x).numpy()


def _onnx_model(h, rng, *, shared: bool = False) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """``Gemm(Relu(MatMul(x, W1)), W2, b, transB=1)``: W1 ``[K, N]``, W2 ``[N, K]``."""
    weights = {"W1": rng.normal(size=(32, 64)).astype(np.float32),
               "W2": rng.normal(size=(48, 64)).astype(np.float32),
               "b": rng.normal(size=48).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "b"], ["y"], transB=1)]
    outputs = [("y", F, [None, 48])]
    if shared:  # W1 also read by a second MatMul
        nodes.append(helper.make_node("MatMul", ["x", "W1"], ["z"]))
        outputs.append(("z", F, [None, 64]))
    return h.make_onnx(nodes, [("x", F, [None, 32])], outputs, weights), weights


def _onnx_reference(weights, x, keep1, keep2) -> np.ndarray:
    w1 = weights["W1"].T * keep1  # W_nk
    r = np.maximum(x @ w1.T, 0)
    return r @ (weights["W2"] * keep2).T + weights["b"]


def test_fx_2_4_equals_masked_reference_and_exports(h, mlp):
    model, x, gm = mlp
    before = h.fx_snapshot(gm)
    result = gp.optimize(gm, ["sparsify:pattern=2:4"])
    h.assert_fx_unchanged(gm, before)  # the caller's graph is untouched
    out, stats = result.graph, result.report.records[-1].stats
    assert result.modified and stats["linears_sparsified"] == 2 and stats["skipped_small"] == 1
    assert h.fx_ops(out) == h.fx_ops(gm)  # same ops, new constants
    assert stats["sparsity_achieved"] == 0.5 and stats["format_nm-combinatorial"] == 2
    assert stats["dense_bytes"] == (64 * 32 + 48 * 64) * 4
    assert stats["compressed_ratio"] == pytest.approx(stats["dense_bytes"] / stats["compressed_bytes"])
    masks = {name: nm_mask(importance(getattr(model, name).weight.detach().numpy()), 2, 4)
             for name in ("fc1", "fc2")}
    expected = _masked_eager(model, x, masks)
    with torch.no_grad():
        got = out(x)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    verify(out)
    exported = to_onnx(out, (x,))
    ort_got, = h.ort_outputs(exported, {exported.graph.inputs[0].name: x.numpy()})
    np.testing.assert_allclose(ort_got, expected, rtol=1e-4, atol=1e-4)
    rows = {row["layer"]: row for row in result.report.records[-1].layers}
    assert set(rows) == {"fc1.weight", "fc2.weight"}
    assert rows["fc1.weight"]["shape"] == [64, 32] and rows["fc1.weight"]["pattern"] == "2:4"
    assert 0 < rows["fc2.weight"]["output_error"] < 1


def test_fx_activation_aware_uses_calibration_and_lowers_error(mlp):
    model, x, gm = mlp
    batches = [(x,), (x.flip(0),)]  # two batches: ‖x_j‖ streams over both
    plain = gp.optimize(gm, ["sparsify:sparsity=0.6"], calibration=batches)
    aware = gp.optimize(gm, ["sparsify:sparsity=0.6,activation_aware=true"], calibration=batches)
    s_plain, s_aware = plain.report.records[-1].stats, aware.report.records[-1].stats
    assert s_plain["error_on_calibration"] == s_aware["error_on_calibration"] == 1
    # fc1 sees input features of very different norms: Wanda keeps the weights that matter
    fc1 = {r["layer"]: r["output_error"] for r in aware.report.records[-1].layers}["fc1.weight"]
    fc1_plain = {r["layer"]: r["output_error"] for r in plain.report.records[-1].layers}["fc1.weight"]
    assert fc1 < 0.7 * fc1_plain
    w = model.fc1.weight.detach().numpy()
    keep = layer_mask(importance(w, np.linalg.norm(x.numpy().astype(np.float64), axis=0)), 0.6)
    new = aware.graph.get_buffer("fc1_weight_sparse").numpy()
    np.testing.assert_array_equal(new != 0, keep)
    with pytest.raises(PreconditionError, match="calibration"):
        gp.optimize(gm, ["sparsify:activation_aware=true"])


def test_onnx_unstructured_equals_masked_reference(h):
    rng = np.random.default_rng(0)
    model, weights = _onnx_model(h, rng)
    x = (rng.normal(size=(5, 32)) * COL_SCALE).astype(np.float32)
    before = h.onnx_snapshot(model)
    result = gp.optimize(model, ["sparsify:sparsity=0.7"])
    assert h.onnx_snapshot(model) == before
    out = result.graph
    assert h.onnx_ops(out) == ["MatMul", "Relu", "Gemm"]
    assert set(out.graph.initializers) == {"W1.sparse", "W2.sparse", "b"}
    assert out.graph.initializers["W1.sparse"].const_value.numpy().shape == (32, 64)  # [K, N] kept
    assert out.graph.initializers["W1.sparse"].metadata_props["graphpress.pass"] == "sparsify"
    keep1 = layer_mask(importance(weights["W1"].T), 0.7)
    keep2 = layer_mask(importance(weights["W2"]), 0.7)
    got, = h.ort_outputs(out, {"x": x})
    np.testing.assert_allclose(got, _onnx_reference(weights, x, keep1, keep2), rtol=1e-5, atol=1e-4)
    stats = result.report.records[-1].stats
    zeros = round(0.7 * 2048) + round(0.7 * 3072)  # per layer, exact counts
    assert stats["sparsity_achieved"] == pytest.approx(zeros / 5120, abs=1e-12)
    assert stats["format_bitmask"] == 2 and stats["error_on_calibration"] == 0


def test_onnx_activation_aware_global_and_row(h):
    rng = np.random.default_rng(1)
    model, weights = _onnx_model(h, rng)
    x = (rng.normal(size=(64, 32)) * COL_SCALE).astype(np.float32)
    calib = [{"x": x[:32]}, {"x": x[32:]}]
    h1 = np.maximum(x.astype(np.float64) @ weights["W1"], 0)  # fc2's input on the dense model
    scores = [importance(weights["W1"].T, np.linalg.norm(x.astype(np.float64), axis=0)),
              importance(weights["W2"], np.linalg.norm(h1, axis=0))]
    result = gp.optimize(model, ["sparsify:sparsity=0.55,scope=global,activation_aware=true"],
                         calibration=calib)
    keep1, keep2 = global_masks(scores, 0.55, normalize=True)  # auto: mean-normalised scores
    inits = result.graph.graph.initializers
    np.testing.assert_array_equal(inits["W1.sparse"].const_value.numpy().T != 0, keep1)
    np.testing.assert_array_equal(inits["W2.sparse"].const_value.numpy() != 0, keep2)
    zeros = int((~keep1).sum() + (~keep2).sum())
    assert abs(zeros - 0.55 * (keep1.size + keep2.size)) <= 1
    got, = h.ort_outputs(result.graph, {"x": x})
    np.testing.assert_allclose(got, _onnx_reference(weights, x, keep1, keep2), rtol=1e-5, atol=1e-4)
    raw = gp.optimize(model, ["sparsify:sparsity=0.55,scope=global,activation_aware=true,"
                              "normalize=none"], calibration=calib).graph.graph.initializers
    raw1, _ = global_masks(scores, 0.55)
    assert not np.array_equal(raw1, keep1)
    np.testing.assert_array_equal(raw["W1.sparse"].const_value.numpy().T != 0, raw1)
    rows = gp.optimize(model, ["sparsify:sparsity=0.25,scope=row"]).graph.graph.initializers
    assert ((rows["W2.sparse"].const_value.numpy() == 0).sum(axis=1) == 16).all()


def test_onnx_4_8_and_shared_weight_skipped(h):
    rng = np.random.default_rng(2)
    model, weights = _onnx_model(h, rng, shared=True)
    result = gp.optimize(model, ["sparsify:pattern=4:8"])
    stats = result.report.records[-1].stats
    assert stats["skipped_shared"] == 2 and stats["linears_sparsified"] == 1  # Rule 5: W1 stays
    inits = result.graph.graph.initializers
    assert "W1" in inits and "W1.sparse" not in inits
    w2 = inits["W2.sparse"].const_value.numpy()
    assert ((w2.reshape(48, -1, 8) != 0).sum(axis=-1) == 4).all()


def test_no_op(h, mlp):
    _, _, gm = mlp
    for spec in ("sparsify:sparsity=0", "sparsify:exclude=fc*", "sparsify:min_features=100"):
        result = gp.optimize(gm, [spec])
        assert not result.modified, spec
        assert result.report.records[-1].stats["linears_sparsified"] == 0


@pytest.mark.parametrize("spec,match", [
    ("sparsify:pattern=2:4,sparsity=0.3", "means sparsity 0.5"),
    ("sparsify:pattern=4:2", "N:M"),
    ("sparsify:pattern=dense", "N:M"),
    ("sparsify:sparsity=1.5", r"\[0, 1\)"),
    ("sparsify:pattern=2:4,scope=global", "unstructured sparsity only"),
    ("sparsify:scope=net", "must be one of"),
    ("sparsify:min_features=0", "min_features"),
    ("sparsify:normalize=mean", "scope=global only"),
])
def test_spec_errors(spec, match):
    with pytest.raises(PassSpecError, match=match):
        from_spec(spec)


def test_spec_round_trip():
    spec = "sparsify:sparsity=0.6,scope=global,activation_aware=true"
    assert from_spec(spec).spec() == spec
    assert from_spec("sparsify:pattern=4:8,sparsity=0.5").target == 0.5


def test_sparsify_then_quantize_dynamic_keeps_zeros(h, mlp):
    model, x, gm = mlp
    result = gp.optimize(gm, ["sparsify:pattern=2:4", "quantize-dynamic"])
    exported = to_onnx(result.graph, (x,))
    int8 = [v.const_value.numpy() for v in exported.graph.initializers.values()
            if v.const_value is not None and v.const_value.numpy().dtype == np.int8
            and v.const_value.numpy().ndim == 2 and min(v.const_value.numpy().shape) >= 32]
    assert len(int8) == 2 and all((q == 0).mean() >= 0.5 for q in int8)  # symmetric: z = 0
    got, = h.ort_outputs(exported, {exported.graph.inputs[0].name: x.numpy()})
    masks = {name: nm_mask(importance(getattr(model, name).weight.detach().numpy()), 2, 4)
             for name in ("fc1", "fc2")}
    ref = _masked_eager(model, x, masks)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05
    rng = np.random.default_rng(3)  # ONNX, asymmetric int8: zeros get exactly the zero point
    onnx_model, _ = _onnx_model(h, rng)
    both = gp.optimize(onnx_model, ["sparsify:pattern=2:4", "quantize-dynamic:symmetric=false"])
    ops = h.onnx_ops(both.graph)
    assert ops.count("DynamicQuantizeMatMul") == 2
    for node in both.graph.graph:
        if node.op_type == "DynamicQuantizeMatMul":
            q = node.inputs[1].const_value.numpy().astype(np.int32)  # [K, N]
            zp = node.inputs[3].const_value.numpy().astype(np.int32)
            assert ((q == zp[None, :]).mean(axis=0) >= 0.5).all()


def test_zero_sparsity_with_activation_awareness_is_a_no_op():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32)).eval()
    x = torch.randn(8, 32)
    result = gp.optimize(gp.capture(model, (x,)), ["sparsify:sparsity=0,activation_aware=true"],
                      calibration=[(x,)])
    assert not result.modified

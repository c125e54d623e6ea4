"""quantize-dynamic on FX graphs: golden op sequence, int8 buffers, export to ONNX with parity
(ORT on the exported model vs the FX simulation), quality vs torch eager, mm/addmm/matmul and
embeddings, per-tensor and asymmetric weights, exclusion, shared weights, no-op and the
block-wise precondition; all-MiniLM-L6-v2 end to end."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

import graphpress as gp
from graphpress.export import to_onnx
from graphpress.graph import measure, verify

_ACT = ["min", "clamp", "max", "clamp", "sub", "div", "clamp", "detach", "neg", "div", "round",
        "clamp", "_to_copy", "fake_quantize_per_tensor_affine"]


def _cos(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _ops(gm) -> list[str]:
    return [str(n.target).split(".")[1] for n in gm.graph.nodes if n.op == "call_function"]


def _export_parity(h, gm, args, expected) -> Counter:
    """Export ``gm``, run it in ORT and compare with the FX simulation; the op histogram."""
    model = to_onnx(gm, args)
    feed = {v.name: a.numpy() for v, a in zip(model.graph.inputs, args, strict=True)}
    got, = h.ort_outputs(model, feed)
    diff = np.abs(got - expected.detach().numpy())
    # float summation order, plus rare rounding ties (torch multiplies by 1/s, ORT divides)
    assert (diff > 1e-4).mean() <= 0.002 and diff.max() < 0.05
    return Counter(n.op_type for n in model.graph)


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(128, 256), torch.nn.Linear(256, 64)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Mixed(torch.nn.Module):
    """embedding → addmm → relu → mm → matmul on constant weights; ``mode="shared"`` reads
    ``w3`` in a second matmul, ``mode="float_use"`` also sums ``w3`` in float."""

    def __init__(self, mode: str = "") -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(200, 96)
        self.w1 = torch.nn.Parameter(torch.randn(96, 128) * 0.1)
        self.b1 = torch.nn.Parameter(torch.randn(128) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(128, 96) * 0.1)
        self.w3 = torch.nn.Parameter(torch.randn(96, 96) * 0.1)
        self.mode = mode

    def forward(self, ids):
        h = torch.relu(torch.addmm(self.b1, self.emb(ids).reshape(-1, 96), self.w1))
        y = torch.matmul(torch.mm(h, self.w2).reshape(ids.shape[0], -1, 96), self.w3)
        if self.mode == "shared":
            y = torch.matmul(torch.relu(y), self.w3)
        return y + self.w3.sum() if self.mode == "float_use" else y


def test_fx_mlp_golden_export_parity_and_quality(h):
    model, x = MLP().eval(), torch.randn(32, 128)
    gm = gp.capture(model, (x,))
    before, bytes_before = h.fx_snapshot(gm), measure(gm).bytes
    result = gp.optimize(gm, ["quantize-dynamic"])
    h.assert_fx_unchanged(gm, before)  # the caller's graph is untouched
    out = result.graph
    assert result.modified and result.report.records[-1].stats["matmuls_quantized"] == 2
    layer = ["dequantize_per_channel", *_ACT, "linear"]
    assert _ops(out) == [*layer, "relu", *layer]
    verify(out)
    old = {n.name for n in gm.graph.nodes}
    created = [n for n in out.graph.nodes if n.name not in old]
    assert len(created) == 2 * (len(layer) + 1) and all(n.meta.get("graphpress.pass") == "quantize-dynamic" for n in created)
    m = measure(out)
    assert m.bytes_by_dtype["int8"] == 128 * 256 + 256 * 64
    assert m.bytes_by_dtype["float32"] == (256 + 64) * 4 * 2  # biases and scales only
    assert m.bytes < bytes_before / 3.5
    with torch.no_grad():
        fx, eager = out(x), model(x)
    assert _cos(fx, eager) >= 0.999
    ops = _export_parity(h, out, (x,), fx)
    assert ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 4 and ops["ReduceMax"] == 2
    assert gp.optimize(out, ["quantize-dynamic"]).modified is False  # idempotent


def test_fx_mm_addmm_matmul_embedding(h):
    model, ids = Mixed().eval(), torch.randint(0, 200, (2, 8))
    gm = gp.capture(model, (ids,))
    # per-tensor: an int8 table row scaled by s feeds a per-tensor activation quantizer whose
    # ±127·s extremes land on exact .5 ties (torch rounds x·(1/s), ORT x/s): keep it float there
    for spec, gathers in (("quantize-dynamic", 1), ("quantize-dynamic:symmetric=false", 1),
                          ("quantize-dynamic:per_channel=false,embeddings=false", 0)):
        result = gp.optimize(gm, [spec])
        stats = result.report.records[-1].stats
        assert (stats["matmuls_quantized"], stats["gathers_quantized"]) == (3, gathers), spec
        assert stats["activations_quantized"] == 3 and stats["attributes_removed"] == 3 + gathers
        verify(result.graph)
        with torch.no_grad():
            fx, eager = result.graph(ids), model(ids)
        assert _cos(fx, eager) >= 0.998, spec
        ops = _export_parity(h, result.graph, (ids,), fx)
        assert ops["QuantizeLinear"] == 3, spec
    result = gp.optimize(gm, ["quantize-dynamic:embeddings=false"])
    table = next(n for n in result.graph.graph.nodes if "embedding" in str(n.target)).args[0]
    assert table.op == "get_attr" and measure(result.graph).bytes_by_dtype["float32"] > 200 * 96 * 4


def test_fx_exclusion_shared_weights_and_noop(h):
    ids = torch.randint(0, 200, (2, 8))
    gm = gp.capture(Mixed("shared").eval(), (ids,))
    result = gp.optimize(gm, ["quantize-dynamic"])  # w3 read twice: quantized once
    assert result.report.records[-1].stats["matmuls_quantized"] == 4
    assert _ops(result.graph).count("dequantize_per_channel") == 4
    gm = gp.capture(Mixed("float_use").eval(), (ids,))
    result = gp.optimize(gm, ["quantize-dynamic"])  # w3 keeps a float use: stays float
    assert result.report.records[-1].stats["matmuls_quantized"] == 2
    assert _ops(result.graph).count("matmul") == 1
    result = gp.optimize(gm, ["quantize-dynamic:exclude=addmm*"])
    assert _ops(result.graph).count("fake_quantize_per_tensor_affine") == 1
    result = gp.optimize(gm, ["quantize-dynamic:exclude=*"])
    assert result.modified is False and _ops(result.graph) == _ops(gm)
    result = gp.optimize(gm, ["quantize-dynamic:min_elements=100000"])
    assert result.modified is False


def test_fx_preconditions():
    gm = gp.capture(MLP(), (torch.randn(2, 128),))
    with pytest.raises(gp.PreconditionError, match="block_size"):
        gp.optimize(gm, ["quantize-dynamic:block_size=32"])
    with pytest.raises(gp.PreconditionError, match="aten"):
        gp.optimize(torch.fx.symbolic_trace(MLP()), ["quantize-dynamic"])


def test_fx_minilm_end_to_end(h, minilm):
    model, inputs = minilm
    gm = gp.capture(model, (), inputs)
    result = gp.optimize(gm, ["quantize-dynamic"])
    stats = result.report.records[-1].stats
    assert stats["matmuls_quantized"] == 37 and stats["gathers_quantized"] == 2
    verify(result.graph)
    assert measure(result.graph).bytes < measure(gm).bytes / 3.9
    onnx_model = to_onnx(result.graph, (), inputs)
    got = h.ort_outputs(onnx_model, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        eager = model(**inputs).last_hidden_state
        fx = result.graph(**inputs).last_hidden_state
    assert _cos(got, eager) >= 0.99 and _cos(fx, eager) >= 0.99
    # Not bit-exact: the dynamically quantized model is chaotic (a 1e-6 relative change of
    # one LayerNorm weight moves its output as far), so float-level differences between
    # torch and ORT kernels grow through the six layers.
    assert _cos(got, fx) >= 0.99
    ops = Counter(n.op_type for n in onnx_model.graph)
    assert ops["QuantizeLinear"] == 25 and ops["DequantizeLinear"] >= 39
    tagged = {n.op_type for n in onnx_model.graph
              if n.metadata_props.get("graphpress.pass") == "quantize-dynamic"}
    assert {"QuantizeLinear", "DequantizeLinear", "ReduceMax"} <= tagged

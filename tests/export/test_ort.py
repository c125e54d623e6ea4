"""ONNX Runtime sessions (providers got vs asked, inputs, sources), parity and legality."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from graphpress import export
from graphpress.export import ort as ort_mod
from graphpress.graph import ExportError, ModelLoadError, capture, load

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
NO_GPU = not os.path.exists("/dev/nvidia0")
GPU_BUILD = CUDA in ort.get_available_providers()  # onnxruntime-gpu lists it, usable or not


class _TwoOutputs(nn.Module):
    """Float and integer outputs: an MLP's activations and their argmax."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))

    def forward(self, x, bias):
        y = self.body(x) + bias
        return y, y.argmax(-1)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = _TwoOutputs().eval()
    inputs = {"x": torch.randn(3, 8), "bias": torch.randn(4)}
    onnx_model = export.to_onnx(capture(model, (), inputs), (), inputs)
    return model, inputs, onnx_model


def test_session_runs_dict_and_tuple_inputs(small):
    model, inputs, onnx_model = small
    s = export.session(onnx_model, "cpu", intra_op_threads=1)
    assert s.input_names == ("x", "bias") and len(s.output_names) == 2
    assert s.inference_session.get_session_options().intra_op_num_threads == 1
    expected = [t.detach().numpy() for t in model(**inputs)]
    by_name = s.run({k: v.numpy() for k, v in inputs.items()})
    positional = s.run((inputs["x"], inputs["bias"]))  # torch tensors are accepted too
    for got in (by_name, positional):
        np.testing.assert_allclose(got[0], expected[0], atol=1e-6)
        np.testing.assert_array_equal(got[1], expected[1])


def test_session_input_errors_name_the_inputs(small):
    _, inputs, onnx_model = small
    s = export.session(onnx_model, "cpu")
    with pytest.raises(ExportError, match=r"missing model inputs \['bias'\]"):
        s.run({"x": inputs["x"]})
    with pytest.raises(ExportError, match="1 positional inputs but the model takes 2"):
        s.run((inputs["x"],))
    with pytest.raises(ExportError, match="failed to run"):
        s.run({"x": np.zeros((3, 5), np.float32), "bias": inputs["bias"]})


def test_cpu_request_does_not_fall_back(small):
    s = export.session(small[2], "cpu")
    assert s.requested == (CPU,) and s.providers == (CPU,) and s.fell_back is False


def test_auto_reports_what_ort_really_got(small):
    s = export.session(small[2])
    assert s.requested == ((CUDA, CPU) if GPU_BUILD else (CPU,))
    assert s.providers == tuple(s.inference_session.get_providers())
    assert s.fell_back == (CUDA not in s.providers)
    assert s.providers[-1] == CPU


@pytest.mark.skipif(not (NO_GPU and GPU_BUILD), reason="onnxruntime-gpu on a machine without GPU")
@pytest.mark.parametrize("providers", ["auto", "cuda", [CUDA]])
def test_cuda_without_gpu_falls_back_to_cpu_and_warns(small, providers, monkeypatch, caplog):
    monkeypatch.setattr(ort_mod, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="graphpress.export.ort"):
        s = export.session(small[2], providers)
    assert s.requested == (CUDA, CPU) and s.providers == (CPU,) and s.fell_back is True
    assert any("fell back to CPUExecutionProvider" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not (NO_GPU and GPU_BUILD), reason="onnxruntime-gpu on a machine without GPU")
def test_failed_provider_is_not_retried(small, capfd):
    export.session(small[2], "cuda")
    capfd.readouterr()
    s = export.session(small[2], "cuda")
    assert "libonnxruntime_providers_cuda" not in capfd.readouterr().err  # no ORT load error
    assert s.fell_back and CUDA in ort_mod._unavailable


def test_provider_names_are_checked():
    assert export.resolve_providers([CPU]) == (CPU,)
    assert export.resolve_providers([CUDA]) == (CUDA, CPU)
    with pytest.raises(ExportError, match="unknown execution provider"):
        export.resolve_providers(["NoSuchExecutionProvider"])
    with pytest.raises(ExportError, match="providers is empty"):
        export.resolve_providers([])


def test_session_sources_path_bytes_proto_and_lazy(small, tmp_path, monkeypatch):
    model, inputs, onnx_model = small
    expected = model(**inputs)[0].detach().numpy()
    inline = export.save(onnx_model, tmp_path / "inline" / "m.onnx")
    external = export.save(onnx_model, tmp_path / "ext" / "m.onnx", external_data=True)
    lazy = load(external)
    assert any(
        isinstance(v.const_value, ir.ExternalTensor) for v in lazy.graph.initializers.values()
    )
    proto = ir.serde.serialize_model(onnx_model)
    sources = [inline, str(external), proto.SerializeToString(), proto, lazy]
    for source in sources:
        got = export.session(source, "cpu").run(inputs)[0]
        np.testing.assert_allclose(got, expected, atol=1e-6)
    # In-memory models past the protobuf limit go by path too (lowered limit to test it).
    saved = []
    monkeypatch.setattr(ort_mod, "BYTES_LIMIT", 0)
    monkeypatch.setattr(ort_mod, "save", lambda *a, **k: saved.append(a[1]) or export.save(*a, **k))
    got = export.session(onnx_model, "cpu").run(inputs)[0]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert len(saved) == 1 and not saved[0].parent.exists()  # temporary folder removed


def test_session_bad_sources(tmp_path):
    with pytest.raises(ModelLoadError, match="no such ONNX file"):
        export.session(tmp_path / "missing.onnx")
    with pytest.raises(ExportError, match="could not load the model"):
        export.session(b"definitely not onnx", "cpu")
    with pytest.raises(ExportError, match="to_onnx first"):
        export.session(nn.Linear(2, 2))


def test_parity_any_pair_and_exact_integers(small, tmp_path):
    model, inputs, onnx_model = small
    gm = capture(model, (), inputs)
    path = export.save(onnx_model, tmp_path / "m.onnx")
    positional = (inputs["x"], inputs["bias"])
    for reference, candidate in [(model, gm), (gm, onnx_model), (model, path), (path, onnx_model)]:
        for feed in (inputs, positional):
            parity = export.check_parity(reference, candidate, feed)
            assert parity.ok(atol=1e-5, cosine_min=0.99999), str(parity)
            assert [o.exact for o in parity.per_output] == [None, True]
    line = str(export.check_parity(model, onnx_model, inputs))
    assert "\n" not in line and "max_abs=" in line and "cosine=" in line


def test_parity_detects_differences(small):
    model, inputs, _ = small
    other = _TwoOutputs().eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.body[2].weight.add_(0.05 * torch.randn_like(other.body[2].weight))
    parity = export.check_parity(model, other, inputs)
    assert not parity.ok(atol=1e-5, cosine_min=0.99999)
    assert parity.max_abs > 1e-3 and parity.cosine < 0.99999 and parity.max_rel > 0
    argmax_changed = parity.per_output[1].exact is False
    assert argmax_changed == (not torch.equal(model(**inputs)[1], other(**inputs)[1]))


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_parity_structure_mismatches_raise():
    x = torch.randn(2, 3)
    one, two = _Lambda(lambda t: t), _Lambda(lambda t: (t, t))
    with pytest.raises(ExportError, match="1 outputs but candidate has 2"):
        export.check_parity(one, two, (x,))
    with pytest.raises(ExportError, match="shape"):
        export.check_parity(one, _Lambda(lambda t: t.T), (x,))
    with pytest.raises(ExportError, match="cannot run"):
        export.check_parity(one, 42, (x,))
    positional = capture(one, (x,))
    with pytest.raises(ExportError, match="pass the inputs as a tuple"):
        export.check_parity(one, positional, {"x": x})


def test_parity_non_finite_values():
    x = torch.tensor([1.0, 0.0, 2.0])
    nan_both = export.check_parity(_Lambda(lambda t: t / t), _Lambda(lambda t: t / t), (x,))
    assert nan_both.max_abs == 0 and nan_both.cosine == pytest.approx(1.0)
    nan_one = export.check_parity(_Lambda(lambda t: t / t), _Lambda(lambda t: t), (x,))
    assert nan_one.max_abs == float("inf") and nan_one.cosine == 0.0


def _onnx(nodes, inputs, outputs, opsets=(("", 18),)) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    ops = [helper.make_opsetid(d, v) for d, v in opsets]
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=ops, ir_version=10))


def test_ort_legal():
    vi = helper.make_tensor_value_info
    assert export.ort_legal(export.to_onnx(nn.Linear(4, 2), torch.randn(1, 4))) == []
    custom = _onnx(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Foo", ["r"], ["y"], domain="com.example"),
        ],
        [vi("x", TensorProto.FLOAT, [2])],
        [vi("y", TensorProto.FLOAT, [2])],
        opsets=(("", 18), ("com.example", 1)),
    )
    assert export.ort_legal(custom) == ["com.example::Foo"]
    int16_relu = _onnx(  # valid ONNX, but ORT's CPU provider has no int16 Relu kernel
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Abs", ["f"], ["g"])],
        [vi("x", TensorProto.INT16, [2]), vi("f", TensorProto.FLOAT, [2])],
        [vi("y", TensorProto.INT16, [2]), vi("g", TensorProto.FLOAT, [2])],
    )
    assert export.ort_legal(int16_relu) == ["ai.onnx::Relu"]
    invalid = _onnx(
        [helper.make_node("Neg", ["x"], ["y"])],
        [vi("x", TensorProto.UINT8, [2])],
        [vi("y", TensorProto.UINT8, [2])],
    )
    with pytest.raises(ExportError, match="invalid"):
        export.ort_legal(invalid)

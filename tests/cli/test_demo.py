"""The main job: ``graphpress demo`` on the embedded all-MiniLM-L6-v2."""

from __future__ import annotations

from graphpress.demo import COMPRESS_PASSES, EXACT_PASSES, run_demo
from graphpress.graph import load


def test_demo_exports_exactly_compresses_and_reports(tmp_path):
    result = run_demo(tmp_path, sentences=16, progress=False)
    assert result.fp32_path.exists() and result.model_path == tmp_path / "minilm.onnx"
    assert result.cosine_fp32_min >= 0.99999  # the FX passes and the export are exact
    assert result.cosine_mean >= 0.99 and result.cosine_min >= 0.97  # dynamic int8
    assert result.compression_ratio >= 3.5
    assert [r.name for r in result.fx_report.records] == list(EXACT_PASSES)
    assert [r.name for r in result.onnx_report.records] == list(COMPRESS_PASSES)
    assert "CPUExecutionProvider" in result.providers
    assert min(result.ort_ms, result.ort_fp32_ms, result.torch_ms) > 0
    text = result.text()
    assert "compression ratio" in text and "cosine" in text and "providers" in text
    model = load(result.model_path)
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask"]
    assert not any(n.op_type in ("Dropout", "Identity") for n in model.graph)


def test_demo_takes_other_compression_passes(tmp_path):
    result = run_demo(tmp_path, sentences=16, compress=["dce"], progress=False)
    assert result.compression_ratio == 1.0 and result.cosine_min >= 0.99999

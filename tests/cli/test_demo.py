"""The main job: ``graphpress demo`` on the embedded all-MiniLM-L6-v2."""

from __future__ import annotations

from graphpress.demo import DEMO_PASSES, run_demo
from graphpress.graph import load


def test_demo_compresses_exports_and_matches_torch(tmp_path):
    result = run_demo(tmp_path, sentences=16, progress=False)
    assert result.model_path == tmp_path / "minilm.onnx" and result.model_path.exists()
    assert result.cosine_min >= 0.99999
    assert result.sentences == 16
    assert [r.name for r in result.report.records] == list(DEMO_PASSES)
    assert result.bytes_after <= result.bytes_before
    assert "CPUExecutionProvider" in result.providers
    assert result.ort_ms_b16 > 0 and result.torch_ms_b16 > 0
    text = result.text()
    assert "compression ratio" in text and "cosine" in text and "providers" in text
    model = load(result.model_path)
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask"]
    assert not any(n.op_type in ("Dropout", "Identity") for n in model.graph)

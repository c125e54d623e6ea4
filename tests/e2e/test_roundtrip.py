"""Done-when of the core: the four exact passes round-trip real models FX → ONNX → ORT.

all-MiniLM-L6-v2 (real weights) and a LLaMA-style decoder (tied embeddings) are captured,
optimised with dce, fold-constants, eliminate-identity and fold-batchnorm, exported to ONNX,
run in ONNX Runtime (CPU here) and compared with torch eager on the original module.
"""

from __future__ import annotations

import numpy as np
import torch

from graphpress import capture, export, optimize
from graphpress.graph import measure

EXACT_PASSES = ["eliminate-identity", "fold-batchnorm", "fold-constants", "dce"]


def _roundtrip(model, inputs, tmp_path):
    gm = capture(model, (), inputs)
    result = optimize(gm, EXACT_PASSES)
    assert result.modified  # at least the dropouts go
    onnx_model = export.to_onnx(result.graph, (), inputs)
    path = export.save(onnx_model, tmp_path / "model.onnx")
    feed = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    return result, path, export.check_parity(model, path, feed)


def test_minilm_roundtrip_cosine(minilm, tmp_path):
    model, inputs = minilm
    result, path, parity = _roundtrip(model, inputs, tmp_path)
    assert parity.cosine >= 0.99999, parity
    assert parity.max_abs < 1e-4, parity
    ops = result.report.records[-1].after.ops
    assert "aten.dropout" not in ops
    # all weights survive: the exported file holds the model's parameters
    params = sum(p.numel() for p in model.parameters())
    onnx_params = measure(export.to_onnx(result.graph, (), inputs)).params
    assert onnx_params >= params * 0.99
    assert path.stat().st_size > 80e6


def test_llama_roundtrip_cosine_and_tied_weights(llama_model, tmp_path):
    model, inputs = llama_model
    result, path, parity = _roundtrip(model, inputs, tmp_path)
    assert parity.cosine >= 0.99999, parity
    logits = model(**inputs).logits.detach().numpy()
    assert np.isfinite(logits).all()
    embed = model.get_input_embeddings().weight
    assert model.lm_head.weight is embed  # the caller's tie is intact

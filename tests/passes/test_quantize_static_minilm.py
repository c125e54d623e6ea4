"""``insert-qdq`` on the real all-MiniLM-L6-v2: default quality, size and full int8 placement
(the fast configuration), and the sensitivity analysis finding the GELU-output layers."""

from __future__ import annotations

import numpy as np
import torch

from graphpress.graph import measure
from graphpress.passes import optimize


def test_minilm_default_quality_and_size(minilm, minilm_tokenizer):
    from graphpress.data import mean_pool, stdlib_sentences
    from graphpress.export import session, to_onnx

    model, inputs = minilm
    tokenizer = minilm_tokenizer[1]
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
    onnx_model = to_onnx(model, (), inputs,
                         dynamic_shapes={n: {0: batch, 1: seq} for n in inputs})

    def feeds(texts):
        out = []
        for i in range(0, len(texts), 8):
            enc = tokenizer(texts[i:i + 8], padding=True, return_tensors="np")
            out.append({k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
        return out

    cal, evaluation = feeds(stdlib_sentences(32, offset=1000)), feeds(stdlib_sentences(32))
    result = optimize(onnx_model, ["insert-qdq"], calibration=cal)
    stats = result.report.records[0].stats
    ref, quant = session(onnx_model, providers="cpu"), session(result.graph, providers="cpu")
    cosines = []
    for feed in evaluation:
        a = mean_pool(ref.run(feed)[0], feed["attention_mask"])
        b = mean_pool(quant.run(feed)[0], feed["attention_mask"])
        cosines.extend((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    ratio = measure(onnx_model).bytes / measure(result.graph).bytes
    # 32 calibration sentences here (the benchmark uses 128 and gets 0.9976)
    assert float(np.mean(cosines)) >= 0.993 and ratio >= 3.9, (np.mean(cosines), ratio)
    # defaults quantize every fusable layer: no MatMul/Gemm keeps a float weight (speed) ...
    weight_layers = [n for n in result.graph.graph if n.op_type in ("MatMul", "Gemm")
                     and n.inputs[1].producer() is not None
                     and n.inputs[1].producer().op_type == "DequantizeLinear"]
    assert len(weight_layers) == 37 and stats["layers_kept_float"] == 0
    assert all(n.inputs[0].producer().op_type == "DequantizeLinear" for n in weight_layers)
    # ... and the GELU outputs are smoothed by a Mul (not foldable), LayerNorm outputs too
    assert stats["layers_smoothed"] >= 36


def test_minilm_sensitivity_finds_the_gelu_output_layer(minilm, minilm_tokenizer):
    from graphpress.data import stdlib_sentences
    from graphpress.export import to_onnx

    model, inputs = minilm
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
    onnx_model = to_onnx(model, (), inputs,
                         dynamic_shapes={n: {0: batch, 1: seq} for n in inputs})
    enc = minilm_tokenizer[1](stdlib_sentences(8, offset=1000), padding=True, return_tensors="np")
    cal = [{k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}]
    result = optimize(onnx_model, ["insert-qdq:keep_float=0.05,smoothquant=none"],
                      calibration=cal)
    stats = result.report.records[0].stats
    sens = {k: v for k, v in stats.items() if k.startswith("sensitivity.")}
    worst = max(sens, key=sens.get)  # an output.dense: GELU output feeding a MatMul
    node = next(n for n in result.graph.graph if n.name == worst.removeprefix("sensitivity."))
    assert node.inputs[0].producer().op_type == "Gelu"
    assert node.inputs[1].producer().op_type == "DequantizeLinear"  # fallback="weights"

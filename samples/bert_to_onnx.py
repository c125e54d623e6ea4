"""Capture all-MiniLM-L6-v2, run the exact passes, export to ONNX and check it against torch.

    pip install -e '.[samples]' && python samples/bert_to_onnx.py out/
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import graphpress as gp
from graphpress.data import load_minilm, stdlib_sentences


def main(out_dir: Path) -> None:
    model, tokenizer = load_minilm()
    texts = stdlib_sentences(8)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    # Dynamic batch and sequence so the exported model takes any batch.
    batch, seq = torch.export.Dim("batch", max=256), torch.export.Dim("seq", max=512)
    dynamic = {name: {0: batch, 1: seq} for name in inputs}
    gm = gp.capture(model, (), inputs, dynamic_shapes=dynamic)

    result = gp.optimize(gm, ["eliminate-identity", "fold-batchnorm", "fold-constants", "dce"])
    print(result.report)

    onnx_model = gp.export.to_onnx(result.graph, (), inputs, dynamic_shapes=dynamic)
    path = gp.export.save(onnx_model, out_dir / "minilm.onnx")
    session = gp.export.session(path)
    print("providers:", session.providers, "(fell back)" if session.fell_back else "")

    parity = gp.export.check_parity(model, path, inputs)
    print(parity)
    print(gp.summary(onnx_model))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "graphpress-out"))

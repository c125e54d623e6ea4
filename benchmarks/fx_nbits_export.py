"""FX 4-bit weights exported as MatMulNBits / GatherBlockQuantized vs the decode chain (MiniLM).

all-MiniLM-L6-v2 is captured to FX (dynamic batch and sequence) and ``quantize-weights``
(4-bit RTN, block 32, asymmetric) runs on the FX graph. The result is exported twice:
``to_onnx(..., matmul_nbits=True)`` (every quantized linear one ``com.microsoft.MatMulNBits``
and every embedding table one ``GatherBlockQuantized``, reading the packed codes; the default) and ``matmul_nbits=False`` (the aten decode chain
``(q − z)·s`` exported as plain ONNX ops, the FX graph's own computation). Side by side with
the fp32 export and the ONNX path (``quantize-weights`` on the exported fp32 ONNX):

* ONNX file size and the counts of MatMulNBits and GatherBlockQuantized nodes;
* cosine of mean-pooled embeddings to fp32 on 128 stdlib sentences, and the largest absolute
  difference of the token states from the FX quantized graph's;
* the peak resident memory a fresh process adds by opening an ORT session and running one
  b16×128 batch (ORT folds a decode chain of constants into float weights at load time;
  MatMulNBits keeps the packed codes);
* ORT CPU latency (2 threads, interleaved medians) at b1×128 and b16×128, as ratios to fp32.

    python benchmarks/fx_nbits_export.py [--quick]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, start_run, write  # noqa: E402
from _eval import (  # noqa: E402
    cosine_rows,
    embed,
    latencies,
    model_bytes,
    run_in_child,
    session,
)
from _minilm import latency_feed, load_batches, save_batches, tokenize  # noqa: E402

logger = logging.getLogger("benchmarks.fx_nbits_export")
SPEC = "quantize-weights:bits=4,block_size=32,algorithm=rtn"


def open_and_run(path: str, feed_path: str, prepare_only: bool = False) -> None:
    """Open an ORT session on ``path`` and run the batch saved in ``feed_path`` (in a child)."""
    import onnxruntime  # noqa: F401  (imported in the baseline)

    if prepare_only:
        return
    (feed,) = load_batches(feed_path)
    sess = session(path)
    sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sentences and rounds")
    args = parser.parse_args()
    start_run(logger)
    import onnx_ir as ir
    import torch

    import graphpress as gp
    from graphpress.data import load_minilm, stdlib_sentences

    start = time.perf_counter()
    model, tokenizer = load_minilm()
    evaluation = tokenize(tokenizer, stdlib_sentences(32 if args.quick else 128), 32)
    example = {k: torch.from_numpy(v[:2]) for k, v in evaluation[0].items()}
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=512)
    dims = {name: {0: batch, 1: seq} for name in example}
    gm = gp.capture(model, (), example, dynamic_shapes=dims)
    quantized = gp.optimize(gm, [SPEC]).graph
    work = Path(tempfile.mkdtemp(prefix="graphpress-nbits-bench-"))
    paths = {"fp32": work / "fp32.onnx", "FX 4-bit, MatMulNBits": work / "fused.onnx",
             "FX 4-bit, decode chain": work / "chain.onnx",
             "ONNX path 4-bit (MatMulNBits)": work / "onnx.onnx"}
    export = gp.export.to_onnx
    gp.export.save(export(gm, (), example, dynamic_shapes=dims), paths["fp32"])
    gp.export.save(export(quantized, (), example, dynamic_shapes=dims),
                   paths["FX 4-bit, MatMulNBits"])
    gp.export.save(export(quantized, (), example, dynamic_shapes=dims, matmul_nbits=False),
                   paths["FX 4-bit, decode chain"])
    gp.save(gp.optimize(str(paths["fp32"]), [SPEC]).graph, paths["ONNX path 4-bit (MatMulNBits)"])
    sessions = {label: session(path) for label, path in paths.items()}
    reference = embed(sessions["fp32"], evaluation)
    with torch.no_grad():
        fx_states = [quantized(**{k: torch.from_numpy(v) for k, v in b.items()})
                     .last_hidden_state.numpy() for b in evaluation]
    rows = []
    for label, sess in sessions.items():
        states = [sess.run(None, {i.name: b[i.name] for i in sess.get_inputs()})[0]
                  for b in evaluation]
        cos = cosine_rows(reference, embed(sess, evaluation))
        onnx_model = ir.load(str(paths[label]))
        rows.append({"variant": label, "onnx_mb": model_bytes(paths[label]) / 1e6,
                     "matmulnbits": sum(n.op_type == "MatMulNBits" for n in onnx_model.graph),
                     "gather_bq": sum(n.op_type == "GatherBlockQuantized"
                                      for n in onnx_model.graph),
                     "nodes": len(onnx_model.graph), "cos_mean": float(cos.mean()),
                     "cos_min": float(cos.min()),
                     "max_abs_vs_fx_4bit": None if label == "fp32" else float(max(
                         np.abs(a - b).max() for a, b in zip(states, fx_states)))})
    feed_path = work / "feed.npz"
    save_batches(feed_path, [latency_feed(tokenizer, 16)])
    for row in rows:
        used = run_in_child(open_and_run, str(paths[row["variant"]]), str(feed_path))
        row["session_mb"] = used.get("peak_rss_mb", float("nan")) - used.get("base_rss_mb",
                                                                             float("nan"))
    rounds = 5 if args.quick else 20
    for batch_size in (1, 16):
        median = latencies(sessions, latency_feed(tokenizer, batch_size), rounds=rounds)
        for row in rows:
            row[f"b{batch_size}_ms"] = median[row["variant"]] * 1e3
            row[f"b{batch_size}_vs_fp32"] = median[row["variant"]] / median["fp32"]
    for row in rows:
        logger.info("%s", row)
    total = time.perf_counter() - start
    markdown = (
        "## FX 4-bit export: MatMulNBits / GatherBlockQuantized vs decode chain "
        "(all-MiniLM-L6-v2)\n\n"
        f"`{SPEC}` on the FX graph, exported with `matmul_nbits=True` (default) and `False`; "
        "the ONNX path quantizes the fp32 export. Cosine of mean-pooled embeddings vs fp32 on "
        f"{32 if args.quick else 128} stdlib sentences; `max_abs_vs_fx_4bit`: token states vs "
        "the FX 4-bit graph; `session_mb`: peak RSS a fresh process adds opening the session "
        "and running b16×128; ORT CPU 2 threads, interleaved medians"
        + (" — **quick mode**" if args.quick else "") + ".\n\n"
        + markdown_table(rows, ["variant", "onnx_mb", "matmulnbits", "gather_bq", "nodes",
                                "cos_mean",
                                "cos_min", "max_abs_vs_fx_4bit", "session_mb", "b1_ms",
                                "b1_vs_fp32", "b16_ms", "b16_vs_fp32"])
        + f"\n\nTotal wall time {total:.0f} s.")
    written = write("fx_nbits_export" + ("-quick" if args.quick else ""),
                    {"machine": machine(), "quick": args.quick, "spec": SPEC, "rows": rows,
                     "seconds": total}, markdown)
    print(markdown)
    print("wrote", *written)


if __name__ == "__main__":
    main()

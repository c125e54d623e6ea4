"""Low-rank factoring and sparsity of all-MiniLM-L6-v2's encoder linears, measured in one run.

The fp32 model is exported once; every variant starts from it. Targets are the 36 encoder
linears (the pooler's ``Gemm`` is excluded: the mean-pooled embeddings never read it).
Calibration sentences (stdlib docstrings from offset 1000) and evaluation sentences (offset 0)
are disjoint. Per variant: targeted parameters kept (requested vs achieved), cosine mean/min
and top-5 neighbour agreement of the mean-pooled embeddings vs fp32 ORT, seconds in the pass,
model bytes (dense, what ORT loads) and for sparsity the bytes of the compressed storage form,
and ORT CPU latency (2 threads, interleaved medians) at b1×128 and b16×128 as ratios to fp32.

Two micro-benchmarks answer the targets directly: exact vs randomized SVD (time, error) on the
twelve 1536×384 matrices, and one 384→1536 linear dense vs factored in ORT at rank savings of
1.5–4x on that layer.

    python benchmarks/low_rank_sparse.py [--quick]
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
from _eval import cosine_rows, embed, latencies, model_bytes, session, topk_agreement  # noqa: E402
from _micro import factored_linear_latency, svd_timing  # noqa: E402
from _minilm import export, latency_feed, tokenize  # noqa: E402

logger = logging.getLogger("benchmarks.low_rank_sparse")

EXCLUDE = "exclude=pooler*"  # the pooler's Gemm: mean-pooled embeddings never read it
BUDGETS = (0.9, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4)


def variants(quick: bool) -> list[tuple[str, list[str]]]:
    budgets = (0.9, 0.75, 0.5) if quick else BUDGETS
    out = []
    for label, extra in (("SVD", ""), ("randomized SVD", ",method=randomized"),
                         ("activation-aware SVD", ",activation_aware=true")):
        for b in budgets:
            out.append((f"low-rank {label} keep {b:.0%}",
                        [f"factor-low-rank:budget={b}{extra},{EXCLUDE}"]))
    out.append(("low-rank activation-aware keep 75%, round_to=16",
                [f"factor-low-rank:budget=0.75,activation_aware=true,round_to=16,{EXCLUDE}"]))
    for label, spec in (("50% unstructured, per layer", "sparsity=0.5"),
                        ("50% unstructured, global", "sparsity=0.5,scope=global"),
                        ("50% unstructured, activation-aware", "sparsity=0.5,activation_aware=true"),
                        ("50% per row, activation-aware (Wanda)",
                         "sparsity=0.5,scope=row,activation_aware=true"),
                        ("2:4", "pattern=2:4"),
                        ("2:4 activation-aware", "pattern=2:4,activation_aware=true"),
                        ("4:8 activation-aware", "pattern=4:8,activation_aware=true")):
        out.append((f"sparsify {label}", [f"sparsify:{spec},{EXCLUDE}"]))
    out.append(("low-rank act-aware 75% + quantize-dynamic",
                [f"factor-low-rank:budget=0.75,activation_aware=true,{EXCLUDE}",
                 "quantize-dynamic"]))
    out.append(("sparsify 2:4 act-aware + quantize-weights 4-bit",
                [f"sparsify:pattern=2:4,activation_aware=true,{EXCLUDE}", "quantize-weights"]))
    return out


def _row(label, specs, result, fp32_bytes, reference, evaluation, path) -> dict:
    import graphpress as gp

    records = result.report.records
    first = records[0].stats
    row = {"variant": label, "spec": " + ".join(specs), "seconds": result.report.seconds,
           "pass_seconds": " + ".join(f"{r.seconds:.2f}" for r in records)}
    if "params_before" in first:  # factor-low-rank
        row["params_kept"] = first["params_after"] / first["params_before"]
        spec = specs[0]
        if "budget=" in spec:
            wanted = float(spec.split("budget=")[1].split(",")[0])
            row["requested"] = wanted
            row["budget_miss_pct"] = 100 * abs(row["params_kept"] - wanted) / wanted
        row["linears"] = first["linears_factored"]
    if "compressed_bytes" in first:  # sparsify
        row["sparsity"] = first.get("sparsity_achieved")
        formats = [layer.get("compressed_format") for layer in records[0].layers]
        row["compressed_format"] = max(set(formats), key=formats.count) if formats else None
        row["weights_dense_mb"] = first["dense_bytes"] / 1e6
        row["weights_compressed_mb"] = first["compressed_bytes"] / 1e6
    gp.save(result.graph, path)
    size = model_bytes(path)
    got = embed(session(path), evaluation)
    cos = cosine_rows(reference, got)
    row.update(size_mb=size / 1e6, ratio=fp32_bytes / size, combined_ratio=
               result.report.compression_ratio, cos_mean=float(cos.mean()),
               cos_min=float(cos.min()), top5=topk_agreement(reference, got, 5), path=str(path))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer variants and sentences")
    parser.add_argument("--only", default="", help="comma-separated substrings of row labels")
    args = parser.parse_args()
    start_run(logger)
    import graphpress as gp
    from graphpress.data import load_minilm, stdlib_sentences

    n_eval, n_cal, rounds = (64, 32, (5, 3)) if args.quick else (256, 128, (30, 10))
    model, tokenizer = load_minilm()
    evaluation = tokenize(tokenizer, stdlib_sentences(n_eval, offset=0), 32)
    calibration = tokenize(tokenizer, stdlib_sentences(n_cal, offset=1000), 16)
    work = Path(tempfile.mkdtemp(prefix="graphpress-lowrank-bench-"))
    fp32 = work / "fp32.onnx"
    export(model, tokenizer, fp32)
    reference = embed(session(fp32), evaluation)
    fp32_bytes = model_bytes(fp32)
    rows = [{"variant": "fp32 (ORT)", "size_mb": fp32_bytes / 1e6, "ratio": 1.0, "cos_mean": 1.0,
             "cos_min": 1.0, "top5": 1.0, "path": str(fp32)}]
    for index, (label, specs) in enumerate(variants(args.quick)):
        if args.only and not any(part in label for part in args.only.split(",")):
            continue
        start = time.perf_counter()
        try:
            result = gp.optimize(str(fp32), specs, calibration=calibration)
            row = _row(label, specs, result, fp32_bytes, reference, evaluation,
                       work / f"variant{index}.onnx")
        except Exception as exc:  # a failing variant is a result too
            row = {"variant": label, "spec": " + ".join(specs),
                   "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        rows.append(row)
        logger.info("%s: %s (%.1f s)", label, {k: row.get(k) for k in
                    ("params_kept", "cos_mean", "ratio", "error") if k in row},
                    time.perf_counter() - start)
    ok = [r for r in rows if "path" in r]
    sessions = {r["variant"]: session(r["path"]) for r in ok}
    for batch, count in ((1, rounds[0]), (16, rounds[1])):
        med = latencies(sessions, latency_feed(tokenizer, batch), rounds=count)
        for r in ok:
            r[f"b{batch}_vs_fp32"] = med[r["variant"]] / med["fp32 (ORT)"]
            r[f"b{batch}_ms"] = med[r["variant"]] * 1e3
    svd = svd_timing(model, quick=args.quick)
    layer = factored_linear_latency(rounds=rounds[1] * 3)
    _report(rows, svd, layer, args.quick, n_eval, n_cal)


def _report(rows, svd, layer, quick, n_eval, n_cal) -> None:
    columns = ["variant", "params_kept", "requested", "budget_miss_pct", "sparsity", "cos_mean",
               "cos_min", "top5", "size_mb", "ratio", "combined_ratio", "weights_compressed_mb",
               "compressed_format", "seconds", "b1_vs_fp32", "b16_vs_fp32", "b16_ms", "error"]
    table = [{k: v for k, v in r.items() if k != "path"} for r in rows]
    markdown = (
        "## Low-rank and sparse all-MiniLM-L6-v2 (encoder linears)\n\n"
        f"{n_eval} evaluation / {n_cal} calibration stdlib sentences (disjoint); cosine and "
        "top-5 of mean-pooled embeddings vs fp32 ORT; `params_kept` = targeted linear "
        "parameters after / before; size = dense ONNX bytes (what ORT loads); "
        "`weights_compressed_mb` = targeted weights in the named compressed storage form "
        "(ORT still runs them dense); latency ORT CPU 2 threads, interleaved medians"
        + (" — **quick mode**" if quick else "") + ".\n\n" + markdown_table(table, columns)
        + "\n\n### Exact vs randomized SVD on the 1536×384 matrices\n\n"
        + markdown_table(svd, list(svd[0].keys()))
        + "\n\n### One 384→1536 linear in ORT (b16×128 tokens): factored vs dense\n\n"
        + markdown_table(layer, list(layer[0].keys())))
    paths = write("low_rank_sparse" + ("-quick" if quick else ""),
                  {"machine": machine(), "quick": quick, "rows": table, "svd": svd,
                   "layer_latency": layer}, markdown)
    print(markdown)
    print("wrote", *paths)


if __name__ == "__main__":
    main()

"""Structured pruning of all-MiniLM-L6-v2 (FFN neurons, attention heads) and of a small CNN.

MiniLM: captured once to FX (dynamic batch and sequence); every variant runs
``prune-channels`` on a copy of that graph, is exported to ONNX and evaluated in ORT against the
fp32 export: parameters, ONNX bytes, cosine mean/min of mean-pooled embeddings on disjoint
stdlib sentences (no healing), seconds in the pass, ORT CPU latency (2 threads, interleaved
medians) at b16×128 as a ratio to fp32. Calibration (activation importance, Taylor) uses other
sentences than the evaluation: 64 of them, and 512 for ``reconstruct=true`` (the least-squares
refit of the consumers needs more rows than their width, 1536 for the FFN).

CNN: a small conv net with BatchNorm and a residual block trained for a few seconds on
scikit-learn's digits (train/test split fixed); 50% (and 25%) of the channels of every
prunable group, the residual stream included, pruned by L1 and by activation importance (and
with ``reconstruct=true``: every convolution and the head refit by least squares on the 512
calibration images), then ``fold-batchnorm``; test accuracy before/after (no fine-tuning) and
ORT latency at batch 512.

    python benchmarks/pruning.py [--quick]
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
from _eval import cosine_rows, embed, latencies, model_bytes, session  # noqa: E402
from _minilm import latency_feed, tokenize  # noqa: E402

logger = logging.getLogger("benchmarks.pruning")


def minilm_rows(quick: bool) -> tuple[list[dict], object]:
    import torch

    import graphpress as gp
    from graphpress.data import load_minilm, stdlib_sentences

    model, tokenizer = load_minilm()
    n_eval, n_cal, n_refit = (64, 16, 64) if quick else (256, 64, 512)
    evaluation = tokenize(tokenizer, stdlib_sentences(n_eval, offset=0), 32)
    calibration, refit_calibration = (
        [{k: torch.from_numpy(v) for k, v in b.items()}
         for b in tokenize(tokenizer, stdlib_sentences(count, offset=1000), 16)]
        for count in (n_cal, n_refit))
    example = {k: v[:2] for k, v in calibration[0].items()}
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=512)
    dims = {name: {0: batch, 1: seq} for name in example}
    gm = gp.capture(model, (), example, dynamic_shapes=dims)
    work = Path(tempfile.mkdtemp(prefix="graphpress-prune-bench-"))

    def export(graph, path):
        gp.export.save(gp.export.to_onnx(graph, (), example, dynamic_shapes=dims), path)

    fp32 = work / "fp32.onnx"
    export(gm, fp32)
    reference = embed(session(fp32), evaluation)
    rows = [{"variant": "fp32", "params_m": gp.graph.measure(gm).params / 1e6,
             "onnx_mb": model_bytes(fp32) / 1e6, "cos_mean": 1.0, "cos_min": 1.0,
             "path": str(fp32)}]
    exact = ["fuse-attention", "avoid-skip-layernorm"]  # exact ONNX passes for CPU speed
    path = work / "fp32-fused.onnx"
    gp.save(gp.optimize(str(fp32), exact).graph, path)
    rows.append({"variant": "fp32 + " + " + ".join(exact), "params_m": rows[0]["params_m"],
                 "onnx_mb": model_bytes(path) / 1e6, "cos_mean": 1.0, "path": str(path)})
    importances = ("l1", "activation") if quick else ("l1", "l2", "activation", "taylor")
    methods = [(importance, False) for importance in importances] + [("activation", True)]
    for scope in ("ffn", "heads"):
        for ratio in (0.25, 0.5):
            for importance, refit in methods:
                spec = (f"prune-channels:ratio={ratio},scope={scope},importance={importance}"
                        + (",reconstruct=true" if refit else ""))
                label = f"{scope} {ratio:.0%} {importance}" + (" + reconstruct" if refit else "")
                try:
                    result = gp.optimize(gm, [spec], calibration=refit_calibration if refit
                                         else calibration)
                    path = work / f"{scope}-{ratio}-{importance}{'-refit' * refit}.onnx"
                    export(result.graph, path)
                    cos = cosine_rows(reference, embed(session(path), evaluation))
                    rows.append({"variant": label, "spec": spec,
                                 "params_m": gp.graph.measure(result.graph).params / 1e6,
                                 "onnx_mb": model_bytes(path) / 1e6,
                                 "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                                 "seconds": result.report.seconds, "path": str(path)})
                    if scope == "ffn" and importance == "activation" and not refit:
                        fused = work / f"{scope}-{ratio}-{importance}-fused.onnx"
                        gp.save(gp.optimize(str(path), exact).graph, fused)
                        rows.append({**rows[-1], "variant": f"{label} + " + " + ".join(exact),
                                     "onnx_mb": model_bytes(fused) / 1e6, "path": str(fused)})
                except Exception as exc:  # a failing variant is a result too
                    rows.append({"variant": label, "spec": spec,
                                 "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                logger.info("%s: %s", label, {k: rows[-1].get(k) for k in
                                             ("params_m", "cos_mean", "error") if k in rows[-1]})
    return rows, tokenizer


def minilm_latency(rows: list[dict], tokenizer, rounds: int) -> None:
    ok = [r for r in rows if "path" in r]
    sessions = {r["variant"]: session(r["path"]) for r in ok}
    med = latencies(sessions, latency_feed(tokenizer, 16), rounds=rounds)
    for r in ok:
        r["b16_ms"] = med[r["variant"]] * 1e3
        r["b16_vs_fp32"] = med[r["variant"]] / med["fp32"]


class SmallCNN:
    """conv(1→32)-BN-ReLU, conv(32→64)-BN-ReLU, conv(64→64)-BN-ReLU + residual, pool, linear."""

    @staticmethod
    def build():
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.c1 = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
                self.c2 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
                self.c3 = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64))
                self.head = nn.Linear(64, 10)

            def forward(self, x):
                y = self.c2(self.c1(x))
                y = torch.relu(y + self.c3(y))
                return self.head(y.mean(dim=(2, 3)))

        return Net()


def trained_digits_cnn(quick: bool):
    """``(net, x, y, train, test, seconds)``: SmallCNN trained on scikit-learn's digits with a
    fixed split (1400 train / 397 test) and seed; ``net`` is left in train mode."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    net = SmallCNN.build()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in range(3 if quick else 8):
        for i in range(0, len(train), 64):
            idx = train[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net, x, y, train, test, time.perf_counter() - start


def cnn_rows(quick: bool) -> list[dict]:
    import torch

    import graphpress as gp

    net, x, y, train, test, train_s = trained_digits_cnn(quick)
    net.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    gm = gp.capture(net, (x[:8],), dynamic_shapes=({0: batch},))
    work = Path(tempfile.mkdtemp(prefix="graphpress-prune-cnn-"))
    calibration = [(x[train[i:i + 128]],) for i in range(0, 512, 128)]
    variants = {"fp32": ["fold-batchnorm"],
                "50% of all channels, l1": ["prune-channels:ratio=0.5,scope=all,importance=l1",
                                            "fold-batchnorm"],
                "50% of all channels, activation": [
                    "prune-channels:ratio=0.5,scope=all,importance=activation", "fold-batchnorm"],
                "50% of all channels, activation + reconstruct": [
                    "prune-channels:ratio=0.5,scope=all,importance=activation,reconstruct=true",
                    "fold-batchnorm"],
                "25% of all channels, activation": [
                    "prune-channels:ratio=0.25,scope=all,importance=activation",
                    "fold-batchnorm"],
                "25% of all channels, activation + reconstruct": [
                    "prune-channels:ratio=0.25,scope=all,importance=activation,reconstruct=true",
                    "fold-batchnorm"]}
    rows, sessions = [], {}
    for label, specs in variants.items():
        result = gp.optimize(gm, specs, calibration=calibration)
        path = work / f"{len(rows)}.onnx"
        gp.export.save(gp.export.to_onnx(result.graph, (x[:8],), dynamic_shapes=({0: batch},)),
                       path)
        sessions[label] = session(path)
        logits = sessions[label].run(None, {sessions[label].get_inputs()[0].name:
                                            x[test].numpy()})[0]
        rows.append({"variant": label, "params_k": gp.graph.measure(result.graph).params / 1e3,
                     "onnx_kb": model_bytes(path) / 1e3,
                     "test_accuracy": float((logits.argmax(1) == y[test].numpy()).mean()),
                     "train_seconds": train_s if label == "fp32" else None})
    feed_name = next(iter(sessions.values())).get_inputs()[0].name
    med = latencies(sessions, {feed_name: x[:512].numpy()}, rounds=10 if quick else 40)
    for row in rows:
        row["b512_ms"] = med[row["variant"]] * 1e3
        row["vs_fp32"] = med[row["variant"]] / med["fp32"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    start_run(logger)
    rows, tokenizer = minilm_rows(args.quick)
    minilm_latency(rows, tokenizer, rounds=3 if args.quick else 12)
    cnn = cnn_rows(args.quick)
    columns = ["variant", "params_m", "onnx_mb", "cos_mean", "cos_min", "seconds", "b16_ms",
               "b16_vs_fp32", "error"]
    markdown = (
        "## Structured pruning (no healing)\n\n### all-MiniLM-L6-v2\n\nFX → prune-channels → "
        "ONNX; cosine of mean-pooled embeddings vs the fp32 export on disjoint stdlib "
        "sentences (calibration: 64 other sentences, 512 for `+ reconstruct`); ORT CPU 2 "
        "threads, b16×128 interleaved medians"
        + (" — **quick mode**" if args.quick else "") + ".\n\n"
        + markdown_table([{k: v for k, v in r.items() if k != "path"} for r in rows], columns)
        + "\n\n### Small CNN on scikit-learn digits (397 test images)\n\n"
        + markdown_table(cnn, list(cnn[0].keys())))
    paths = write("pruning" + ("-quick" if args.quick else ""),
                  {"machine": machine(), "quick": args.quick, "minilm": rows, "cnn": cnn},
                  markdown)
    print(markdown)
    print("wrote", *paths)


if __name__ == "__main__":
    main()

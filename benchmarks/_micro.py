"""Micro-benchmarks for the low-rank targets: SVD algorithms and one factored linear in ORT.

* :func:`svd_timing`: on each ``1536×384`` matrix of all-MiniLM-L6-v2 (FFN in and out, six
  layers each), at ranks 32, 64, 128 and the rank keeping 75% of the layer's parameters
  (``⌊0.75·N·K/(N+K)⌋``): exact truncated SVD (LAPACK, all singular values) vs randomized SVD
  (sketch ``r + 10``, 2 or 4 power iterations). Reported: total seconds of each (best of 3),
  the ratio, and how much larger the randomized rank-r error is than the optimal exact one
  (relative Frobenius error, worst matrix).
* :func:`factored_linear_latency`: ``y = x·W`` with ``x`` ``[16·128, 384]``, ``W``
  ``[384, 1536]`` dense vs ``(x·P)·Q`` at ranks saving 1.5x, 2x, 3x and 4x of the layer's
  parameters; ORT CPU, 2 threads, interleaved medians.
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["svd_timing", "factored_linear_latency"]


def _matrices(model) -> list[np.ndarray]:
    return [p.detach().double().numpy() for name, p in model.named_parameters()
            if p.dim() == 2 and sorted(p.shape) == [384, 1536]]


def _best(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def svd_timing(model, *, quick: bool = False) -> list[dict]:
    """Exact vs randomized SVD at several ranks and power iterations (best of 3 each)."""
    from graphpress.passes.low_rank._svd import randomized_svd, truncated_svd

    mats = _matrices(model)[: 4 if quick else None]
    n, k = mats[0].shape
    exact_s, exact = _best(lambda: [truncated_svd(w) for w in mats])
    rows = []
    for rank in (32, 64, 128, int(0.75 * n * k / (n + k))):
        def error(w, u, s, vt, r=rank):
            return float(np.linalg.norm(w - (u[:, :r] * s[:r]) @ vt[:r]) / np.linalg.norm(w))

        exact_err = [error(w, *f) for w, f in zip(mats, exact)]
        for iters in (2, 4):
            rand_s, rand = _best(lambda r=rank, q=iters: [randomized_svd(w, r, power_iters=q)
                                                          for w in mats])
            excess = [error(w, *f) / e - 1 for w, f, e in zip(mats, rand, exact_err)]
            rows.append({"matrices": len(mats), "shape": f"{n}x{k}", "rank": rank,
                         "power_iters": iters, "exact_s": exact_s, "randomized_s": rand_s,
                         "speedup": exact_s / rand_s,
                         "exact_error_mean": float(np.mean(exact_err)),
                         "excess_error_max_pct": 100 * float(np.max(excess))})
    return rows


def _linear_model(weights: list[np.ndarray]):
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, last = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"y{i}"]))
        last = f"y{i}"
    graph = helper.make_graph(nodes, "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 384])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def factored_linear_latency(rounds: int = 30) -> list[dict]:
    import onnxruntime as ort
    from _eval import latencies

    rng = np.random.default_rng(0)
    k, n = 384, 1536
    models = {"dense": _linear_model([rng.standard_normal((k, n))])}
    ranks = {}
    for saving in (1.5, 2.0, 3.0, 4.0):
        rank = int(n * k / ((n + k) * saving))
        ranks[f"{saving}x"] = rank
        models[f"{saving}x"] = _linear_model([rng.standard_normal((k, rank)),
                                              rng.standard_normal((rank, n))])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    sessions = {name: ort.InferenceSession(m.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
                for name, m in models.items()}
    feed = {"x": rng.standard_normal((16 * 128, k)).astype(np.float32)}
    med = latencies(sessions, feed, rounds=rounds)
    return [{"layer": name, "rank": ranks.get(name, min(n, k)), "ms": med[name] * 1e3,
             "vs_dense": med[name] / med["dense"]} for name in sessions]

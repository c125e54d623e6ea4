"""Evaluation harness shared by the quantization benchmark: quality, size, latency, memory.

* Quality: mean-pooled sentence embeddings (``graphpress.data.mean_pool``) of a compressed
  model against the fp32 model's: per-sentence cosine, and top-k neighbour agreement
  ``(1/n) Σ_i |N_k^ref(i) ∩ N_k^test(i)| / k`` where ``N_k(i)`` are the k sentences most
  cosine-similar to sentence i (itself excluded) within the evaluation set.
* Size: bytes on disk of the model file plus any external-data files beside it.
* Latency: medians over interleaved rounds (every model once per round, so drifts of the
  machine hit all models alike), after warm-up, with identical session options.
* Memory: each quantizer runs in a fresh ``spawn`` child that reports its own peak resident
  set (``VmHWM`` of ``/proc/self/status``, which sees native allocations that ``tracemalloc``
  misses; ``ru_maxrss`` would not do: Linux keeps it across ``exec``, so a spawn child
  starts with its parent's peak) and its resident set just before quantizing (imports
  included).
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["cosine_rows", "topk_agreement", "model_bytes", "embed", "latencies",
           "run_in_child", "session"]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-30)


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def topk_agreement(reference: np.ndarray, test: np.ndarray, k: int = 5) -> float:
    """Mean overlap fraction of each row's k nearest neighbours (cosine), test vs reference."""
    if len(reference) <= k:
        raise ValueError(f"top-{k} agreement needs more than {k} rows, got {len(reference)}")
    ref, got = _neighbours(reference, k), _neighbours(test, k)
    return float(np.mean([len(set(r) & set(g)) / k for r, g in zip(ref, got)]))


def model_bytes(path: str | os.PathLike) -> int:
    """Size of an ONNX model on disk: the file plus the external-data files it names."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    path = Path(path)
    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for t in proto.graph.initializer if uses_external_data(t)
                 for entry in t.external_data if entry.key == "location"}
    return total + sum((path.parent / loc).stat().st_size for loc in locations)


def session(path: str | os.PathLike, threads: int = 2):
    """A CPU ORT session with ``threads`` intra-op threads and default graph optimizations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def embed(sess, batches: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean-pooled embeddings (first output = token states) of every batch, stacked."""
    from graphpress.data import mean_pool

    names = [i.name for i in sess.get_inputs()]
    out = []
    for feed in batches:
        states = sess.run(None, {n: feed[n] for n in names})[0]
        out.append(mean_pool(states, feed["attention_mask"]))
    return np.concatenate(out)


def latencies(sessions: dict[str, object], feed: dict[str, np.ndarray], *, rounds: int,
              warmup: int = 2) -> dict[str, float]:
    """Median seconds per run of each session on ``feed``, rounds interleaved."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feed)
    for _ in range(rounds):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def _status_mb(key: str) -> float:
    """``VmRSS``/``VmHWM`` of this process in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(conn, fn: Callable, args: tuple) -> None:
    result: dict = {}
    try:
        fn(*args, prepare_only=True)  # imports, so the baseline includes them
        base = _status_mb("VmRSS")
        start = time.perf_counter()
        fn(*args)
        result["seconds"] = time.perf_counter() - start
        result["base_rss_mb"] = base
    except Exception as exc:  # recorded in the row, never fatal
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        result["traceback"] = traceback.format_exc()[-2000:]
    result["peak_rss_mb"] = _status_mb("VmHWM")
    conn.send(result)
    conn.close()


def run_in_child(fn: Callable, *args, timeout: float = 1800) -> dict:
    """Run ``fn(*args)`` in a fresh spawn process; return seconds, RSS figures or the error.

    ``fn`` must accept ``prepare_only=True`` (do the imports only) and be importable.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args))
    proc.start()
    child.close()
    try:
        result = parent.recv() if parent.poll(timeout) else {"error": f"timed out after {timeout} s"}
    except EOFError:  # the child died without answering (a crash in native code)
        result = {}
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if proc.exitcode not in (0, None) and "seconds" not in result:
        result.setdefault("error", f"child exited with code {proc.exitcode}")
    return result

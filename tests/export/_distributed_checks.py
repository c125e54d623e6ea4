"""The 2-rank checks of the distributed tests, all run in ONE launch per pytest process.

Starting ranks is what makes these tests slow: every launch spawns fresh interpreters that
import torch, graphpress and transformers (about 5 s on a 2-core machine). So
test_distributed_launch (its successful run), test_distributed_pipeline,
test_distributed_tensor_parallel and test_distributed_ort share one 2-rank launch:
:func:`two_rank_results` runs every check below on both ranks, once, and keeps the per-rank
results; each test asserts on its part in the parent. A check that must fail is
run where its error is raised before any communication (or identically on every rank), so the
ranks stay in step and the launch goes on.

Imported by name from the test modules (``sys.path`` gets this folder), so they share this
module and its cache; the spawned ranks load it by path.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from graphpress.export import session
from graphpress.export.distributed import (
    DistributedError,
    apply_torch_plan,
    launch,
    rank_session,
    run_pipeline,
    run_pipeline_ort,
    run_shard,
    shard_sessions,
)
from graphpress.export.stages import split_stages
from graphpress.graph import capture
from graphpress.passes.partition import PartitionPipeline
from graphpress.passes.partition.shard import shard
from graphpress.passes.partition.tensor_parallel import (
    ShardTensorParallel,
    tensor_parallel_plan,
    to_torch_plan,
)

sys.path.insert(0, str(Path(__file__).parent))
from _distributed_models import (  # noqa: E402
    MODELS,
    leaves,
    load_onnx,
    onnx_bytes,
    staged,
    static_staged,
)

__all__ = ["exported", "two_rank_results"]

_CACHE: dict[str, Any] = {}


def exported() -> dict[str, tuple[bytes, dict, list]]:
    """name → (serialized ONNX with a dynamic batch, feed, single-process ORT outputs)."""
    if "exported" not in _CACHE:
        models = {}
        for name in ("bert", "llama"):
            data, feed = onnx_bytes(name)
            models[name] = (data, feed, session(load_onnx(data), "cpu").run(feed))
        _CACHE["exported"] = models
    return _CACHE["exported"]


def two_rank_results() -> list[dict[str, Any]]:
    """Per rank: ``{"launch": ..., "pipeline": ..., "tensor_parallel": ..., "ort": ...}`` (one
    launch, cached; a failed launch is cached too, so every test that needs it reports the same
    error)."""
    if "two_ranks" not in _CACHE:
        # the models go by file: launch arguments above a pipe's buffer (64 KiB) would make
        # each rank wait for the previous one to import graphpress before it is even spawned
        with tempfile.TemporaryDirectory(prefix="graphpress-dist-test-") as tmp:
            onnx = {}
            for name, (data, feed, _) in exported().items():
                path = Path(tmp) / f"{name}.onnx"
                path.write_bytes(data)
                onnx[name] = (str(path), feed)
            try:
                _CACHE["two_ranks"] = launch(_checks, 2, onnx, time.time(), timeout=180)
            except DistributedError as exc:
                _CACHE["two_ranks"] = exc
    if isinstance(_CACHE["two_ranks"], DistributedError):
        raise DistributedError(str(_CACHE["two_ranks"]))
    return _CACHE["two_ranks"]


def _checks(rank: int, world: int, onnx: dict[str, tuple[str, dict]],
            launched_at: float) -> dict[str, Any]:
    return {"launch": _all_reduce(rank, world, 2.0, launched_at),
            "pipeline": _pipeline_checks(rank, world),
            "tensor_parallel": _tensor_parallel_checks(rank, world),
            "ort": {"pipeline": _ort_pipeline(rank, world, *onnx["bert"], microbatches=2),
                    "tensor_parallel": _ort_tensor_parallel(rank, world, *onnx["llama"])}}


def _error_text(call: Callable[[], Any]) -> str | None:
    try:
        call()
    except DistributedError as exc:
        return str(exc)
    return None


def _max_error(out, reference) -> float:
    return max((o - r).abs().max().item() for o, r in zip(out, reference))


def _all_reduce(rank: int, world: int, scale: float, launched_at: float) -> dict:
    """What launch() set up: the group, one intra-op thread, RANK; when the rank started."""
    startup = time.time() - launched_at
    value = torch.tensor([float(rank + 1)]) * scale
    torch.distributed.all_reduce(value)
    return {"value": value, "pid": os.getpid(), "threads": torch.get_num_threads(),
            "rank_env": os.environ["RANK"], "startup": startup}


# FX pipeline (torch.distributed.pipelining) -------------------------------------------------

def _schedules(rank: int, world: int, gm, stages, inputs, microbatches: int) -> dict:
    """GPipe and 1F1B; the max error against ``gm`` on the last stage's rank."""
    assert len(stages) == world
    with torch.no_grad():
        reference = leaves(gm(*inputs))
    errors = {}
    for schedule in ("gpipe", "1f1b"):
        given = inputs if rank == 0 else None  # only the first stage needs the inputs
        out = run_pipeline(stages, given, schedule=schedule, microbatches=microbatches)
        if rank != world - 1:
            assert out is None
            continue
        assert len(out) == len(reference)
        assert all(o.shape == r.shape for o, r in zip(out, reference))
        errors[schedule] = _max_error(out, reference)
    return {"errors": errors, "crossing": [len(s.inputs) for s in stages[1:]]}


def _pipeline_checks(rank: int, world: int) -> dict:
    results = {}
    for name in ("llama", "mlp"):
        gm, stages, inputs = staged(name, world)
        results[name] = _schedules(rank, world, gm, stages, inputs, 2)
    # (the MLP's stages from here on) stage_ranks=(1, 0): stage 0 on rank 1, outputs on rank 0
    with torch.no_grad():
        reference = leaves(gm(*inputs))
    out = run_pipeline(stages, inputs if rank == 1 else None, stage_ranks=(1, 0))
    results["swapped"] = None if out is None else _max_error(out, reference)
    # batch 4 in 3 microbatches: the first stage's rank refuses before any communication, so
    # only it calls (the other rank would wait for it in the first broadcast)
    results["not_split"] = (_error_text(lambda: run_pipeline(stages, inputs, microbatches=3))
                            if rank == 0 else None)
    # a static batch: every rank fails on its fake microbatch run, after the shape broadcast
    static, static_inputs = static_staged(world)
    results["static"] = _error_text(
        lambda: run_pipeline(static, static_inputs if rank == 0 else None, microbatches=2))
    return results


# FX tensor parallel: shards with functional collectives, and parallelize_module --------------

def _fx_shard(rank: int, world: int, name: str) -> dict:
    model, inputs = MODELS[name]()
    gm = capture(model, inputs)
    with torch.no_grad():
        reference, eager = leaves(gm(*inputs)), leaves(model(*inputs))
    stats = ShardTensorParallel(world_size=world)(gm).stats
    part = shard(gm, rank)  # collectives on the default group
    out = run_shard(part, inputs)
    reduces = sum("all_reduce" in str(n.target) for n in part.graph.graph.nodes)
    local = sum(p.numel() for p in part.graph.parameters())
    # the same split through DTensor: parallelize_module on an eager copy
    plan = tensor_parallel_plan(gm, world_size=world)
    sharded = apply_torch_plan(copy.deepcopy(model), to_torch_plan(plan))
    with torch.no_grad():
        torch_out = [t.full_tensor() if hasattr(t, "full_tensor") else t
                     for t in leaves(sharded(*inputs))]
    # (MLP) each rank runs the other rank's shard: refused on every rank before any collective
    other = shard(gm, world - 1 - rank) if name == "mlp" else None
    return {
        "shard_error": _max_error(out, reference), "torch_error": _max_error(torch_out, eager),
        "outputs": len(out), "expected_outputs": len(reference),
        "all_reduces": reduces, "stats": stats, "plan": plan,
        "local_params": local, "params": sum(p.numel() for p in gm.parameters()),
        "wrong_shard": None if other is None else _error_text(lambda: run_shard(other, inputs)),
    }


def _tensor_parallel_checks(rank: int, world: int) -> dict:
    return {name: _fx_shard(rank, world, name) for name in ("mlp", "llama")}


# ONNX Runtime: a pipeline of per-stage sessions, tensor-parallel segments ---------------------

def _ort_pipeline(rank: int, world: int, path: str, feed: dict, microbatches: int) -> dict:
    model = load_onnx(Path(path).read_bytes())
    PartitionPipeline(stages=world, dims=(f"batch={len(next(iter(feed.values())))}",))(model)
    stages = split_stages(model)
    sess = rank_session(stages[rank].graph, intra_op_threads=1)
    out = run_pipeline_ort(stages, feed if rank == 0 else None, microbatches=microbatches,
                           session=sess)
    return {"outputs": out, "providers": sess.providers, "requested": sess.requested,
            "crossing": [len(s.inputs) for s in stages[1:]]}


def _ort_tensor_parallel(rank: int, world: int, path: str, feed: dict) -> dict:
    model = load_onnx(Path(path).read_bytes())
    ShardTensorParallel(world_size=world)(model)
    part = shard(model, rank)
    sessions = shard_sessions(part, intra_op_threads=1)
    out = run_shard(part, feed, sessions=sessions)
    return {"outputs": out, "segments": len(part.segments),
            "collectives": [c.kind for c in part.collectives]}

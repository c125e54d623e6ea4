"""``graphpress run-distributed MODEL.onnx --pp N --tp M``: run an ONNX model on N×M ranks.

Launch it with torchrun, one process per rank::

    torchrun --standalone --nproc-per-node 4 -m graphpress run-distributed model.onnx \\
        --pp 2 --tp 2 --microbatches 2 --inputs inputs.npz --out outputs.npz

Every rank loads the model, annotates it with ``partition-pipeline:stages=N`` (symbolic
dimensions bound from the inputs' shapes) and ``shard-tensor-parallel:world_size=M``, takes
its tensor-parallel shard (rank ``divmod(rank, M)[1]``) and runs the segments of its pipeline
stage on ONNX Runtime (CUDA on ``LOCAL_RANK`` when available, else CPU), with
torch.distributed moving tensors between stages and doing the all-reduces between segments.
Rank 0 collects the outputs, writes them atomically to ``--out`` (an .npz keyed by output
name), and prints one line: ranks, providers, and the largest difference from the same model
run in one ONNX Runtime session (exit code 1 if it exceeds ``--tolerance``).

Without ``--inputs`` the model's inputs must have static shapes; floats are drawn from a seeded
normal distribution and integer inputs are ones (valid token ids and attention masks).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from graphpress.graph.errors import GraphpressError

__all__ = ["add_arguments", "run", "main"]

logger = logging.getLogger(__name__)

HELP = "run an ONNX model pipeline × tensor parallel on torchrun ranks (ORT sessions)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="path to an .onnx file")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage")
    parser.add_argument("--microbatches", type=int, default=1, help="split the batch (dim 0)")
    parser.add_argument("--inputs", metavar="NPZ", help="one array per model input, by name")
    parser.add_argument("--out", metavar="NPZ", help="where rank 0 writes the outputs")
    parser.add_argument("--providers", default="auto", help="auto (CUDA first), cpu or cuda")
    parser.add_argument("--intra-op-threads", type=int, default=None, metavar="N",
                        help="ORT threads per rank (default: CPU cores / local ranks)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest allowed difference from single-process ORT")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the single-process parity check on rank 0")


def run(args: argparse.Namespace) -> int:
    """The command body; runs on every rank (only rank 0 prints and writes)."""
    import torch.distributed as dist

    from graphpress.export.distributed import init_from_env

    if args.pp < 1 or args.tp < 1 or args.microbatches < 1:
        raise GraphpressError("--pp, --tp and --microbatches must be at least 1")
    rank, world = init_from_env()
    try:
        if world != args.pp * args.tp:
            raise GraphpressError(
                f"--pp {args.pp} × --tp {args.tp} needs {args.pp * args.tp} ranks, torchrun "
                f"started {world}; use --nproc-per-node {args.pp * args.tp}")
        return _run_ranks(args, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_ranks(args: argparse.Namespace, rank: int) -> int:
    import torch.distributed as dist

    from graphpress.export.distributed import (
        pp_tp_groups,
        run_pp_tp_ort,
        segment_stages,
        shard_sessions,
    )
    from graphpress.graph import load
    from graphpress.passes.partition import PartitionPipeline
    from graphpress.passes.partition.shard import shard
    from graphpress.passes.partition.tensor_parallel import ShardTensorParallel

    model = load(args.model)
    inputs = _inputs(model, args.inputs)
    dims = tuple(f"{k}={v}" for k, v in sorted(_bound_dims(model, inputs).items()))
    PartitionPipeline(stages=args.pp, dims=dims)(model)
    ShardTensorParallel(world_size=args.tp)(model)
    groups = pp_tp_groups(args.pp, args.tp, device_type="cpu")
    part = shard(model, groups.tp_rank)
    mine = segment_stages(part, args.pp)[groups.pp_rank]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = args.intra_op_threads or max(1, (os.cpu_count() or 1) // local)
    sessions = shard_sessions(part, args.providers, indices=mine, intra_op_threads=threads)
    outputs = run_pp_tp_ort(part, inputs if groups.pp_rank == 0 else None, groups,
                            microbatches=args.microbatches, sessions=sessions)
    providers = sorted({p for s in sessions for p in s.providers[:1]})
    gathered: list[Any] = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(providers, gathered, dst=0)
    last = (args.pp - 1) * args.tp  # the last stage's tensor-parallel rank 0
    box = [outputs]
    if last != 0:
        if rank == last:
            dist.send_object_list(box, dst=0)
        elif rank == 0:
            dist.recv_object_list(box, src=last)
    if rank != 0:
        return 0
    names = [v.name for v in load(args.model).graph.outputs]
    result = dict(zip(names, box[0]))
    if args.out:
        _write_npz_atomic(Path(args.out), result)
    used = sorted({p for ranks in gathered for p in ranks})
    line = (f"run-distributed: pp={args.pp} tp={args.tp} microbatches={args.microbatches} on "
            f"{args.pp * args.tp} ranks ({', '.join(used)}): {len(result)} outputs")
    status = 0
    if not args.no_check:
        from graphpress.export import session

        reference = session(args.model, args.providers).run(inputs)
        error = max(float(np.max(np.abs(result[n] - r))) if r.size else 0.0
                    for n, r in zip(names, reference))
        status = 0 if error <= args.tolerance else 1
        line += (f", max |diff| vs single-process ORT {error:.3g} "
                 f"({'ok' if status == 0 else 'MISMATCH'}, tolerance {args.tolerance:g})")
    if args.out:
        line += f"; wrote {args.out}"
    print(line)
    return status


def _inputs(model: Any, path: str | None) -> dict[str, np.ndarray]:
    import zipfile

    names = [v.name for v in model.graph.inputs]
    if path:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise GraphpressError(f"{path}: cannot read inputs ({exc}); pass an .npz written "
                                  "by numpy.savez with one array per model input") from None
        missing = [n for n in names if n not in arrays]
        if missing:
            raise GraphpressError(f"{path} lacks model inputs {missing}; it has "
                                  f"{sorted(arrays)}")
        return {n: arrays[n] for n in names}
    rng, inputs = np.random.default_rng(0), {}
    for value in model.graph.inputs:
        dims = list(value.shape) if value.shape is not None else None
        if dims is None or not all(isinstance(d, int) for d in dims):
            raise GraphpressError(f"input {value.name!r} has shape {dims}, not static; pass "
                                  "--inputs inputs.npz with one array per model input")
        dtype = value.dtype.numpy() if value.dtype is not None else np.float32
        inputs[value.name] = (rng.standard_normal(dims).astype(dtype)
                              if np.issubdtype(dtype, np.floating) else np.ones(dims, dtype))
    return inputs


def _bound_dims(model: Any, inputs: dict[str, np.ndarray]) -> dict[str, int]:
    """Symbolic input dimensions (``batch``, ``seq``) bound to the given arrays' sizes."""
    bound: dict[str, int] = {}
    for value in model.graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if not isinstance(dim, int) and getattr(dim, "value", None):
                bound[str(dim.value)] = int(inputs[value.name].shape[axis])
    return bound


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``torchrun -m graphpress._run_distributed ...``), same as the CLI's."""
    parser = argparse.ArgumentParser(prog="graphpress run-distributed", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except GraphpressError as exc:
        print(f"graphpress: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

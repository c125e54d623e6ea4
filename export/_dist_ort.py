"""ONNX Runtime pipeline stages, one session per rank, tensors moved by torch.distributed.

Each rank of the pipeline group builds one ONNX Runtime session for its stage
(:func:`rank_session`: the CUDA execution provider with ``device_id`` = the local rank when
this onnxruntime can use it, else the CPU provider; what it got is in ``Session.providers``).
Sessions run through IO binding (:func:`run_bound`): inputs are bound as ``OrtValue``\\ s
sharing the torch tensors' memory (DLPack), outputs are allocated by ONNX Runtime on the
session's device and handed back as torch tensors without a copy. The same code runs on CPU
and CUDA; only the bound device differs.

The pipeline loop (:func:`pipeline_loop`) is a forward-only GPipe: the first rank splits the
batch into microbatches; every rank, for each microbatch in order, receives its inputs from the
previous rank (shapes in a small header, since ONNX stages may have symbolic dimensions), runs,
and posts its outputs to the next rank without waiting, so rank ``r`` works on microbatch
``m`` while rank ``r + 1`` works on ``m - 1``. The last rank concatenates the outputs over the
microbatches (dimension 0) and returns them as numpy arrays; the others return ``None``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.distributed as dist

from ._dist_common import (
    global_rank,
    group_rank,
    group_size,
    ordered_inputs,
    resolve_group,
    split_microbatches,
)
from ._dist_launch import DistributedError
from ._dist_p2p import recv_tensors, send_tensors, wait_all
from .ort import CPU, CUDA, Session, session

__all__ = ["rank_session", "run_bound", "pipeline_loop", "run_pipeline_ort", "transport_device"]

logger = logging.getLogger(__name__)

#: ``program(inputs in stage order) -> outputs in stage order``
Program = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


def rank_session(model: Any, providers: str | Sequence[str] = "auto", *,
                 device_id: int | None = None, intra_op_threads: int | None = None) -> Session:
    """An ORT session on this rank's device: CUDA ``device_id`` (default ``LOCAL_RANK``) or CPU."""
    built = session(model, providers, intra_op_threads=intra_op_threads)
    device_id = int(os.environ.get("LOCAL_RANK", "0")) if device_id is None else device_id
    if CUDA in built.providers and device_id:
        try:  # session() decides whether CUDA loads at all; then move it to this rank's GPU
            built.inference_session.set_providers(
                [CUDA, CPU], [{"device_id": str(device_id)}, {}])
        except Exception as exc:
            raise DistributedError(
                f"could not move the ONNX Runtime session to GPU {device_id}: "
                f"{str(exc).strip()[:300]}; set CUDA_VISIBLE_DEVICES per rank instead and pass "
                "device_id=0") from None
    logger.info("rank %s: ONNX Runtime providers %s (requested %s, device_id %d)",
                os.environ.get("RANK", "?"), built.providers, built.requested, device_id)
    return built


def run_bound(sess: Session, inputs: Mapping[str, torch.Tensor],
              outputs: Sequence[str]) -> list[torch.Tensor]:
    """Run ``sess`` with IO binding: ``inputs`` by name in, ``outputs`` (names) out as tensors."""
    cuda = CUDA in sess.providers
    device_id = _device_id(sess) if cuda else 0
    binding = sess.inference_session.io_binding()
    for name in sess.input_names:
        if name not in inputs:
            raise DistributedError(f"the ONNX stage takes {name!r}, which was not given; "
                                   f"given: {sorted(inputs)}")
        tensor = inputs[name].contiguous()
        if tensor.dtype == torch.bool:  # DLPack has no ORT bool mapping
            value = ort.OrtValue.ortvalue_from_numpy(tensor.cpu().numpy())
        else:
            value = ort.OrtValue.from_dlpack(tensor)
        binding.bind_ortvalue_input(name, value)
    for name in outputs:
        binding.bind_output(name, "cuda" if cuda else "cpu", device_id)
    try:
        sess.inference_session.run_with_iobinding(binding)
    except Exception as exc:  # ORT raises its own pybind types
        raise DistributedError(f"ONNX Runtime failed to run a stage: "
                               f"{str(exc).strip()[:300]}") from None
    return [_to_torch(v) for v in binding.get_outputs()]


def transport_device(group: dist.ProcessGroup) -> torch.device:
    """CUDA tensors for an NCCL group (when torch has CUDA), CPU tensors otherwise."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_pipeline_ort(stages: Sequence[Any], inputs: Mapping[str, Any] | Sequence[Any] | None = None,
                     *, microbatches: int = 1, group: dist.ProcessGroup | None = None,
                     providers: str | Sequence[str] = "auto", device_id: int | None = None,
                     intra_op_threads: int | None = None,
                     session: Session | None = None) -> tuple[np.ndarray, ...] | None:
    """Run ONNX ``stages`` (from ``split_stages``) as a pipeline over ``group``, rank ``i`` holding
    stage ``i``; call on every rank. ``inputs`` are needed on the first rank. Pass ``session``
    (built by :func:`rank_session` for this rank's stage) to reuse one across calls.
    Returns the graph outputs (numpy, whole batch) on the last rank, ``None`` elsewhere.
    """
    group = resolve_group(group)
    if len(stages) != group_size(group):
        raise DistributedError(f"{len(stages)} ONNX stages need a pipeline group of "
                               f"{len(stages)} ranks; this group has {group_size(group)}")
    stage = stages[group_rank(group)]
    sess = session or rank_session(stage.graph, providers, device_id=device_id,
                                   intra_op_threads=intra_op_threads)
    names = [info.name for info in stage.inputs]
    outputs = [info.name for info in stage.outputs]

    def program(values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return run_bound(sess, dict(zip(names, values)), outputs)

    return pipeline_loop(program, stages[0].inputs, len(stage.inputs), inputs,
                         microbatches=microbatches, group=group)


def pipeline_loop(program: Program, graph_inputs: Sequence[Any], takes: int,
                  inputs: Mapping[str, Any] | Sequence[Any] | None, *, microbatches: int,
                  group: dist.ProcessGroup) -> tuple[np.ndarray, ...] | None:
    """Forward-only GPipe over ``group``: this rank runs ``program`` on each microbatch."""
    index, count = group_rank(group), group_size(group)
    device = transport_device(group)
    if index == 0:
        if inputs is None:
            raise DistributedError("the first stage's rank needs the graph inputs; pass inputs=")
        chunks = split_microbatches(ordered_inputs(graph_inputs, inputs, "stage 0"),
                                    microbatches)
    posted, results = [], []
    for m in range(microbatches):
        if index == 0:
            values = chunks[m]
        else:
            values = recv_tensors(takes, global_rank(group, index - 1), group, device)
        outs = program(values)
        if index == count - 1:
            results.append([o.cpu() for o in outs])
        else:
            posted += send_tensors(outs, global_rank(group, index + 1), group, device)
    wait_all(posted)
    if index != count - 1:
        return None
    return tuple(torch.cat([r[j] for r in results]).numpy() for j in range(len(results[0])))


def _device_id(sess: Session) -> int:
    options = sess.inference_session.get_provider_options().get(CUDA, {})
    return int(options.get("device_id", 0))


def _to_torch(value: ort.OrtValue) -> torch.Tensor:
    if value.device_name().lower() == "cpu" or torch.cuda.is_available():
        if value.data_type() != "tensor(bool)":
            return torch.from_dlpack(value)
    return torch.from_numpy(value.numpy())  # bool, or CUDA memory with a CPU-only torch

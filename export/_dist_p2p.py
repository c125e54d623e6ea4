"""Point-to-point transfer of a fixed number of tensors whose shapes the receiver does not know.

ONNX stages may have symbolic dimensions (batch, sequence), so a receiving rank cannot size its
buffers from the graph alone. Each transfer is therefore a small int64 header, one row per
tensor ``[dtype code, ndim, d0, ..., d7]``, followed by the tensors themselves, all sent
asynchronously (``isend``) in one fixed order that ``recv_tensors`` mirrors; messages between
two ranks arrive in the order they were posted, so several transfers may be in flight.
Boolean tensors travel as ``uint8`` (not every backend moves ``bool``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ._dist_launch import DistributedError

__all__ = ["send_tensors", "recv_tensors", "wait_all", "MAX_DIMS"]

logger = logging.getLogger(__name__)

MAX_DIMS = 8
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


def send_tensors(tensors: Sequence[torch.Tensor], dst: int, group: dist.ProcessGroup | None,
                 device: torch.device) -> list[tuple[dist.Work, torch.Tensor]]:
    """Post the header and ``tensors`` to global rank ``dst``; return (work, buffer) pairs.

    Wait on every work (or let the buffers outlive the transfer) before reusing them.
    """
    header = torch.full((len(tensors), 2 + MAX_DIMS), -1, dtype=torch.int64)
    buffers = []
    for row, tensor in enumerate(tensors):
        if tensor.dtype not in _DTYPES or tensor.dim() > MAX_DIMS:
            raise DistributedError(
                f"cannot send a {tensor.dtype} tensor of rank {tensor.dim()} between ranks; "
                f"supported: {[str(d) for d in _DTYPES]}, at most {MAX_DIMS} dimensions")
        header[row, 0], header[row, 1] = _DTYPES.index(tensor.dtype), tensor.dim()
        header[row, 2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        wire = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
        buffers.append(wire.to(device).contiguous())
    header = header.to(device)
    return [(dist.isend(t, dst, group=group), t) for t in (header, *buffers)]


def recv_tensors(count: int, src: int, group: dist.ProcessGroup | None,
                 device: torch.device) -> list[torch.Tensor]:
    """Receive ``count`` tensors sent by :func:`send_tensors` from global rank ``src``."""
    header = torch.empty((count, 2 + MAX_DIMS), dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    tensors = []
    for code, ndim, *dims in header.cpu().tolist():
        dtype = _DTYPES[code]
        wire = torch.uint8 if dtype == torch.bool else dtype
        tensor = torch.empty(dims[:ndim], dtype=wire, device=device)
        dist.recv(tensor, src, group=group)
        tensors.append(tensor.to(torch.bool) if dtype == torch.bool else tensor)
    return tensors


def wait_all(works: Sequence[tuple[dist.Work, torch.Tensor]]) -> None:
    for work, _ in works:
        work.wait()

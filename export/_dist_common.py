"""Small pieces shared by the distributed runtimes: groups, dtypes, inputs, microbatches.

Process groups default to the default (WORLD) group; "group rank" is a rank's index inside the
group, which decides the stage or shard it holds. Inputs are given by name (a mapping) or in a
stage's input order (a sequence); microbatches split dimension 0 of every graph input into
``microbatches`` equal chunks (``torch.tensor_split`` semantics, so the batch must divide).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._dist_launch import DistributedError

__all__ = ["resolve_group", "group_rank", "group_size", "global_rank", "ordered_inputs",
           "split_microbatches", "to_tensor"]

logger = logging.getLogger(__name__)


def resolve_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """``group`` or the default group; raises if no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "no torch.distributed process group is initialised; call this inside a rank "
            "started by graphpress.export.distributed.launch, or call init_from_env() first "
            "in a script started by torchrun")
    return group if group is not None else dist.group.WORLD


def group_rank(group: dist.ProcessGroup) -> int:
    return dist.get_rank(group)


def group_size(group: dist.ProcessGroup) -> int:
    return dist.get_world_size(group)


def global_rank(group: dist.ProcessGroup, rank_in_group: int) -> int:
    """The global rank of ``rank_in_group`` (send/recv address global ranks)."""
    return dist.get_global_rank(group, rank_in_group)


def to_tensor(value: Any) -> torch.Tensor:
    """A CPU-or-device torch tensor for ``value`` (tensor, numpy array or scalar)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(np.ascontiguousarray(np.asarray(value)))


def ordered_inputs(infos: Sequence[Any], inputs: Mapping[str, Any] | Sequence[Any] | Any,
                   what: str) -> list[torch.Tensor]:
    """``inputs`` as tensors in the order of ``infos`` (ValueInfos with ``.name``)."""
    names = [info.name for info in infos]
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise DistributedError(f"{what} takes inputs {names}; missing {missing}: pass "
                                   "them by these names or as a sequence in this order")
        return [to_tensor(inputs[n]) for n in names]
    values = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if len(values) != len(names):
        raise DistributedError(f"{what} takes {len(names)} inputs ({', '.join(names)}), got "
                               f"{len(values)}; pass a mapping by name or one value each")
    return [to_tensor(v) for v in values]


def split_microbatches(tensors: Sequence[torch.Tensor], microbatches: int) -> list[list[torch.Tensor]]:
    """``microbatches`` lists of chunks, splitting dim 0 of every tensor equally."""
    if microbatches < 1:
        raise DistributedError(f"microbatches must be at least 1, got {microbatches}")
    for t in tensors:
        if t.dim() == 0 or t.shape[0] % microbatches:
            raise DistributedError(
                f"an input of shape {tuple(t.shape)} cannot be split into {microbatches} equal "
                "microbatches along dimension 0; pick microbatches dividing the batch size")
    chunks = [torch.tensor_split(t, microbatches, dim=0) for t in tensors]
    return [[c[m].contiguous() for c in chunks] for m in range(microbatches)]

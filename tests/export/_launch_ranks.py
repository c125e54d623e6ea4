"""Rank functions of the failing launches in test_distributed_launch.

They live in a module that imports only ``torch.distributed``: a spawned rank imports the
module of its function, so these ranks skip ``graphpress.export.distributed`` (and with it
``torch.distributed.pipelining``) and start about a second sooner.
"""

from __future__ import annotations

import os
import time

import torch.distributed as dist

__all__ = ["raises_on_one", "hangs_on_one", "dies"]


def raises_on_one(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank one is broken on purpose")
    dist.barrier()  # rank 0 would wait forever for rank 1


def hangs_on_one(rank: int, world: int) -> None:
    if rank == 1:
        time.sleep(600)


def dies(rank: int, world: int) -> None:
    if rank == 0:
        os._exit(3)
    time.sleep(600)

"""Measured memory on CPU, to hold :func:`~graphpress.graph.memory.estimate_memory` to account.

* :func:`storage_bytes`: bytes of the storages behind some tensors, each storage once.
* :func:`module_storage_bytes`: what a module holds (parameters, buffers and constant tensor
  attributes, as an FX GraphModule keeps them), shared storages once.
* :func:`allocator_peak`: runs ``fn()`` under ``torch.profiler`` with ``profile_memory=True``.
  Every allocation and free of the CPU allocator is a raw ``[memory]`` event (positive for a
  malloc, negative for a free); the largest running sum in time order is the peak of the bytes
  allocated during the call, peaks inside one op included. Tensors that exist before the call
  (the inputs, the weights) are not in it.
* :func:`run_peak_bytes`: ``module(*args)`` once to warm up (lazy initialisation is not an
  activation), then its allocator peak plus the inputs it holds.

The profiler's raw event list is a private API; torch is pinned, and the tests check these
numbers against the estimates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["storage_bytes", "module_storage_bytes", "allocator_peak", "run_peak_bytes"]


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def module_storage_bytes(module: torch.nn.Module) -> int:
    """Storage bytes of every tensor ``module`` holds: parameters, buffers and tensor
    attributes of it and its submodules, shared storages once."""
    found = list(module.state_dict(keep_vars=True).values())
    for _, sub in module.named_modules():
        found += [v for v in vars(sub).values() if isinstance(v, torch.Tensor)]
    return storage_bytes(found)


def allocator_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes the CPU allocator has handed out at once while ``fn()`` runs (no grad)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU],
                                  profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def run_peak_bytes(module: Callable[..., Any], args: tuple) -> int:
    """Peak activation bytes of ``module(*args)`` after one warm-up call, inputs included."""
    with torch.no_grad():
        module(*args)
    return allocator_peak(lambda: module(*args)) + storage_bytes(
        a for a in args if isinstance(a, torch.Tensor))

"""Measured memory of running a module on CPU: what torch's allocator really handed out.

``measured_activation_peak(module, args)`` runs ``module(*args)`` once under
``torch.profiler`` with ``profile_memory=True``. Every allocation and free of the CPU allocator
is a raw ``[memory]`` event (positive for a malloc, negative for a free). Sorting them by start
time and taking the largest running sum gives the peak bytes allocated during the call, peaks
inside one op included; the inputs, which exist
before the call, are added on top. Weights are measured as the storage bytes of the module's
own tensors (parameters, buffers and constant attributes), each storage once.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["measured_activation_peak", "module_weight_bytes"]


def _storage_bytes(tensors) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def module_weight_bytes(module: torch.nn.Module) -> int:
    """Storage bytes of every tensor the module holds (shared storages counted once)."""
    tensors = [t for _, t in module.state_dict(keep_vars=True).items()]
    tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
    for _, sub in module.named_modules():
        tensors += [v for v in vars(sub).values() if isinstance(v, torch.Tensor)]
    return _storage_bytes(tensors)


def measured_activation_peak(module: torch.nn.Module, args: tuple) -> int:
    """Peak bytes of live activations while ``module(*args)`` runs (inputs included)."""
    with torch.no_grad():
        module(*args)  # warm-up: lazy initialisation allocates once and is not activations
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            module(*args)
    # The raw allocator events (private API; torch is pinned): one per malloc/free, in order.
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak + _storage_bytes(a for a in args if isinstance(a, torch.Tensor))

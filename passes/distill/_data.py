"""Batches in, model calls out: split inputs from labels, move to a device, pick the output.

A batch is a dict of tensors (keyword inputs), a tuple/list (positional inputs), an
``(args, kwargs)`` pair (both, for graphs captured with both) or one tensor.
``labels`` names where a batch keeps its labels: a dict key, a tuple index, or a callable
``batch -> (inputs, labels)``; without labels the teacher's outputs are the only targets.
The distilled output is ``output(model_outputs)`` — or ``output(model_outputs, inputs)`` when
the callable takes two parameters, for pooling that needs the batch (an attention mask);
``inputs`` is the batch's keyword dict, else its positional tuple — or, by default, the tensor
itself, the ``logits`` / ``last_hidden_state`` of a dict-like output (Hugging Face
``ModelOutput``), else its first tensor; for a tuple, its first element.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphpress.graph.errors import PreconditionError

from .._collect import call_arguments

__all__ = ["split_batch", "to_device", "select_output", "call", "check_reiterable"]

logger = logging.getLogger(__name__)

_PREFERRED = ("logits", "last_hidden_state", "sentence_embedding", "pooler_output")


def split_batch(batch: Any, labels: Any) -> tuple[tuple, dict, Any]:
    """``(args, kwargs, labels)`` of one batch."""
    target = None
    if callable(labels) and not isinstance(labels, (str, int)):
        batch, target = labels(batch)
    elif isinstance(labels, str):
        if not isinstance(batch, Mapping) or labels not in batch:
            raise PreconditionError(f"distill: labels={labels!r} names a dict key, but a batch "
                                    f"is a {type(batch).__name__} without it; yield dicts "
                                    "with that key or pass labels=None")
        target = batch[labels]
        batch = {k: v for k, v in batch.items() if k != labels}
    elif isinstance(labels, int):
        if not isinstance(batch, (tuple, list)) or not -len(batch) <= labels < len(batch):
            raise PreconditionError(f"distill: labels={labels} is a tuple index, but a batch "
                                    f"is a {type(batch).__name__} without that element")
        target = batch[labels]
        index = labels % len(batch)
        batch = tuple(v for i, v in enumerate(batch) if i != index)
    if not isinstance(batch, (Mapping, tuple, list, torch.Tensor)):
        raise PreconditionError(f"distill: a batch must be a dict of tensors, a tuple, an "
                                f"(args, kwargs) pair or a tensor, got {type(batch).__name__}")
    return (*call_arguments(batch), target)


def to_device(tree: Any, device: torch.device) -> Any:
    """Every tensor of ``tree`` on ``device``."""
    return pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, tree)


def call(module: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``module(*args, **kwargs)``; a failed shape guard of a captured graph says what to do."""
    try:
        return module(*args, **kwargs)
    except AssertionError as exc:
        if "Guard failed" not in str(exc):
            raise
        raise PreconditionError(
            f"distill: a batch does not fit the shapes the graph was captured with ({exc}); "
            "batch to the captured shapes or capture with dynamic_shapes "
            "(graphpress.capture(model, args, dynamic_shapes=...))") from None


def select_output(outputs: Any, output: Callable[..., Any] | None,
                  inputs: Any = None) -> torch.Tensor:
    """The tensor to distil from a model's outputs (see the module docstring); ``inputs``
    (the batch's keyword dict, else its positional tuple) go to a two-parameter ``output``."""
    if output is None:
        chosen = _default_output(outputs)
    else:
        chosen = output(outputs, inputs) if _takes_inputs(output) else output(outputs)
    if not isinstance(chosen, torch.Tensor) or not chosen.is_floating_point():
        raise PreconditionError(
            f"distill: the selected output is a {type(chosen).__name__}"
            f"{'' if not isinstance(chosen, torch.Tensor) else ' of ' + str(chosen.dtype)}, "
            "not a float tensor; pass output=lambda out: ... picking logits or an embedding")
    return chosen


def _default_output(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) or hasattr(outputs, "keys"):
        keys = list(outputs.keys())
        for key in _PREFERRED:
            if key in keys:
                return outputs[key]
        return outputs[keys[0]] if keys else None
    if isinstance(outputs, (tuple, list)) and outputs:
        return outputs[0]
    return outputs


def _takes_inputs(function: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: one argument
        return False
    kinds = [p.kind for p in parameters if p.default is inspect.Parameter.empty
             or p.kind is inspect.Parameter.VAR_POSITIONAL]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return (sum(k in positional for k in kinds) >= 2
            or inspect.Parameter.VAR_POSITIONAL in kinds)


def check_reiterable(batches: Iterable[Any], passes: int, name: str = "batches") -> None:
    """Refuse a one-shot iterator when the data must be read more than once."""
    if not isinstance(batches, Iterable) or isinstance(batches, (Mapping, torch.Tensor)):
        raise PreconditionError(f"distill: {name} must be an iterable of batches (a list, a "
                                f"DataLoader), got {type(batches).__name__}")
    if passes > 1 and iter(batches) is batches:
        raise PreconditionError(f"distill: {name} is a one-shot iterator but is read "
                                f"{passes} times; pass a list or another re-iterable object "
                                "(a DataLoader)")

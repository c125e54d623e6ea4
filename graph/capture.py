"""Capture a PyTorch model as the canonical aten-level FX graph.

``torch.export.export(model, args, kwargs, strict=False).module()`` gives a
``fx.GraphModule`` whose ``call_function`` nodes are ATen ``OpOverload``s with shape metadata
(``node.meta["val"]``). It handles real models (Hugging Face BERT, LLaMA) where
``torch.fx.symbolic_trace`` fails on data-dependent Python. A ``symbolic_trace`` GraphModule is
accepted too: it is an ``nn.Module`` like any other and is simply exported again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from .errors import CaptureError
from .kind import CANONICAL_MARK

__all__ = ["capture"]

logger = logging.getLogger(__name__)

_OP_PATTERN = re.compile(r"(aten::?\.?[\w.]+|torch\.ops\.[\w.]+|\b[\w]+\.default\b)")


def capture(
    model: torch.nn.Module,
    args: tuple[Any, ...] | Any = (),
    kwargs: Mapping[str, Any] | None = None,
    dynamic_shapes: Any = None,
) -> fx.GraphModule:
    """Return the aten-level ``fx.GraphModule`` of ``model`` called as ``model(*args, **kwargs)``.

    The model is put in inference mode for the capture and restored afterwards; the caller's
    module is otherwise untouched. Raises :class:`CaptureError` naming the failing op.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(
            f"capture needs a torch.nn.Module, got {type(model).__name__}; "
            "wrap a function in an nn.Module first"
        )
    if not isinstance(args, tuple):
        args = (args,)
    was_training = model.training
    model.eval()
    try:
        program = torch.export.export(
            model, args, kwargs=dict(kwargs or {}), dynamic_shapes=dynamic_shapes, strict=False
        )
        gm = program.module()
    except Exception as exc:  # torch.export raises many unrelated types
        raise CaptureError(_describe_failure(exc)) from exc
    finally:
        model.train(was_training)
    gm.meta[CANONICAL_MARK] = "aten"
    logger.debug("captured %s: %d nodes", type(model).__name__, len(gm.graph.nodes))
    return gm


def _describe_failure(exc: Exception) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    match = _OP_PATTERN.search(text)
    op = f" at op {match.group(0)}" if match else ""
    return (
        f"torch.export could not capture the model{op}: {type(exc).__name__}: {first[:300]}. "
        "Check that the example inputs match forward(), make data-dependent control flow "
        "static, or pass dynamic_shapes"
    )

"""Capture a PyTorch model as the canonical aten-level FX graph.

``torch.export.export(model, args, kwargs, strict=False).module()`` gives a
``fx.GraphModule`` whose ``call_function`` nodes are ATen ``OpOverload``s with shape metadata
(``node.meta["val"]``). It handles real models (Hugging Face BERT, LLaMA) where
``torch.fx.symbolic_trace`` fails on data-dependent Python. A ``symbolic_trace`` GraphModule is
accepted too: it is an ``nn.Module`` like any other and is simply exported again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import fx

from .errors import CaptureError
from .kind import CANONICAL_MARK

__all__ = ["capture", "eval_mode"]

logger = logging.getLogger(__name__)

_OP_PATTERN = re.compile(r"torch\.ops\.\w+\.\w+|\baten[.:]+\w+|\b\w+::\w+|torch\.\w+(?=\()|\.\w+\(\)")
_USER_CALL = re.compile(
    r"The following call raised this error:\s*File \"(?P<file>[^\"]+)\", line (?P<line>\d+), "
    r"in (?P<name>\w+)\s*\n(?P<code>[^\n]*)"
)


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
    try:
        with eval_mode(model):
            program = torch.export.export(
                model, args, kwargs=dict(kwargs or {}), dynamic_shapes=dynamic_shapes,
                strict=False,
            )
        gm = program.module()
    except Exception as exc:  # torch.export raises many unrelated types
        raise CaptureError(_describe_failure(exc)) from exc
    gm.meta[CANONICAL_MARK] = "aten"
    logger.debug("captured %s: %d nodes", type(model).__name__, len(gm.graph.nodes))
    return gm


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in inference mode for the block and restore its mode afterwards.

    ``ExportedProgram.module()`` graphs refuse ``eval()``/``train()`` (their graph is fixed
    anyway), so for them this does nothing.
    """
    was_training = model.training
    with contextlib.suppress(NotImplementedError):
        model.eval()
    try:
        yield
    finally:
        with contextlib.suppress(NotImplementedError):
            model.train(was_training)


def _describe_failure(exc: Exception) -> str:
    """One paragraph: the failing op (if named), the user's line that called it, the cause."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    where = _USER_CALL.search(text)
    location = ""
    if where:
        location = f" in {where.group('name')} at {where.group('file')}:{where.group('line')}"
        location += f" (`{where.group('code').strip()}`)"
        op_match = _OP_PATTERN.search(where.group("code"))
    else:
        frame = _user_frame(exc)
        if frame is not None:
            location = f" in {frame.name} at {frame.filename}:{frame.lineno} (`{frame.line}`)"
        op_match = _OP_PATTERN.search(frame.line if frame is not None else text)
    op = f" at op {op_match.group(0)}" if op_match else ""
    return (
        f"torch.export could not capture the model{op}{location}: {type(exc).__name__}: "
        f"{first[:300]}. Check that the example inputs match forward(), make data-dependent "
        "control flow static (torch.cond) or pass dynamic_shapes"
    )


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame outside torch and graphpress: the model's own line."""
    torch_dir = os.path.dirname(torch.__file__)
    ours = os.path.dirname(os.path.abspath(__file__))
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [
        f for f in frames
        if not f.filename.startswith((torch_dir, ours)) and f.line and "<" not in f.filename
    ]
    return mine[-1] if mine else None

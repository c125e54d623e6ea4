"""FX / PyTorch → ONNX export, and saving.

:func:`to_onnx` hands the model to ``torch.onnx.export(..., dynamo=True)``, which re-runs
``torch.export`` (non-strict) on it, decomposes to the ONNX-translatable aten set, translates
with onnxscript and optionally optimizes; the result's ``.model`` is an ``onnx_ir.Model``. A
canonical ``fx.GraphModule`` from :func:`graphpress.graph.capture` is an ``nn.Module`` too, so
both go through the same path. The exporter's console output is captured and sent to the
debug log; failures become one-line :class:`ExportError` messages.

Provenance (ARCHITECTURE principle 8): every FX node that ``torch.export`` creates records where
it came from in ``node.meta["from_node"]`` (a chain of ``NodeSource`` with ``name`` and
``graph_id``), and every ONNX node records its originating FX node in
``metadata_props["pkg.torch.onnx.fx_node"]``. Following ONNX node → final exported-program
node → ``from_node`` chain → the node of *our* graph (matched by ``id(gm.graph)``) recovers
``node.meta["graphpress.pass"]``, which is copied to ``metadata_props["graphpress.pass"]``.
Nodes the ONNX optimizer creates by fusion carry no FX origin and get no tag (best effort).

:func:`save` is :func:`graphpress.graph.io.save`: atomic, external data for large weights.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Mapping
from typing import Any

import onnx_ir as ir
import torch
from torch import fx

from graphpress.graph.capture import eval_mode
from graphpress.graph.errors import ExportError
from graphpress.graph.io import save

from ._nbits import nbits_export_copy

__all__ = ["to_onnx", "save", "PASS_KEY"]

logger = logging.getLogger(__name__)

#: Key of the provenance tag, in FX ``node.meta`` and in ONNX ``metadata_props``.
PASS_KEY = "graphpress.pass"

_FX_NODE_KEY = "pkg.torch.onnx.fx_node"
_FX_NAME = re.compile(r"^%(\S+)\s*:")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def to_onnx(
    model: torch.nn.Module,
    args: tuple[Any, ...] | Any = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    opset: int | None = None,
    optimize: bool = True,
    debug_metadata: bool = False,
    matmul_nbits: bool = True,
) -> ir.Model:
    """Export ``model(*args, **kwargs)`` to ONNX and return the ``onnx_ir.Model``.

    ``model`` is an ``nn.Module`` or a captured ``fx.GraphModule``; it is exported in eval mode
    and left as it was. ``opset`` defaults to the exporter's; ``optimize`` runs the onnxscript
    optimizer (constant folding, dead-code removal). Exporter debug metadata (Python stack
    traces and the like, :data:`DEBUG_METADATA_KEYS`) is dropped unless ``debug_metadata``.
    With ``matmul_nbits`` an FX graph's block-quantized linears (``quantize-weights``) become
    ``com.microsoft.MatMulNBits`` nodes reading the packed codes (:mod:`._nbits`) instead of
    a decode chain. Raises :class:`ExportError`.
    """
    if not isinstance(model, torch.nn.Module):
        raise ExportError(
            f"to_onnx needs a torch.nn.Module or fx.GraphModule, got {type(model).__name__}; "
            "an onnx_ir.Model is already ONNX: save it with graphpress.export.save"
        )
    if not isinstance(args, tuple):
        args = (args,)
    fused = 0
    if matmul_nbits and isinstance(model, fx.GraphModule):
        model, fused = nbits_export_copy(model)
    chatter = io.StringIO()
    try:
        with eval_mode(model), contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                args,
                kwargs=dict(kwargs or {}),
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                optimize=optimize,
                dynamo=True,
                verbose=False,
                report=False,
            )
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(_describe_failure(exc, type(model).__name__)) from exc
    finally:
        if chatter.getvalue().strip():
            logger.debug("torch.onnx output:\n%s", chatter.getvalue().rstrip())
    if program is None:  # only the legacy exporter returns None
        raise ExportError("torch.onnx.export returned no program; upgrade torch to >= 2.6")
    onnx_model = program.model
    if isinstance(model, fx.GraphModule):
        try:
            tagged = _carry_provenance(model, program.exported_program, onnx_model)
            logger.debug("carried %s to %d ONNX nodes", PASS_KEY, tagged)
        except Exception as exc:  # best effort: relies on exporter metadata, never fails export
            logger.warning("could not carry %s to the ONNX nodes: %s", PASS_KEY, exc)
    if not debug_metadata:
        _drop_debug_metadata(onnx_model)
    logger.debug(
        "exported %s: %d ONNX nodes (%d MatMulNBits from block-quantized linears), opset %s",
        type(model).__name__,
        len(onnx_model.graph),
        fused,
        onnx_model.opset_imports.get("", "?"),
    )
    return onnx_model


#: Exporter metadata that only helps debugging the export: Python stack traces (paths of the
#: exporting machine), module class hierarchies and name scopes. Dropped unless asked for;
#: ``namespace`` and ``pkg.torch.onnx.fx_node`` stay (provenance and readable diffs).
DEBUG_METADATA_KEYS = (
    "pkg.torch.onnx.stack_trace",
    "pkg.torch.onnx.class_hierarchy",
    "pkg.torch.onnx.name_scopes",
)


def _drop_debug_metadata(model: ir.Model) -> None:
    for graph in model.graphs():
        for node in graph:
            for key in DEBUG_METADATA_KEYS:
                node.metadata_props.pop(key, None)


def _describe_failure(exc: Exception, what: str) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    # The exporter's own line is a banner ("Failed to ... This is step 1/3 ... Next steps:");
    # the real reason is the innermost cause.
    detail = text.splitlines()[0].split(" Next steps")[0] if text else type(exc).__name__
    cause = exc.__cause__
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    reason = _ANSI.sub("", str(cause)).strip() if cause is not None else ""
    if reason:
        detail = f"{detail} {type(cause).__name__}: {reason.splitlines()[0]}"
    op = re.search(r"(?:aten|torch\.ops)[.:]{1,2}[\w.]+|\b\w+::\w+(?:\.\w+)?", text)
    at = f" at op {op.group(0)}" if op else ""
    return (
        f"torch.onnx could not export {what}{at}: {detail[:500].rstrip('. ')}. Check that the example inputs "
        "match forward(), that every op has an ONNX translation (or register one with "
        "custom_translation_table), or try capture() first to see where torch.export fails"
    )


def _origin_names(node: fx.Node, graph_id: int) -> set[str]:
    """Names of the nodes of the graph with ``id == graph_id`` that ``node`` comes from."""
    names: set[str] = set()
    stack = list(node.meta.get("from_node") or [])
    while stack:
        source = stack.pop()
        if getattr(source, "graph_id", None) == graph_id:
            names.add(source.name)
        else:
            stack.extend(getattr(source, "from_node", None) or [])
    return names


def _carry_provenance(gm: fx.GraphModule, program: Any, model: ir.Model) -> int:
    passes = {n.name: n.meta[PASS_KEY] for n in gm.graph.nodes if PASS_KEY in n.meta}
    if not passes or program is None:
        return 0
    graph_id = id(gm.graph)
    fx_nodes = {n.name: n for n in program.graph.nodes}
    tagged = 0
    for graph in model.graphs():
        for node in graph:
            match = _FX_NAME.match(node.metadata_props.get(_FX_NODE_KEY, ""))
            fx_node = fx_nodes.get(match.group(1)) if match else None
            if fx_node is None:
                continue
            tags = sorted({passes[o] for o in _origin_names(fx_node, graph_id) if o in passes})
            if tags:
                node.metadata_props[PASS_KEY] = ",".join(tags)
                tagged += 1
    return tagged

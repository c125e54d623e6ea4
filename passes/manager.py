"""Run a list of passes over a graph: ``PassManager`` and ``optimize()``.

``optimize`` normalises the input (a path, bytes or ``ModelProto`` is loaded to an
``onnx_ir.Model``; an ``fx.GraphModule`` must be in the canonical aten dialect), copies its
structure once (tensors shared) so the caller's graph never changes, then runs each pass with
instruments around it, verifies the graph, and records a :class:`Report`. Verification
(``graph.verify``): ``"each"`` checks the structure (use-before-def, names, FX lint) after
every pass that changed the graph and runs the ONNX checker once on the final graph (it
serialises the whole model, too costly to repeat per pass on 100k-node graphs); ``"end"`` does
both only at the end; ``"off"`` skips verification.

Items in ``passes`` may be string specs, :class:`Pass` objects, or ``onnx_ir`` in-place
passes (``onnx_ir.passes.common.*Pass()``), which run on ONNX graphs like our own.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import onnx
import onnx_ir as ir
from torch import fx, nn

from graphpress.graph.analysis import measure
from graphpress.graph.errors import (
    PassSpecError,
    PreconditionError,
    UnsupportedGraphError,
    VerificationError,
)
from graphpress.graph.io import load
from graphpress.graph.kind import Graph, clone, is_canonical_fx, kind
from graphpress.graph.verify import verify as verify_graph

from .base import Pass, PassResult
from .instruments import Instrument, from_env
from .registry import from_spec
from .report import PassRecord, Report

__all__ = ["PassManager", "OptimizeResult", "optimize", "OnnxIRPass", "VerifyMode"]

logger = logging.getLogger(__name__)

VerifyMode = Literal["each", "end", "off"]
PassLike = str | Pass | ir.passes.PassBase


@dataclass(frozen=True)
class OnnxIRPass(Pass):
    """Adapter running an ``onnx_ir`` in-place pass inside graphpress's manager."""

    inner: Any = None
    name: ClassVar[str] = "onnx-ir"
    supports: ClassVar[frozenset[str]] = frozenset({"onnx"})

    def run_onnx(self, model: ir.Model) -> PassResult:
        result = self.inner(model)
        return PassResult(model, bool(result.modified), {})

    def spec(self) -> str:
        return f"onnx-ir:{type(self.inner).__name__}"


def _as_pass(item: PassLike) -> Pass:
    if isinstance(item, ir.passes.PassBase):
        if not item.in_place:
            raise PassSpecError(
                f"onnx_ir pass {type(item).__name__} is functional (returns a new model); only "
                "in-place onnx_ir passes can run in a graphpress pass list"
            )
        return OnnxIRPass(inner=item)
    return from_spec(item)


@dataclass(frozen=True)
class OptimizeResult:
    """The optimised graph (same kind as the input), whether it changed, and the report."""

    graph: Graph
    modified: bool
    report: Report


class PassManager:
    """Runs passes in order on one graph, in place."""

    def __init__(
        self,
        passes: Sequence[PassLike],
        *,
        verify: VerifyMode = "each",
        instruments: Iterable[Instrument] = (),
    ) -> None:
        if verify not in ("each", "end", "off"):
            raise PassSpecError(f"verify={verify!r}: use 'each', 'end' or 'off'")
        if isinstance(passes, (str, Pass)):
            passes = [passes]
        self.passes = [_as_pass(p) for p in passes]
        self.verify = verify
        self.instruments = list(instruments)

    def run(self, graph: Graph, *, calibration: Any = None) -> OptimizeResult:
        graph_kind = kind(graph)
        for pass_ in self.passes:  # fail before any work if a pass cannot handle this kind
            pass_.check_kind(graph_kind)
        if self.verify != "off":
            _verify(graph, "the input graph", checker=False)
        records = []
        current = measure(graph)
        for pass_ in self.passes:
            for instrument in self.instruments:
                instrument.before_pass(pass_, graph)
            start = time.perf_counter()
            result = pass_(graph, calibration=calibration)
            seconds = time.perf_counter() - start
            if self.verify == "each" and result.modified:
                _verify(graph, f"pass {pass_.spec()!r}", checker=False)
            after = measure(graph) if result.modified else current
            records.append(
                PassRecord(
                    pass_.name, pass_.spec(), result.modified, current, after, seconds,
                    dict(result.stats), result.layers,
                )
            )
            logger.info("%s: modified=%s in %.3f s", pass_.name, result.modified, seconds)
            for instrument in self.instruments:
                instrument.after_pass(pass_, graph, result)
            current = after
        modified_by = [r.spec for r in records if r.modified]
        if self.verify != "off" and modified_by:
            _verify(graph, f"passes {', '.join(modified_by)}", checker=True)
        report = Report(tuple(records), graph_kind)
        return OptimizeResult(graph, any(r.modified for r in records), report)


def _verify(graph: Graph, after: str, *, checker: bool) -> None:
    """Verify ``graph``; a failure names what produced it."""
    try:
        verify_graph(graph, checker=checker)
    except VerificationError as exc:
        raise VerificationError(f"after {after}: {exc}") from None


def _as_graph(graph: Any) -> tuple[Graph, bool]:
    """The graph to optimise and whether it is already a private copy (freshly loaded)."""
    if isinstance(graph, (str, os.PathLike, bytes, bytearray, onnx.ModelProto)):
        return load(graph), True
    if isinstance(graph, fx.GraphModule):
        if not is_canonical_fx(graph):
            raise PreconditionError(
                "this GraphModule is not in the aten dialect of torch.export (it calls modules "
                "or Python functions, e.g. from symbolic_trace); re-capture it with "
                "graphpress.graph.capture(gm, example_args)"
            )
        return graph, False
    if isinstance(graph, nn.Module):
        raise UnsupportedGraphError(
            f"optimize() got an nn.Module ({type(graph).__name__}); capture it first: "
            "graphpress.graph.capture(model, example_args)"
        )
    kind(graph)  # raises UnsupportedGraphError for anything else
    return graph, False


def optimize(
    graph: Any,
    passes: Sequence[PassLike],
    *,
    copy: bool = True,
    verify: VerifyMode = "each",
    instruments: Iterable[Instrument] = (),
    calibration: Any = None,
) -> OptimizeResult:
    """Run ``passes`` over ``graph`` and return the result; the caller's graph is not changed.

    ``copy=False`` rewrites ``graph`` itself (saves the structural copy on huge graphs).
    Instruments named in ``GRAPHPRESS_DEBUG`` are added to ``instruments``.
    """
    manager = PassManager(passes, verify=verify, instruments=[*instruments, *from_env()])
    target, private = _as_graph(graph)
    if copy and not private:
        target = clone(target)
    return manager.run(target, calibration=calibration)

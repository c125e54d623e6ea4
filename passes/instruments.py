"""Instruments: hooks that run before and after every pass, for debugging and profiling.

``PrintAfter`` writes the graph text after each pass, ``DiffAfter`` the diff a pass made,
``DumpIR(dir)`` a numbered text dump (and, for ONNX, the model file) after each pass, and
``Timing`` collects seconds per pass. ``GRAPHPRESS_DEBUG=print,diff,dump:DIR,time`` switches
them on without code changes. Output goes to the stream the instrument was given (stderr by
default): it is opt-in debugging output, not library logging.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from graphpress.graph.errors import PassSpecError
from graphpress.graph.kind import Graph, clone, kind

from .base import Pass, PassResult

__all__ = ["Instrument", "PrintAfter", "DiffAfter", "DumpIR", "Timing", "from_env"]

logger = logging.getLogger(__name__)


class Instrument:
    """Base class: override ``before_pass`` and/or ``after_pass``."""

    def before_pass(self, pass_: Pass, graph: Graph) -> None:
        """Called before ``pass_`` runs on ``graph``."""

    def after_pass(self, pass_: Pass, graph: Graph, result: PassResult) -> None:
        """Called after ``pass_`` ran; ``graph`` is the rewritten graph."""


class PrintAfter(Instrument):
    """Write ``graph.format(g)`` after each pass that modified the graph."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def after_pass(self, pass_: Pass, graph: Graph, result: PassResult) -> None:
        from graphpress.graph.printing import format as format_graph

        if result.modified:
            out = self.stream or sys.stderr
            out.write(f"=== after {pass_.name} ===\n{format_graph(graph)}\n")


class DiffAfter(Instrument):
    """Write the diff each pass made (keeps a structural copy of the graph before the pass)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._before: Graph | None = None

    def before_pass(self, pass_: Pass, graph: Graph) -> None:
        self._before = clone(graph)

    def after_pass(self, pass_: Pass, graph: Graph, result: PassResult) -> None:
        from graphpress.graph.printing import diff

        if result.modified and self._before is not None:
            out = self.stream or sys.stderr
            out.write(f"=== diff {pass_.name} ===\n{diff(self._before, graph)}\n")
        self._before = None


class DumpIR(Instrument):
    """Write ``NN-<pass>.txt`` (and ``NN-<pass>.onnx`` for ONNX graphs) into ``directory``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._index = 0

    def after_pass(self, pass_: Pass, graph: Graph, result: PassResult) -> None:
        from graphpress.graph.io import save
        from graphpress.graph.printing import format as format_graph

        self.directory.mkdir(parents=True, exist_ok=True)
        self._index += 1
        stem = self.directory / f"{self._index:02d}-{pass_.name}"
        stem.with_suffix(".txt").write_text(format_graph(graph) + "\n")
        if kind(graph) == "onnx":
            save(graph, stem.with_suffix(".onnx"))


class Timing(Instrument):
    """Collect wall seconds per pass in ``self.seconds`` (a list of ``(name, seconds)``)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.seconds: list[tuple[str, float]] = []
        self._start = 0.0

    def before_pass(self, pass_: Pass, graph: Graph) -> None:
        self._start = time.perf_counter()

    def after_pass(self, pass_: Pass, graph: Graph, result: PassResult) -> None:
        elapsed = time.perf_counter() - self._start
        self.seconds.append((pass_.name, elapsed))
        if self.stream is not None:
            self.stream.write(f"{pass_.name}: {elapsed:.3f} s\n")


def from_env(value: str | None = None) -> list[Instrument]:
    """Instruments named by ``GRAPHPRESS_DEBUG`` (``print,diff,dump:DIR,time``)."""
    value = os.environ.get("GRAPHPRESS_DEBUG", "") if value is None else value
    found: list[Instrument] = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, arg = item.partition(":")
        if name == "print":
            found.append(PrintAfter())
        elif name == "diff":
            found.append(DiffAfter())
        elif name == "dump":
            found.append(DumpIR(arg or "graphpress-dump"))
        elif name == "time":
            found.append(Timing(stream=sys.stderr))
        else:
            raise PassSpecError(
                f"GRAPHPRESS_DEBUG: unknown instrument {name!r}; use print, diff, dump:DIR or time"
            )
    return found

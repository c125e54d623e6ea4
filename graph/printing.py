"""Inspection: a size summary, a deterministic text form and a structural diff of a graph.

``summary`` builds on :func:`measure` (op histogram, nodes, parameters, bytes by dtype) and,
given a baseline graph, the compression ratio r = baseline bytes / bytes. ``format`` and
``diff`` work on the per-node entries of :mod:`graphpress.graph._entries` (stable key, line
``outputs = op(inputs) {attrs}``, signature, provenance): ``format`` joins the lines (ONNX
adds inputs, initializers and outputs); ``diff`` matches nodes by key, so a graph diffed
against a pass's output (``optimize`` clones, then passes add, rename and remove nodes) lists
exactly the nodes the passes touched. ONNX nodes left unmatched are paired by their output
names (an unnamed node whose op changed is rewritten, not removed and added), and ONNX
initializers are compared by name and type. Drawing lives in :mod:`graphpress.graph.html`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import onnx_ir as ir

from ._entries import Entry, fx_entries, line, onnx_constants, onnx_entries, onnx_type
from .analysis import Measure, measure
from .errors import UnsupportedGraphError
from .kind import Graph, kind

__all__ = ["Summary", "NodeChange", "GraphDiff", "summary", "format", "diff", "human_bytes"]

logger = logging.getLogger(__name__)


def human_bytes(value: float) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


@dataclass(frozen=True)
class Summary:
    """Size facts of one graph and, against a baseline, its compression ratio."""

    kind: str
    nodes: int
    params: int
    bytes: int
    bytes_by_dtype: dict[str, int]
    ops: dict[str, int]
    baseline_bytes: int | None = None
    compression_ratio: float | None = None  # baseline bytes / bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"{self.kind} graph: {self.nodes} nodes, {self.params:,} params, "
            f"{human_bytes(self.bytes)}"
        ]
        if self.compression_ratio is not None:
            lines.append(
                f"compression ratio {self.compression_ratio:.2f}x "
                f"(baseline {human_bytes(self.baseline_bytes or 0)})"
            )
        lines += ["bytes by dtype:"] if self.bytes_by_dtype else []
        lines += [f"  {d:<28} {human_bytes(b)}" for d, b in self.bytes_by_dtype.items()]
        lines += ["ops:"] + [f"  {op:<28} {n}" for op, n in self.ops.items()]
        return "\n".join(lines)


def summary(graph: Graph, baseline: Graph | Measure | Summary | None = None) -> Summary:
    """Op histogram, node/parameter counts and bytes of ``graph`` (see :func:`measure`).

    With ``baseline`` (e.g. the uncompressed graph) the ratio r = baseline bytes / bytes is
    filled in (``inf`` if ``graph`` holds no constant bytes but the baseline does).
    """
    facts = measure(graph)
    base = ratio = None
    if baseline is not None:
        base = baseline.bytes if isinstance(baseline, (Measure, Summary)) else measure(baseline).bytes
        ratio = base / facts.bytes if facts.bytes else (1.0 if base == 0 else float("inf"))
    return Summary(
        kind(graph), facts.nodes, facts.params, facts.bytes, dict(facts.bytes_by_dtype),
        dict(facts.ops), base, ratio,
    )



def format(graph: Graph) -> str:
    """Deterministic text of ``graph``: one line per node, ``outputs = op(inputs) {attrs}``."""
    if kind(graph) == "fx":
        return "\n".join(line(e) for e in fx_entries(graph))
    model: ir.Model = graph
    opsets = ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in sorted(model.opset_imports.items()))
    lines = [f"onnx model (ir_version {model.ir_version}; opsets {opsets})"]
    g = model.graph
    lines += [f"input {v.name} : {onnx_type(v)}" for v in g.inputs]
    lines += [line(e) for e in onnx_constants(g) + onnx_entries(g)]
    lines += [f"output {v.name} : {onnx_type(v)}" for v in g.outputs]
    lines += [f"function {f.domain}::{f.name}" for f in model.functions.values()]
    return "\n".join(lines)


# Diff ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeChange:
    """One added, removed or rewritten node: its key, op, lines before/after, provenance."""

    key: str
    op: str
    before: str | None
    after: str | None
    provenance: str | None


@dataclass(frozen=True)
class GraphDiff:
    """Nodes added, removed and rewritten between two graphs of the same kind."""

    kind: str
    added: tuple[NodeChange, ...] = ()
    removed: tuple[NodeChange, ...] = ()
    rewritten: tuple[NodeChange, ...] = ()
    #: ONNX initializers added/removed (FX constants are ``get_attr`` nodes, listed above).
    constants_added: tuple[NodeChange, ...] = ()
    constants_removed: tuple[NodeChange, ...] = ()

    def __bool__(self) -> bool:
        return any(getattr(self, f) for f in _PARTS)

    def counts(self) -> str:
        text = f"{len(self.added)} added, {len(self.removed)} removed, {len(self.rewritten)} rewritten"
        if self.constants_added or self.constants_removed:
            text += f"; constants {len(self.constants_added)} added, {len(self.constants_removed)} removed"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts(), **asdict(self)}

    def lines(self) -> list[tuple[str, str]]:
        """``(tag, text)`` pairs, tag in ``" "``, ``"-"``, ``"+"``, ``"~"``; used by the HTML report."""
        out = [(" ", f"graph diff ({self.kind}): {self.counts()}" if self else "no changes")]
        out += [("-", f"- {c.before}") for c in self.removed + self.constants_removed]
        out += [("+", f"+ {c.after}" + _by(c)) for c in self.added + self.constants_added]
        for c in self.rewritten:
            out += [("~", f"~ {c.before}"), ("~", f"~ → {c.after}" + _by(c))]
        return out

    def __str__(self) -> str:
        return "\n".join(text for _, text in self.lines())


_PARTS = ("added", "removed", "rewritten", "constants_added", "constants_removed")


def _by(change: NodeChange) -> str:
    return f"  # by {change.provenance}" if change.provenance else ""


def _entries(graph: Graph) -> list[Entry]:
    if kind(graph) == "fx":
        return fx_entries(graph)
    return [e for e in onnx_entries(graph.graph) if e.is_node]


def diff(before: Graph, after: Graph) -> GraphDiff:
    """What changed from ``before`` to ``after`` (both FX or both ONNX), node by node."""
    k_before, k_after = kind(before), kind(after)
    if k_before != k_after:
        raise UnsupportedGraphError(
            f"cannot diff a {k_before} graph against a {k_after} graph; compare graphs of the "
            "same kind (export the FX graph to ONNX first, or capture both with graph.capture)"
        )
    old = {e.key: e for e in _entries(before)}
    new = {e.key: e for e in _entries(after)}
    rewritten = [(old[k], e) for k, e in new.items() if k in old and old[k].signature != e.signature]
    added = [e for k, e in new.items() if k not in old]
    removed = [e for k, e in old.items() if k not in new]
    const_added = const_removed = []
    if k_after == "onnx":
        old_c = {e.key: e.signature for e in onnx_constants(before.graph)}
        new_c = {e.key: e.signature for e in onnx_constants(after.graph)}
        const_added = [e for e in onnx_constants(after.graph) if old_c.get(e.key) != e.signature]
        const_removed = [e for e in onnx_constants(before.graph) if new_c.get(e.key) != e.signature]
        # unnamed nodes whose op changed have new keys: pair them by their output names
        by_outputs = {e.outputs: e for e in removed if any(e.outputs)}
        for e in list(added):
            match = by_outputs.pop(e.outputs, None)
            if match is not None:
                added.remove(e)
                removed.remove(match)
                rewritten.append((match, e))
    return GraphDiff(
        k_after,
        tuple(NodeChange(e.key, e.op, None, e.text, e.provenance) for e in added),
        tuple(NodeChange(e.key, e.op, e.text, None, e.provenance) for e in removed),
        tuple(NodeChange(a.key, a.op, b.text, a.text, a.provenance) for b, a in rewritten),
        tuple(NodeChange(e.key, e.op, None, e.text, e.provenance) for e in const_added),
        tuple(NodeChange(e.key, e.op, e.text, None, e.provenance) for e in const_removed),
    )

"""What ``graphpress inspect --memory`` prints: the memory estimate, total FLOPs and the
costliest nodes, as one value that formats as text or serialises as a dict (JSON)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from .costs import NodeCost, node_costs
from .kind import Graph
from .memory import MemoryEstimate, estimate_memory, human_bytes

__all__ = ["MemoryReport", "memory_report", "human_flops"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryReport:
    estimate: MemoryEstimate
    flops: int
    top: tuple[NodeCost, ...]

    def as_dict(self) -> dict:
        data = self.estimate.as_dict()
        data["flops"] = self.flops
        data["top_nodes"] = [
            {"name": n.name, "op": n.op, "flops": n.flops,
             "shape": list(n.outputs[0].shape) if n.outputs and n.outputs[0].shape else None,
             "output_bytes": sum(o.bytes for o in n.outputs)}
            for n in self.top
        ]
        return data

    def __str__(self) -> str:
        lines = [self.estimate.format(), f"flops: {human_flops(self.flops)} per inference"]
        if self.top:
            lines.append(f"top {len(self.top)} nodes by FLOPs:")
            width = max(len(n.name) for n in self.top)
            ops = max(len(n.op) for n in self.top)
            for n in self.top:
                shape = n.outputs[0].shape if n.outputs else None
                text = "x".join(map(str, shape)) if shape else "?"
                lines.append(f"  {n.name:<{width}}  {n.op:<{ops}}  {human_flops(n.flops):>12}  "
                             f"out {text} ({human_bytes(sum(o.bytes for o in n.outputs))})")
        return "\n".join(lines)


def memory_report(
    graph: Graph, *, top: int = 10, dims: Mapping[str, int] | None = None, **options
) -> MemoryReport:
    """:func:`estimate_memory` (``options`` are its keywords) plus the ``top`` nodes by FLOPs."""
    estimate = estimate_memory(graph, dims=dims, **options)
    table = node_costs(graph, dims=estimate.dims)
    ranked = sorted(table.nodes, key=lambda n: -n.flops)[: max(top, 0)]
    return MemoryReport(estimate, table.flops, tuple(ranked))


def human_flops(count: int) -> str:
    """``12.34 MFLOP``-style count."""
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} FLOP"

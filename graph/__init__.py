"""graph: capture, load/save, clone, kind, verification and inspection of FX and ONNX graphs.

Free functions over ``torch.fx.GraphModule`` and ``onnx_ir.Model``; no wrapper class.
This subpackage imports no other part of graphpress.
"""

from __future__ import annotations

from .analysis import Measure, measure, op_name, to_networkx
from .capture import capture
from .channels import ChannelGroup, ChannelUse, LinearWeight, channel_groups, linear_weights
from .costs import CostTable, NodeCost, ValueInfo, node_costs, peak_live_bytes
from .errors import (
    CaptureError,
    DistributedError,
    ExportError,
    GraphpressError,
    ModelLoadError,
    PassSpecError,
    PostconditionError,
    PreconditionError,
    UnsafeExternalDataError,
    UnsupportedGraphError,
    VerificationError,
)
from .html import to_dot, to_svg
from .io import load, save
from .kind import Graph, GraphKind, clone, is_canonical_fx, kind
from .memory import MemoryEstimate, estimate_memory, kv_cache_bytes
from .memory_report import MemoryReport, memory_report
from .printing import GraphDiff, NodeChange, Summary, diff, format, summary
from .verify import verify

__all__ = [
    "ChannelGroup", "ChannelUse", "LinearWeight", "channel_groups", "linear_weights",
    "CostTable", "NodeCost", "ValueInfo", "node_costs", "peak_live_bytes",
    "MemoryEstimate", "MemoryReport", "estimate_memory", "kv_cache_bytes", "memory_report",
    "Graph",
    "GraphKind",
    "GraphDiff",
    "Measure",
    "NodeChange",
    "Summary",
    "capture",
    "clone",
    "diff",
    "format",
    "is_canonical_fx",
    "kind",
    "load",
    "measure",
    "op_name",
    "save",
    "summary",
    "to_dot",
    "to_networkx",
    "to_svg",
    "verify",
    "CaptureError",
    "DistributedError",
    "ExportError",
    "GraphpressError",
    "ModelLoadError",
    "PassSpecError",
    "PostconditionError",
    "PreconditionError",
    "UnsafeExternalDataError",
    "UnsupportedGraphError",
    "VerificationError",
]

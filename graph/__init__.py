"""graph: capture, load/save, clone, kind, verification and inspection of FX and ONNX graphs.

Free functions over ``torch.fx.GraphModule`` and ``onnx_ir.Model``; no wrapper class.
This subpackage imports no other part of graphpress.
"""

from __future__ import annotations

from .analysis import Measure, measure, op_name, to_networkx
from .capture import capture
from .channels import ChannelGroup, ChannelUse, channel_groups
from .errors import (
    CaptureError,
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
from .printing import GraphDiff, NodeChange, Summary, diff, format, summary
from .verify import verify

__all__ = [
    "ChannelGroup", "ChannelUse", "channel_groups",
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

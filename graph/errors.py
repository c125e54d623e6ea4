"""Typed errors shared by every layer.

They live in ``graph/`` (the lowest layer) so that loading, export and passes raise the same
types; ``passes.base`` re-exports them. Every message says what is wrong *and* what to do.
The CLI turns any :class:`GraphpressError` into one readable line and exit code 2.
"""

from __future__ import annotations

__all__ = [
    "GraphpressError",
    "ModelLoadError",
    "UnsafeExternalDataError",
    "CaptureError",
    "UnsupportedGraphError",
    "PreconditionError",
    "PostconditionError",
    "VerificationError",
    "PassSpecError",
    "ExportError",
    "DistributedError",
]


class GraphpressError(Exception):
    """Base class of every error graphpress raises on purpose."""


class ModelLoadError(GraphpressError):
    """A model file is missing, is not ONNX, is truncated, or its external data is broken."""


class UnsafeExternalDataError(ModelLoadError):
    """An external-data location points outside the model's folder (path traversal)."""


class CaptureError(GraphpressError):
    """``torch.export`` could not capture the model; the message names the failing op."""


class UnsupportedGraphError(GraphpressError):
    """The object is not a graph graphpress handles, or a pass does not support its kind."""


class PreconditionError(GraphpressError):
    """A pass cannot run on this graph (its ``requires`` failed)."""


class PostconditionError(GraphpressError):
    """A pass produced a graph that breaks what it promised (its ``ensures`` failed)."""


class VerificationError(GraphpressError):
    """The graph is structurally invalid (dangling use, cycle, ONNX checker failure)."""


class PassSpecError(GraphpressError):
    """A pass spec string names an unknown pass or option, or an option value is invalid."""


class ExportError(GraphpressError):
    """Exporting to ONNX or building an ONNX Runtime session failed."""


class DistributedError(GraphpressError):
    """A distributed run failed: a rank raised, died or timed out, or the layout is invalid."""

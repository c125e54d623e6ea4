"""graphpress: graph-level compression passes for PyTorch (FX) and ONNX models.

    import graphpress as gp
    gm = gp.capture(model, example_args)
    result = gp.optimize(gm, ["fold-batchnorm", "eliminate-identity", "dce"])
    onnx_model = gp.export.to_onnx(result.graph, example_args)
    print(result.report)
"""

from __future__ import annotations

from graphpress import export, graph, passes
from graphpress.graph import (
    CaptureError,
    ChannelGroup,
    ChannelUse,
    ExportError,
    GraphpressError,
    ModelLoadError,
    PassSpecError,
    PostconditionError,
    PreconditionError,
    UnsafeExternalDataError,
    UnsupportedGraphError,
    VerificationError,
    capture,
    channel_groups,
    clone,
    diff,
    estimate_memory,
    format,
    kind,
    load,
    save,
    summary,
)
from graphpress.passes import (
    CalibrationTable,
    OptimizeResult,
    Pass,
    PassManager,
    PassResult,
    Report,
    calibrate,
    optimize,
)
from graphpress.passes.distill import DistillResult, distill
from graphpress.passes.partition import shard, tensor_parallel_plan, to_torch_plan
from graphpress.passes.quantize.qat import convert_qat, prepare_qat

__version__ = "0.1.0"

__all__ = [
    "CalibrationTable",
    "DistillResult",
    "calibrate",
    "CaptureError",
    "ExportError",
    "GraphpressError",
    "ModelLoadError",
    "OptimizeResult",
    "Pass",
    "PassManager",
    "PassResult",
    "PassSpecError",
    "PostconditionError",
    "PreconditionError",
    "Report",
    "UnsafeExternalDataError",
    "UnsupportedGraphError",
    "VerificationError",
    "ChannelGroup", "ChannelUse", "capture", "channel_groups",
    "clone",
    "convert_qat",
    "diff",
    "distill",
    "estimate_memory",
    "format",
    "export",
    "graph",
    "kind",
    "load",
    "optimize",
    "passes",
    "prepare_qat",
    "save",
    "shard",
    "summary",
    "tensor_parallel_plan",
    "to_torch_plan",
]

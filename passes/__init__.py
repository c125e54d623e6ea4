"""passes: the pass contract, the manager and the built-in passes."""

from __future__ import annotations

from .base import Pass, PassResult
from .calibrate import CalibrationTable, calibrate
from .instruments import DiffAfter, DumpIR, Instrument, PrintAfter, Timing
from .manager import OnnxIRPass, OptimizeResult, PassManager, optimize
from .registry import describe, from_spec, register, registered, to_spec
from .report import PassRecord, Report

__all__ = [
    "CalibrationTable",
    "calibrate",
    "DiffAfter",
    "DumpIR",
    "Instrument",
    "OnnxIRPass",
    "OptimizeResult",
    "Pass",
    "PassManager",
    "PassRecord",
    "PassResult",
    "PrintAfter",
    "Report",
    "Timing",
    "describe",
    "from_spec",
    "optimize",
    "register",
    "registered",
    "to_spec",
]

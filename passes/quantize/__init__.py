"""Quantization passes: static Q/DQ (``insert-qdq``), dynamic, weight-only and ternary.

Each family is one module of this folder; importing the folder registers the passes.
IR-free math (scales, zero points, rounding, SmoothQuant factors) is in ``_qparams.py``.
"""

from __future__ import annotations

from .dynamic import QuantizeDynamic
from .qat import convert_qat, prepare_qat
from .static import InsertQDQ
from .ternary import QuantizeTernary
from .weights import QuantizeWeights

__all__ = [
    "QuantizeDynamic", "InsertQDQ", "QuantizeTernary", "QuantizeWeights", "convert_qat",
    "prepare_qat",
]

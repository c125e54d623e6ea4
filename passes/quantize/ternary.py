"""quantize-ternary: BitNet b1.58 absmean ternary weights, run as 2-bit ``MatMulNBits``.

Per block of ``block_size`` input channels (or per output channel with ``per_channel``):
``γ = mean|W|`` (rounded to float16, stored so), ``W_t = clip(round(W/γ), −1, 1)``, ``Ŵ = γ·W_t`` (``_blockwise.ternary``). The
codes ``W_t + 2 ∈ {1, 2, 3}`` are stored as 2-bit ``MatMulNBits`` with the default zero point
2 and scale ``γ``, which ORT's CPU kernel runs. This is post-training ternarization without
the quantization-aware training BitNet relies on, so the quality loss is large; the pass
reports the mean relative weight error ``‖Ŵ − W‖/‖W‖`` so nobody mistakes it for lossless.
Embedding tables stay in float (BitNet keeps them in high precision).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from graphpress.graph.errors import PassSpecError

from ..base import Pass, PassResult
from ..registry import register
from ._blockwise import BlockQuant, ternary
from ._nbits_onnx import find_sites
from .weights import quantize_sites

__all__ = ["QuantizeTernary"]

logger = logging.getLogger(__name__)


@register
@dataclass(frozen=True)
class QuantizeTernary(Pass):
    """Ternarize linear weights (BitNet b1.58 absmean) and run them as 2-bit MatMulNBits.

    **Rules**
      1. ONNX ``MatMul(x, W)`` / ``Gemm(x, W[, C])`` with a constant 2-D float ``W`` →
         ``com.microsoft::MatMulNBits(bits=2)`` with codes ``W_t + 2`` and scales ``γ`` per
         block (``+ Add`` for a Gemm bias); FX ``aten.linear`` → ``linear`` of the dequantized
         weight ``γ·W_t`` computed from packed 2-bit storage.
      2. A weight used by several layers is ternarized once and shared.
      3. Skipped: names matching ``exclude``, ``K < 16``, weights whose packed form is not
         smaller (never for float32 weights of useful size), embedding tables and a linear
         weight tied to one (the LM head of a tied embedding stays float and shared).

    **Requires** nothing. **Ensures** the graph interface is unchanged.
    """

    name: ClassVar[str] = "quantize-ternary"
    block_size: int = 64
    per_channel: bool = False
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        b = self.block_size
        if b < 16 or b > 256 or b & (b - 1):
            raise PassSpecError(
                f"quantize-ternary: block_size={b} must be a power of two in 16..256")

    def _ternary(self, w: np.ndarray, errors: list[float]) -> BlockQuant:
        bq = ternary(w, self.block_size, per_channel=self.per_channel)
        errors.append(float(np.linalg.norm(bq.dequantize() - w) / max(np.linalg.norm(w), 1e-30)))
        return bq

    def run_onnx(self, model: ir.Model, **kwargs: Any) -> PassResult:
        start, errors = time.perf_counter(), []
        sites = find_sites(model, embeddings=False, exclude=self.exclude)
        stats = quantize_sites(model, sites, lambda w, _: self._ternary(w, errors), self.name,
                               "ternary", {}, bits=2, block_size=self.block_size,
                               symmetric=True)
        return PassResult(model, stats["weights_quantized"] > 0, self._stats(stats, errors, start))

    def run_fx(self, gm, **kwargs: Any) -> PassResult:
        from ._nbits_fx import quantize_fx

        start, errors = time.perf_counter(), []
        result = quantize_fx(gm, lambda w: self._ternary(w, errors), self.name,
                             embeddings=False, exclude=self.exclude)
        return PassResult(gm, result.modified, self._stats(dict(result.stats), errors, start))

    @staticmethod
    def _stats(stats: dict, errors: list[float], start: float) -> dict:
        stats["weight_error_mean"] = float(np.mean(errors)) if errors else 0.0
        stats["seconds"] = time.perf_counter() - start
        return stats

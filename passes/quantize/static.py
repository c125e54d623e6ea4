"""insert-qdq: static quantization of weights and activations with calibrated ranges.

For each layer that a runtime fuses (``placement.find_layers``) the float activation inputs
get a QuantizeLinear/DequantizeLinear pair with the scale and zero point of their calibrated
range (``_qparams.activation_qparams``) and the constant weight becomes an int8 tensor with a
DequantizeLinear (``_qparams.quantize_weight``; per channel along the output axis). What ONNX
Runtime sees is the standard QDQ format: it fuses ``DQ → MatMul`` into integer kernels.

Mixed precision: with ``keep_float = f`` the sensitivity analysis (``sensitivity.rank``)
measures the model-output error of quantizing each layer alone and keeps the ``⌈f·n⌉`` most
sensitive layers' activations in float (``fallback="weights"``: their weights stay int8, so the
size is unchanged) or the whole layer in float (``fallback="float"``).
SmoothQuant (``smoothquant=α``) first migrates activation outliers into the weights.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from graphpress.graph.errors import PassSpecError

from .._rewrite import drop_unused_constants
from ..base import Pass, PassResult
from ..registry import register
from ._onnx_qdq import OnnxQDQ
from ._qparams import QParams, activation_qparams, range_is_absurd
from .placement import Layer, find_layers

__all__ = ["InsertQDQ", "LayerPlan"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPlan:
    """What to do to one layer: activation parameters per input position, weight or not."""

    activations: tuple[tuple[int, QParams], ...]
    weight: bool


@register
@dataclass(frozen=True)
class InsertQDQ(Pass):
    """Quantize weights and activations statically (Q/DQ pairs with calibrated ranges).

    **Rules**
      1. Placement: MatMul/Gemm/Conv with a constant weight, embedding Gathers of a constant
         table (``embeddings``) and activation × activation MatMuls (``attention``) are
         layers; layers reading the mask path, or matching an ``exclude`` pattern, stay float.
      2. Each layer's float activation inputs get QuantizeLinear → DequantizeLinear with the
         calibrated range (``activations`` type, asymmetric); an input whose range is absurd
         (non-finite, ≥ 1e6, or 1e4× lopsided) stays float (and so does an attention layer).
      3. Each constant weight becomes ``<weight>.qdq.q`` (int8; symmetric ``[-127, 127]`` if
         ``symmetric_weights``) + DequantizeLinear, per channel along the output axis when
         ``per_channel`` (MatMul axis 1, Gemm axis 0 with ``transB``, Conv axis 0).
      4. Embeddings: ``Gather`` reads the int8 table; the gathered rows are dequantized.
         A table tied to an LM head ``MatMul(x, Transpose(E))`` is quantized once per row: the
         Gather scales its rows by their row scales, the head reads
         ``DequantizeLinear(Transpose(E.qdq.q), axis=1)``; the float ``E`` is removed.
      5. ``keep_float > 0``: the ``⌈keep_float·n⌉`` layers whose lone quantization hurts the
         outputs most keep float activations (``fallback="weights"``) or stay float entirely
         (``fallback="float"``).
      6. ``smoothquant=α``: before calibration, ``X·W`` becomes ``(X/s)·(s·W)`` per input
         channel (exact in float), folded into a LayerNorm or as a Mul.
      7. Float weights left unused are removed.

    **Requires** calibration: batches (calibrated here with ``method`` on the quantized
    values) or a ``CalibrationTable`` of this graph (a stale table is a PreconditionError;
    with a table, Rules 5 and 6 are skipped with a warning: they need batches). FX graphs get
    Rules 1–3 as fake-quant ops that export to Q/DQ (``_fx_qdq.py``); Rules 5–6 are ONNX-only.
    **Ensures** the graph's interface is unchanged.

    **Defaults** (all-MiniLM-L6-v2, 128 calibration / 320 evaluation sentences, ORT CPU,
    2 threads, b16×128): ``smoothquant=0.8, keep_float=0`` quantizes every fusable layer
    (36 ``MatMulIntegerToFloat`` + 1 ``QGemm`` after ORT's QDQ fusion): cosine 0.9974 (min
    0.991), top-5 0.954, latency ≈ 0.67× fp32, ~2.5 s. The former ``smoothquant=0.5,
    keep_float=0.1`` is slightly better (0.9979, top-5 0.960) but ≈ 0.77× fp32: its 4 kept
    layers run as 8-bit ``MatMulNBits`` (``fallback="weights"``) or float MatMul, each as slow as
    ~8 int8 layers, and the sensitivity probe took 10 s. ``keep_float=0`` with α=0.5 loses
    quality (0.989, top-5 0.90); α in 0.75–0.9 moves the GELU/LayerNorm outliers into the
    weights well enough. Each smoothed input costs an elementwise ``Mul`` unless folded into a
    private LayerNorm (BERT's LayerNorm outputs also feed the residual): ≈ 0.03× fp32 in all.
    α=0.8 needs enough calibration data: with 16 sentences cosine falls to 0.990 (32: 0.996,
    64: 0.997), where the old default kept 0.997; use it for tiny calibration sets.
    ``attention=true`` adds Q/DQ and Muls around the score MatMuls and was slower. With
    ``method="minmax"`` one calibration run serves SmoothQuant and the ranges
    (``smoothquant.channel_extremes``; the range of ``X/s`` follows from X's channel extremes).
    """

    name: ClassVar[str] = "insert-qdq"
    supports: ClassVar[frozenset[str]] = frozenset({"onnx", "fx"})
    needs_calibration: ClassVar[bool] = True

    method: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
    per_channel: bool = True
    activations: Literal["uint8", "int8", "int16"] = "uint8"
    symmetric_weights: bool = True
    exclude: tuple[str, ...] = ()
    keep_float: float = 0.0
    fallback: Literal["weights", "float"] = "weights"
    smoothquant: float | None = 0.8
    attention: bool = False
    embeddings: bool = True
    sensitivity_batches: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.keep_float <= 1.0:
            raise PassSpecError(f"insert-qdq: keep_float={self.keep_float} must be in [0, 1] "
                                "(a fraction of the quantizable layers, e.g. keep_float=0.1)")
        if self.smoothquant is not None and not 0.0 <= self.smoothquant <= 1.0:
            raise PassSpecError(f"insert-qdq: smoothquant={self.smoothquant} must be an alpha "
                                "in [0, 1] (e.g. smoothquant=0.5)")
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))

    # ------------------------------------------------------------------ ONNX
    def run_onnx(self, model: ir.Model, *, calibration: Any) -> PassResult:
        from .sensitivity import rank_layers
        from .smoothquant import channel_extremes, smooth_onnx

        layers = self._layers(model)
        if not layers:
            return PassResult(model, False, {"layers_quantized": 0})
        batches = None if _is_table(calibration) else calibration
        stats: dict[str, float] = {}
        extremes = None
        if batches is None and (self.smoothquant is not None or self.keep_float > 0):
            logger.warning("insert-qdq: smoothquant and keep_float need calibration batches, "
                           "not a table; quantizing without them")
            stats["smoothquant_skipped"] = float(self.smoothquant is not None)
            stats["keep_float_skipped"] = float(self.keep_float > 0)
        elif batches is not None and self.method == "minmax":
            # one calibration run: per-channel extremes of every layer input serve SmoothQuant
            # and, scaled by 1/s, the min-max ranges of the smoothed inputs
            extremes = channel_extremes(model, batches, _input_names(layers))
        if batches is not None and self.smoothquant is not None:  # Rule 6
            stats["layers_smoothed"] = smooth_onnx(model, layers, batches, self.smoothquant,
                                                   self.name, extremes=extremes)
            layers = self._layers(model)
        table = self._table(model, layers, calibration, extremes)
        plans = self.plan(layers, table)
        kept: list[int] = []
        if self.keep_float > 0 and plans and batches is not None:
            scores = rank_layers(self, model, plans, batches)
            count = min(len(scores), math.ceil(self.keep_float * len(plans) - 1e-9))
            kept = [index for index, _ in scores[:count]]
            stats.update({f"sensitivity.{layers[i].name}": err for i, err in scores})
        for index in kept:  # Rule 5
            plans[index] = None if self.fallback == "float" else LayerPlan((), plans[index].weight)
        stats.update(self.apply(model, layers, plans))
        stats["layers_kept_float"] = len(kept)
        return PassResult(model, stats["layers_quantized"] > 0, stats)

    def _layers(self, model: ir.Model) -> list[Layer]:
        return find_layers(model, exclude=tuple(self.exclude), attention=self.attention,
                           embeddings=self.embeddings)

    def _table(self, model: ir.Model, layers: list[Layer], calibration: Any, extremes=None):
        from graphpress.passes.calibrate import calibrate

        names = _input_names(layers)
        if _is_table(calibration):
            calibration.check(model, names)
            return calibration
        if not names:
            return None
        if extremes is not None and all(n in extremes for n in names):
            return _MinMax({n: (float(np.nanmin(extremes[n][0], initial=np.inf)),
                                float(np.nanmax(extremes[n][1], initial=-np.inf)))
                            for n in names})
        return calibrate(model, calibration, method=self.method, targets=names)

    def plan(self, layers: list[Layer], table) -> dict[int, LayerPlan | None]:
        """Rules 1–3: the activation parameters and weight decision of each layer."""
        plans: dict[int, LayerPlan | None] = {}
        for index, layer in enumerate(layers):
            acts = []
            for position, value in zip(layer.activations, layer.values()):
                lo, hi = table.range(value.name)
                if range_is_absurd(lo, hi):  # Rule 2
                    logger.info("insert-qdq: %s has an absurd range [%g, %g]; left float",
                                value.name, lo, hi)
                    continue
                acts.append((position, activation_qparams(lo, hi, self.activations)))
            if layer.weight is None and len(acts) != len(layer.activations):
                continue  # an attention MatMul is quantized on both sides or not at all
            plans[index] = LayerPlan(tuple(acts), layer.weight is not None)
        return plans

    def apply(self, model: ir.Model, layers: list[Layer], plans: Mapping[int, LayerPlan | None]
              ) -> dict[str, float]:
        """Rewrite ``model`` (whose ``layers`` these are) according to ``plans``."""
        qdq = OnnxQDQ(model, self.name, per_channel=self.per_channel,
                      symmetric_weights=self.symmetric_weights)
        old = [layer.node.inputs[layer.weight] for layer in layers if layer.weight is not None]
        done = 0
        for index, layer in enumerate(layers):
            plan = plans.get(index)
            if plan is None:
                continue
            for position, params in plan.activations:  # Rule 2
                qdq.activation(layer, position, params)
            if plan.weight:  # Rules 3, 4
                qdq.embedding(layer) if layer.op == "embedding" else qdq.weight(layer)
            done += bool(plan.activations or plan.weight)
        removed = drop_unused_constants(old)  # Rule 7
        return {"layers_quantized": done, "weights_removed": removed,
                "weight_bytes_quantized": qdq.weight_bytes}

    # ------------------------------------------------------------------ FX
    def run_fx(self, gm, *, calibration: Any) -> PassResult:
        from ._fx_qdq import run_fx

        return run_fx(self, gm, calibration)


@dataclass(frozen=True)
class _MinMax:
    """Min-max ranges derived from per-channel extremes (what ``plan`` reads of a table)."""

    ranges: dict[str, tuple[float, float]]

    def range(self, name: str) -> tuple[float, float]:
        return self.ranges[name]


def _input_names(layers: list[Layer]) -> list[str]:
    return list(dict.fromkeys(v.name for layer in layers for v in layer.values()))


def _is_table(calibration: Any) -> bool:
    return hasattr(calibration, "ranges") and hasattr(calibration, "check")

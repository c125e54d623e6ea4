"""Sensitivity analysis for mixed-precision static quantization.

For each quantizable layer ``ℓ`` (one with quantized activations) its sensitivity is the
relative squared error of the model outputs when the activations of ``ℓ`` alone are quantized
(its planned Q/DQ), against the float model, averaged over the first calibration batches
(per-channel int8 weights add little error, and ``fallback="weights"`` keeps them anyway):

    e(ℓ) = mean_b  Σ_o ‖y_o − ŷ_o^(ℓ)‖² / Σ_o ‖y_o‖²

One *probe* model measures all layers with a single ONNX Runtime session: every quantized
input ``x`` of layer ``ℓ`` becomes ``x + g_ℓ·(DQ(Q(x)) − x)`` with a new scalar graph input
``g_ℓ``; all gates 0 is the float model, gate ``ℓ`` alone at 1 quantizes ``ℓ`` alone. Layers are
ranked by ``e`` (largest first); ``insert-qdq`` keeps the top ``⌈f·n⌉`` in higher precision.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from graphpress.export.ort import session
from graphpress.graph.kind import clone
from graphpress.graph.onnx import mark

from .._collect import as_batches
from ._onnx_qdq import OnnxQDQ, output_error

__all__ = ["rank_layers", "probe_model"]

logger = logging.getLogger(__name__)


def _binary(qdq: OnnxQDQ, op: str, a: ir.Value, b: ir.Value, like: ir.Value, origin: str,
            ) -> ir.Node:
    name = qdq._unique(f"{origin}.qdq.{op.lower()}")
    out = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=like.shape)
    return mark(ir.Node("", op, [a, b], outputs=[out], name=name), qdq.pass_name)


def _gate(qdq: OnnxQDQ, node: ir.Node, position: int, original: ir.Value, gate: ir.Value,
          origin: str) -> None:
    quantized = node.inputs[position]
    diff = _binary(qdq, "Sub", quantized, original, original, origin)
    scaled = _binary(qdq, "Mul", gate, diff.outputs[0], original, origin)
    mixed = _binary(qdq, "Add", original, scaled.outputs[0], original, origin)
    qdq.graph.insert_before(node, [diff, scaled, mixed])
    node.replace_input_with(position, mixed.outputs[0])


def probe_model(pass_: Any, model: ir.Model, plans: Mapping[int, Any]
                ) -> tuple[ir.Model, dict[int, str]]:
    """A copy of ``model`` with one gate input per measured layer: ``(probe, {index: gate})``."""
    probe = clone(model)
    layers = pass_._layers(probe)
    qdq = OnnxQDQ(probe, pass_.name, per_channel=pass_.per_channel,
                  symmetric_weights=pass_.symmetric_weights)
    gates: dict[int, str] = {}
    for index, plan in plans.items():
        if plan is None or not plan.activations:
            continue
        layer = layers[index]
        gate = ir.Value(name=qdq._unique(f"{layer.name}.qdq.gate"),
                        type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
        probe.graph.inputs.append(gate)
        gates[index] = gate.name
        for position, params in plan.activations:
            original = layer.node.inputs[position]
            qdq.activation(layer, position, params)
            _gate(qdq, layer.node, position, original, gate, layer.name)
    return probe, gates


def rank_layers(pass_: Any, model: ir.Model, plans: Mapping[int, Any], batches: Any,
                ) -> list[tuple[int, float]]:
    """``[(layer index, error)]`` of the layers with quantized activations, worst first."""
    items = as_batches(batches)[: max(1, int(pass_.sensitivity_batches))]
    inputs = [v.name for v in model.graph.inputs]
    feeds = [dict(b) if isinstance(b, Mapping) else dict(zip(inputs, b)) for b in items]
    probe, gates = probe_model(pass_, model, plans)
    runner = session(probe, providers="cpu")
    off = {name: np.zeros((), np.float32) for name in gates.values()}
    reference = [runner.run({**feed, **off}) for feed in feeds]
    scores: list[tuple[int, float]] = []
    for index, gate in gates.items():
        on = {**off, gate: np.ones((), np.float32)}
        errors = [output_error(ref, runner.run({**feed, **on}))
                  for ref, feed in zip(reference, feeds)]
        scores.append((index, float(np.mean(errors))))
    scores.sort(key=lambda item: -item[1])
    logger.info("insert-qdq sensitivity (worst 5): %s", scores[:5])
    return scores

"""SmoothQuant: migrate activation outliers into the weights before static quantization.

For ``Y = X·W`` with ``W[K, N]`` and per-input-channel maxima ``a_j = max|X_j|`` (calibrated)
and ``w_j = max_n |W_jn|``, the smoothing factors are ``s_j = a_j^α / w_j^(1−α)``
(``_qparams.smooth_scales``). Then ``Y = (X·diag(s)⁻¹)·(diag(s)·W)`` exactly in real
arithmetic, while the activation's channels become comparable (easier to quantize per tensor)
and the weight's rows absorb the difference (quantized per output channel anyway).

All MatMuls reading the same activation (Q/K/V projections) share one ``s`` (``w_j`` is the
maximum over their weights). The division is folded into the producer when it is a
``LayerNormalization`` with constant ``γ, β`` used only by the group (``γ/s``, ``β/s``);
otherwise a ``Mul`` by the constant ``1/s`` is inserted. Weights are replaced by new
initializers ``<weight>.smoothquant.weight`` (never changed in place); a weight used elsewhere
is left alone (its group is skipped).

The channel maxima come from :func:`channel_extremes` (one ONNX Runtime pass over the batches,
plain per-channel min/max, no histograms). ``insert-qdq`` computes them once for *all* its
layer inputs and reuses them: the min-max range of a smoothed input ``X/s`` is
``[min_j cmin_j/s_j, max_j cmax_j/s_j]`` exactly, so no second calibration run is needed.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from graphpress.graph.onnx import add_initializer, mark

from .._collect import collect
from .._rewrite import drop_unused_constants, onnx_const, value_names
from ._qparams import smooth_scales
from .placement import Layer

__all__ = ["smooth_onnx", "smoothing_groups", "channel_extremes", "Extremes"]

#: Per-channel (last axis) ``(min, max)`` of a value over all calibration batches.
Extremes = dict[str, tuple[np.ndarray, np.ndarray]]

logger = logging.getLogger(__name__)


def smoothing_groups(layers: list[Layer]) -> dict[ir.Value, list[Layer]]:
    """MatMul layers with a private constant weight, grouped by their activation input."""
    groups: dict[ir.Value, list[Layer]] = {}
    for layer in layers:
        if layer.op != "matmul":
            continue
        weight = layer.node.inputs[1]
        if len(weight.uses()) != 1:
            continue  # a shared weight cannot take one group's scaling
        groups.setdefault(layer.node.inputs[0], []).append(layer)
    return groups


def channel_extremes(model: ir.Model, batches: Any, names: list[str]) -> Extremes:
    """Finite per-channel (last axis) minima and maxima of ``names`` over ``batches``."""
    out: Extremes = {}

    def consume(name: str, array: np.ndarray) -> None:
        x = np.asarray(array)
        x = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        if not np.isfinite(x).all() or np.abs(x).max(initial=0.0) >= 1e30:
            x = np.where(np.isfinite(x) & (np.abs(x) < 1e30), x, np.nan)
            with np.errstate(all="ignore"):
                lo, hi = np.nanmin(x, axis=0), np.nanmax(x, axis=0)
        else:
            lo, hi = x.min(axis=0), x.max(axis=0)
        if name in out and out[name][0].shape == lo.shape:
            lo, hi = np.fmin(out[name][0], lo), np.fmax(out[name][1], hi)
        out[name] = (lo.astype(np.float64), hi.astype(np.float64))

    collect(model, batches, names, consume)
    return out


def smooth_onnx(model: ir.Model, layers: list[Layer], batches: Any, alpha: float,
                pass_name: str, *, extremes: Extremes | None = None) -> int:
    """Apply SmoothQuant to every group; return how many layers were rescaled.

    ``extremes`` (from :func:`channel_extremes`, covering the groups' inputs) saves the
    calibration run; it is updated with the extremes of every smoothed value (``X/s``)."""
    groups = smoothing_groups(layers)
    if not groups:
        return 0
    if extremes is None:
        extremes = channel_extremes(model, batches, [v.name for v in groups])
    graph, taken = model.graph, value_names(model)
    rescaled = 0
    for value, group in groups.items():
        if value.name not in extremes:
            continue
        cmin, cmax = extremes[value.name]
        act = np.nan_to_num(np.maximum(np.abs(cmin), np.abs(cmax)))
        weights = [onnx_const(layer.node.inputs[1]) for layer in group]
        if any(w.shape[0] != act.shape[0] for w in weights):
            continue
        w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = smooth_scales(act, w_absmax, alpha)
        for layer, w in zip(group, weights):
            old = layer.node.inputs[1]
            name = f"{layer.node.inputs[1].name}.smoothquant.weight"
            new = add_initializer(graph, name, (s[:, None] * w).astype(w.dtype), pass_name, taken)
            layer.node.replace_input_with(1, new)
            drop_unused_constants([old])
        scaled = _fold_into_layernorm(graph, value, group, s, pass_name, taken)
        if scaled is None:
            scaled = _insert_mul(graph, value, group, s, pass_name, taken)
        for layer in group:
            layer.node.replace_input_with(0, scaled)
        extremes[scaled.name] = (cmin / s, cmax / s)
        rescaled += len(group)
    return rescaled


def _fold_into_layernorm(graph, value, group, s, pass_name, taken) -> ir.Value | None:
    node = value.producer()
    users = {use.node for use in value.uses()}
    if (node is None or node.op_type != "LayerNormalization" or value.is_graph_output()
            or users != {layer.node for layer in group} or len(node.outputs) != 1):
        return None
    gamma = onnx_const(node.inputs[1])
    beta = onnx_const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    if gamma is None or gamma.shape != s.shape or (beta is not None and beta.shape != s.shape):
        return None
    new_gamma = add_initializer(graph, f"{node.inputs[1].name}.smoothquant.gamma",
                                (gamma / s).astype(gamma.dtype), pass_name, taken)
    old = [v for v in node.inputs[1:3] if v is not None]
    node.replace_input_with(1, new_gamma)
    if beta is not None:
        new_beta = add_initializer(graph, f"{node.inputs[2].name}.smoothquant.beta",
                                   (beta / s).astype(beta.dtype), pass_name, taken)
        node.replace_input_with(2, new_beta)
    drop_unused_constants(old)
    return value


def _insert_mul(graph, value, group, s, pass_name, taken) -> ir.Value:
    origin = value.name
    inverse = add_initializer(graph, f"{origin}.smoothquant.inverse",
                              (1.0 / s).astype(np.float32), pass_name, taken)
    out_name = f"{origin}.smoothquant.scaled"
    while out_name in taken:
        out_name += "_"
    taken.add(out_name)
    output = ir.Value(name=out_name, type=ir.TensorType(ir.DataType.FLOAT), shape=value.shape)
    node = mark(ir.Node("", "Mul", [value, inverse], outputs=[output], name=out_name), pass_name)
    graph.insert_before(group[0].node, [node])  # layers come in graph order
    return output

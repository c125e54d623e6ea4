"""insert-qdq on aten-level FX graphs: fake-quant ops that export to ONNX Q/DQ.

The ops are PyTorch's decomposed quantization primitives
(``torch.ops.quantized_decomposed.*``, registered by importing
``torch.ao.quantization.fx._decomposed``), which compute exactly the ONNX semantics
``q = clip(round(x/s) + z, qmin, qmax)``, ``x̂ = (q − z)·s``, and which ``torch.onnx``
translates to QuantizeLinear/DequantizeLinear:

* activation ``x`` of ``aten.linear``/``aten.conv*``/``aten.mm``/``aten.matmul`` with a constant
  weight: ``dequantize_per_tensor(quantize_per_tensor(x, s, z, qmin, qmax, dtype), …)``;
* constant weight ``W``: an int8 buffer ``<W>_qdq_q`` and
  ``dequantize_per_channel(q, scales, zero_points, axis, qmin, qmax, int8)`` (or
  ``dequantize_per_tensor``); ``aten.linear``/conv weights have output channels on axis 0,
  ``mm``/``matmul`` weights ``[K, N]`` on axis 1.

SmoothQuant and the sensitivity analysis run on ONNX graphs only; on FX they are skipped with
a warning (reported in the stats), and the graph is quantized without them.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 (registers quantized_decomposed ops)
from torch import fx

from graphpress.graph.fx import add_tensor, get_tensor, mark

from .._rewrite import remove_dead_fx
from ._qparams import QRANGE, activation_qparams, quantize_weight, range_is_absurd

__all__ = ["run_fx", "fx_layers"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_qd = torch.ops.quantized_decomposed
#: overload packet -> output-channel axis of its (constant, argument 1) weight
_LAYERS = {_aten.linear: 0, _aten.conv1d: 0, _aten.conv2d: 0, _aten.conv3d: 0,
           _aten.convolution: 0, _aten.mm: 1, _aten.matmul: 1}
_TORCH_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16}


def fx_layers(gm: fx.GraphModule, exclude: tuple[str, ...]) -> list[tuple[fx.Node, int]]:
    """``(node, weight axis)`` of each layer with a constant weight, not excluded."""
    found = []
    for node in gm.graph.nodes:
        axis = _LAYERS.get(getattr(node.target, "overloadpacket", None))
        if node.op != "call_function" or axis is None or len(node.args) < 2:
            continue
        x, w = node.args[0], node.args[1]
        weight = get_tensor(gm, w) if isinstance(w, fx.Node) else None
        if not isinstance(x, fx.Node) or weight is None or not weight.is_floating_point():
            continue
        if axis == 1 and weight.ndim != 2:
            continue
        names = [node.name, x.name, w.name, str(w.target)]
        if any(fnmatch.fnmatchcase(n, p) for p in exclude for n in names):
            continue
        found.append((node, axis))
    return found


def run_fx(pass_: Any, gm: fx.GraphModule, calibration: Any):
    from graphpress.passes.calibrate import calibrate

    from ..base import PassResult

    stats: dict[str, float] = {}
    for option, off in (("smoothquant", None), ("keep_float", 0.0)):
        if getattr(pass_, option) != off:
            logger.warning("insert-qdq: %s is ONNX-only; skipped on the FX graph", option)
            stats[f"{option}_skipped"] = 1
    layers = fx_layers(gm, tuple(pass_.exclude))
    if not layers:
        return PassResult(gm, False, {"layers_quantized": 0})
    names = list(dict.fromkeys(node.args[0].name for node, _ in layers))
    if hasattr(calibration, "ranges"):
        calibration.check(gm, names)
        table = calibration
    else:
        table = calibrate(gm, calibration, method=pass_.method, targets=names)
    graph = gm.graph
    dtype = pass_.activations
    qmin, qmax = QRANGE[dtype]
    dequantized: dict[fx.Node, fx.Node] = {}
    old_weights: dict[fx.Node, fx.Node] = {}  # float weight -> its dequantized int8 copy
    for node, axis in layers:
        x, w = node.args[0], node.args[1]
        lo, hi = table.range(x.name)
        with graph.inserting_before(node):
            if not range_is_absurd(lo, hi):
                if x not in dequantized:
                    p = activation_qparams(lo, hi, dtype)
                    args = (float(p.scale), int(p.zero_point), qmin, qmax, _TORCH_DTYPES[dtype])
                    q = mark(graph.call_function(_qd.quantize_per_tensor.default, (x, *args)),
                             pass_.name)
                    dequantized[x] = mark(graph.call_function(
                        _qd.dequantize_per_tensor.default, (q, *args)), pass_.name)
                node.replace_input_with(x, dequantized[x])
            if w not in old_weights:
                old_weights[w] = _dequantized_weight(pass_, gm, w, axis)
            node.replace_input_with(w, old_weights[w])
    _, removed = remove_dead_fx(gm, list(old_weights))
    gm.recompile()
    stats.update({"layers_quantized": len(layers), "attributes_removed": removed,
                  "layers_kept_float": 0})
    return PassResult(gm, True, stats)


def _dequantized_weight(pass_: Any, gm: fx.GraphModule, w: fx.Node, axis: int) -> fx.Node:
    weight = get_tensor(gm, w).detach().float().cpu().numpy()
    q, p = quantize_weight(weight, axis=axis if pass_.per_channel else None,
                           symmetric=pass_.symmetric_weights)
    qmin, qmax = (-127, 127) if pass_.symmetric_weights else QRANGE["int8"]
    origin = str(w.target)
    graph = gm.graph

    def attr(role: str, tensor: torch.Tensor) -> fx.Node:
        return mark(graph.get_attr(add_tensor(gm, f"{origin}.qdq.{role}", tensor)), pass_.name)

    q_node = attr("q", torch.from_numpy(q))
    if p.axis is None:
        args = (q_node, float(p.scale), int(p.zero_point), qmin, qmax, torch.int8)
        return mark(graph.call_function(_qd.dequantize_per_tensor.default, args), pass_.name)
    scale = attr("scale", torch.from_numpy(p.scale.astype("float32")))
    zero = attr("zero_point", torch.from_numpy(p.zero_point.astype("int64")))
    args = (q_node, scale, zero, p.axis, qmin, qmax, torch.int8)
    return mark(graph.call_function(_qd.dequantize_per_channel.default, args), pass_.name)

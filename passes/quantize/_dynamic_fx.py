"""The FX rewrite of ``quantize-dynamic``: int8 weight buffers and run-time activation fake-quant.

A layer ``y = A·Wᵀ`` (``aten.linear``; ``aten.mm``/``aten.matmul``/``aten.addmm`` with ``W``
stored K×N) whose weight is a constant float32 ``get_attr`` becomes

* weight: an int8 buffer ``q`` with per-output-channel (or per-tensor) ``scale`` (and
  ``zero_point`` when asymmetric), read through
  ``quantized_decomposed.dequantize_per_channel``/``dequantize_per_tensor``, which export to
  ``DequantizeLinear``;
* activation: the qparams ``DynamicQuantizeLinear`` uses, computed from ``A`` on every call
  (``lo = min(min A, 0)``, ``hi = max(max A, 0)``, ``s = (hi − lo)/255``,
  ``z = clip(round(−lo/s), 0, 255)``), and ``aten.fake_quantize_per_tensor_affine`` with those
  tensor qparams (uint8), i.e. ``Â = (clip(round(A/s) + z, 0, 255) − z)·s``; it exports to
  ``ReduceMin``/``ReduceMax``/… + ``QuantizeLinear``/``DequantizeLinear`` with dynamic scale
  and zero point. (``quantized_decomposed.quantize_per_tensor.tensor`` does not export with a
  run-time zero point: onnxscript turns the zero point into a constant.)

The layer then multiplies ``Â`` by ``Ŵ`` in float, which is what the exported ONNX computes
(up to float summation order and rare rounding ties: torch multiplies by ``1/s``, ORT divides).
``aten.embedding`` of a constant table (``embeddings``) reads an int8 table per row, no
activation quantization. Each activation is quantized once however many layers read it.
The exported model is 3.96x smaller but no faster than fp32 in ORT 1.31 (the Q/DQ pairs have
run-time scales, which ORT's QDQ fusions do not take), on all-MiniLM-L6-v2 as accurate as ORT's
``quantize_dynamic`` (mean-pooled embedding cosine 0.993 vs fp32).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 (registers quantized_decomposed ops)
from torch import fx

from graphpress.graph.fx import add_tensor, get_tensor, mark, node_value

from .._rewrite import remove_dead_fx, require_canonical
from ..base import PassResult
from .dynamic import QuantizeDynamic, quantize_int8

__all__ = ["Site", "plan_fx", "run_fx"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_qd = torch.ops.quantized_decomposed
#: op -> (activation arg index or None, weight arg index, output-channel axis of the weight)
_SITES = {
    _aten.linear.default: (0, 1, 0),
    _aten.mm.default: (0, 1, 1),
    _aten.matmul.default: (0, 1, 1),
    _aten.addmm.default: (1, 2, 1),
    _aten.embedding.default: (None, 0, 0),
}
_TAG = "qdyn"


@dataclass
class Site:
    node: fx.Node
    activation: int | None  # argument index of the activation (None: embedding)
    weight: int  # argument index of the weight
    axis: int  # output-channel axis of the weight


def _is_float32(node: object) -> bool:
    val = node_value(node) if isinstance(node, fx.Node) else None
    return isinstance(node, fx.Node) and (val is None or getattr(val, "dtype", None) == torch.float32)


def plan_fx(pass_: QuantizeDynamic, gm: fx.GraphModule) -> list[Site]:
    """The layers to rewrite, in graph order: Rules 1–5 of :class:`QuantizeDynamic`."""
    found: list[Site] = []
    for node in gm.graph.nodes:
        spec = _SITES.get(node.target) if node.op == "call_function" else None
        if spec is None or (spec[0] is None and not pass_.embeddings):
            continue
        act, index, axis = spec
        if len(node.args) <= max(index, act or 0):
            continue
        w = node.args[index]
        tensor = get_tensor(gm, w) if isinstance(w, fx.Node) else None
        if tensor is None or tensor.dtype != torch.float32 or tensor.dim() != 2:
            continue
        if tensor.numel() < pass_.min_elements or (act is not None and not _is_float32(node.args[act])):
            continue
        if pass_._excluded(node.name, w.name, str(w.target)):
            continue
        found.append(Site(node, act, index, axis))
    planned = {(s.node, s.node.args[s.weight]) for s in found}
    keep_target = {}
    for target in {str(s.node.args[s.weight].target) for s in found}:  # Rule 5: all uses
        reads = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]
        keep_target[target] = all((user, n) in planned for n in reads for user in n.users)
    return [s for s in found if keep_target[str(s.node.args[s.weight].target)]]


def run_fx(pass_: QuantizeDynamic, gm: fx.GraphModule) -> PassResult:
    require_canonical(gm)
    sites = plan_fx(pass_, gm)
    stats = {"matmuls_quantized": 0, "gathers_quantized": 0, "activations_quantized": 0,
             "weight_bytes_before": 0, "weight_bytes_after": 0}
    if not sites:
        return PassResult(gm, False, stats)
    weights: dict[str, fx.Node] = {}  # weight target -> its dequantized int8 copy
    activations: dict[fx.Node, fx.Node] = {}
    old: list[fx.Node] = []
    for site in sites:
        node, w = site.node, site.node.args[site.weight]
        with gm.graph.inserting_before(node):
            if w.target not in weights:
                weights[w.target] = _dequantized_weight(pass_, gm, w, site.axis, stats)
            node.replace_input_with(w, weights[w.target])
            old.append(w)
            if site.activation is None:
                stats["gathers_quantized"] += 1
                continue
            x = node.args[site.activation]
            if x not in activations:
                activations[x] = _fake_quant_activation(pass_.name, gm.graph, x)
            node.replace_input_with(x, activations[x])
            stats["matmuls_quantized"] += 1
    stats["activations_quantized"] = len(activations)
    _, stats["attributes_removed"] = remove_dead_fx(gm, old)
    gm.recompile()
    logger.debug("quantize-dynamic (fx): %s", stats)
    return PassResult(gm, True, stats)


def _fake_quant_activation(pass_name: str, graph: fx.Graph, x: fx.Node) -> fx.Node:
    """``DynamicQuantizeLinear``'s uint8 qparams of ``x`` and its fake-quantized value."""

    def call(op, *args) -> fx.Node:
        return mark(graph.call_function(op, args), pass_name)

    lo = call(_aten.clamp.default, call(_aten.min.default, x), None, 0.0)
    hi = call(_aten.clamp.default, call(_aten.max.default, x), 0.0)
    scale = call(_aten.div.Tensor, call(_aten.sub.Tensor, hi, lo), 255.0)
    scale = call(_aten.clamp.default, scale, torch.finfo(torch.float32).tiny)  # x ≡ 0
    scale = call(_aten.detach.default, scale)  # qparams carry no gradient (straight-through)
    zero = call(_aten.round.default, call(_aten.div.Tensor, call(_aten.neg.default, lo), scale))
    zero = call(_aten.clamp.default, zero, 0.0, 255.0)
    zero = mark(graph.call_function(_aten._to_copy.default, (zero,), {"dtype": torch.int32}),
                pass_name)
    return call(_aten.fake_quantize_per_tensor_affine.tensor_qparams, x, scale, zero, 0, 255)


def _dequantized_weight(pass_: QuantizeDynamic, gm: fx.GraphModule, w: fx.Node, axis: int,
                        stats: dict) -> fx.Node:
    """int8 buffers of the weight ``w`` and the node that dequantizes them."""
    weight = get_tensor(gm, w).detach().cpu().numpy()
    q, scale, zero = quantize_int8(weight, axis=axis if pass_.per_channel else None,
                                   symmetric=pass_.symmetric)
    qmin, qmax = (-127, 127) if pass_.symmetric else (-128, 127)
    graph, origin = gm.graph, str(w.target)

    def attr(role: str, tensor: torch.Tensor) -> fx.Node:
        stats["weight_bytes_after"] += tensor.numel() * tensor.element_size()
        return mark(graph.get_attr(add_tensor(gm, f"{origin}.{_TAG}.{role}", tensor)), pass_.name)

    stats["weight_bytes_before"] += weight.nbytes
    q_node = attr("q", torch.from_numpy(q))
    if not pass_.per_channel:
        args = (q_node, float(scale), 0 if zero is None else int(zero), qmin, qmax, torch.int8)
        return mark(graph.call_function(_qd.dequantize_per_tensor.default, args), pass_.name)
    scales = attr("scale", torch.from_numpy(scale))
    zeros = None if zero is None else attr("zero_point", torch.from_numpy(zero.astype("int32")))
    args = (q_node, scales, zeros, axis, qmin, qmax, torch.int8)
    return mark(graph.call_function(_qd.dequantize_per_channel.default, args), pass_.name)

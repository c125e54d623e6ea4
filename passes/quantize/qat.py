"""Quantization-aware training (QAT) on quantized FX graphs: ``prepare_qat`` and ``convert_qat``.

``prepare_qat(gm)`` turns every quantized weight of a graph made by ``insert-qdq``,
``quantize-dynamic``, ``quantize-weights`` or ``quantize-ternary`` into a float *master weight*
``W`` (an ``nn.Parameter``, initialised to the dequantized value ``(q − z)·s``) followed by
fake quantization, and every static activation Q/DQ pair of ``insert-qdq`` into fake
quantization of the activation. ``convert_qat(gm)`` re-quantizes the (trained) master weights
with their (possibly learned) scales and rebuilds the nodes the original pass emits, so the
result exports to ONNX exactly as a freshly quantized graph does (Q/DQ, the int8 dequantize
chain, the packed block decode chain).

**Forward.** Fake quantization computes what the quantized graph computes, with the same
scale, zero point, bits, blocks and round-half-even:
``Ŵ = (clip(round(W/s) + z, qmin, qmax) − z)·s`` (per tensor, per channel along the weight's
output axis, or per block of ``B`` inputs on ``[N, ⌈K/B⌉, B]``). At step 0 the master weight
re-quantizes to the very same codes, so the prepared graph's outputs equal the quantized
graph's bit for bit; static activations use ``quantize_per_tensor``'s own ``x·(1/s)``.

**Straight-through estimator (STE).** ``∂Ŵ/∂W = 1`` where ``qmin ≤ round(W/s) + z ≤ qmax`` and
0 outside the clipping range (Bengio et al. 2013), written as
``Ŵ = fq(W).detach() + (W − W.detach())·m``: the second term is exactly 0 in value.
Activations get the same estimator; ``quantize-dynamic``'s run-time activation fake quant
(``aten.fake_quantize_per_tensor_affine``) already has it and stays as it is.

**LSQ** (``learn_scales=True``; Esser et al., 2019, "Learned Step Size Quantization"): every
weight scale (per tensor, channel or block) and every static activation scale becomes an
``nn.Parameter`` with the gradient
``∂Ŵ/∂s = round(v) − v`` inside the grid (``v = W/s``), ``qmin − z`` below and ``qmax − z``
above, scaled by ``g = 1/√(N·Q_P)``: ``N`` is the number of values sharing the scale (the
channel's or block's weights, an activation's values per sample) and ``Q_P = qmax − z̄`` the
positive levels (127 for int8 weights, 7 for symmetric 4-bit, 1 for ternary). Zero points stay
fixed. Without LSQ the scales are buffers and do not train.

**Ternary** (``quantize-ternary``, BitNet b1.58, Ma et al. 2024): by default the scale is
*recomputed* from the master weight on every forward pass, ``γ = mean|W|`` per block (per row
when the graph stores one scale per row), rounded to float16 as the pass stores it;
``Ŵ = γ·clip(round(W/γ), −1, 1)`` with the identity STE (BitNet's ``W + (Ŵ − W).detach()``;
``γ`` carries no gradient). The master weight starts at ``t·γ·n/nnz`` per block (absmean ``γ``
again, so step 0 is exact). With ``learn_scales=True`` ternary scales are LSQ parameters instead
(fixed grid ``{−1, 0, 1}``, clipped STE).

**Training.** The prepared graph is an ordinary aten GraphModule: ``gm(*inputs)`` under
autograd, any optimiser over its parameters (the master weights and LSQ scales are the new
``nn.Parameter``s; fixed scales are buffers marked with their quantization pass, which
``graphpress.distill`` keeps frozen). LSQ's ``g`` assumes SGD; Adam normalises it away, so
give the ``*_qat_scale`` parameters a learning rate about 10× smaller there. Nodes created
here are marked ``prepare-qat``; each fake
quantization's output node holds a record in ``node.meta["graphpress.qat"]`` that
``convert_qat`` reads.
"""

from __future__ import annotations

import logging

import torch
from torch import fx, nn

from graphpress.graph.errors import PreconditionError
from graphpress.graph.kind import clone

from .._rewrite import remove_dead_fx, require_canonical
from ._qat_convert import rebuild
from ._qat_emit import PREPARE_PASS, Builder
from ._qat_prepare import rewrite
from ._qat_sites import find_sites

__all__ = ["prepare_qat", "convert_qat", "QAT_KEY", "PREPARE_PASS", "is_prepared"]

logger = logging.getLogger(__name__)

#: ``node.meta`` key of the record on each fake quantization's output node.
QAT_KEY = "graphpress.qat"


def is_prepared(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` holds fake quantization made by :func:`prepare_qat`."""
    return any(QAT_KEY in node.meta for node in gm.graph.nodes)


def prepare_qat(gm: fx.GraphModule, *, learn_scales: bool = False) -> fx.GraphModule:
    """A new GraphModule in which every quantized weight trains (module docstring).

    ``gm`` (a quantized aten FX graph) is not modified, and training the result never
    changes it: every parameter of the result is its own copy (ties kept); buffers, which do
    not train, stay shared. Raises :class:`PreconditionError` when ``gm`` holds nothing
    quantized or is already prepared.
    """
    _check_graph(gm)
    if is_prepared(gm):
        raise PreconditionError("prepare_qat: this graph is already prepared for QAT; train it, "
                                "or call convert_qat(gm) to get the quantized graph back")
    out = _own_parameters(clone(gm), gm)
    sites = find_sites(out)
    if not sites:
        raise PreconditionError(
            "prepare_qat: the graph holds no quantized weights or activations; quantize it "
            "first (insert-qdq, quantize-dynamic, quantize-weights or quantize-ternary)")
    builder, stale = Builder(out), []
    for site in sites:
        old = getattr(site, "node", None) or site.end
        with out.graph.inserting_before(old):
            new, record = rewrite(builder, site, learn_scales)
        new.meta[QAT_KEY] = record
        old.replace_all_uses_with(new)
        stale.append(old)
    remove_dead_fx(out, stale)
    out.recompile()
    logger.debug("prepare_qat: %d sites (%s)", len(sites),
                 ", ".join(sorted({type(s).__name__ for s in sites})))
    return out


def convert_qat(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with each fake quantization of ``gm`` re-quantized into the nodes its
    quantization pass emits (codes from the master weights, learned scales stored).

    ``gm`` is not modified and the result's parameters are copies (training ``gm`` further
    leaves the result as it is). Raises :class:`PreconditionError` when it was not prepared.
    """
    _check_graph(gm)
    if not is_prepared(gm):
        raise PreconditionError("convert_qat: the graph holds no fake quantization from "
                                "prepare_qat; call prepare_qat(quantized_graph) first")
    out = _own_parameters(clone(gm), gm)
    sites = [node for node in out.graph.nodes if QAT_KEY in node.meta]
    nodes = {node.name: node for node in out.graph.nodes}
    cache: dict = {}
    with torch.no_grad():  # codes and scales are evaluated from the prepared nodes
        for node in sites:
            with out.graph.inserting_before(node):
                new = rebuild(out, node.meta[QAT_KEY], nodes, cache)
            node.replace_all_uses_with(new)
    remove_dead_fx(out, sites)
    out.recompile()
    return out


def _own_parameters(out: fx.GraphModule, source: fx.GraphModule) -> fx.GraphModule:
    """Give ``out`` (a clone of ``source``) copies of its parameters, tied ones tied."""
    shared = {id(m) for m in source.modules()}
    copies: dict[int, nn.Parameter] = {}
    for module in out.modules():
        if id(module) in shared:  # a leaf module the clone shares (e.g. _guards_fn)
            continue
        for name, param in list(module._parameters.items()):
            if param is not None:
                if id(param) not in copies:
                    copies[id(param)] = nn.Parameter(param.detach().clone(),
                                                     requires_grad=param.requires_grad)
                module._parameters[name] = copies[id(param)]
    return out


def _check_graph(gm: object) -> None:
    if not isinstance(gm, fx.GraphModule):
        raise PreconditionError(
            f"QAT works on FX GraphModules, got {type(gm).__name__}; capture the model with "
            "graphpress.capture(model, args) and quantize it with graphpress.optimize first")
    require_canonical(gm)

"""Coupled channel groups: which constants must be sliced together to remove one channel.

A *channel space* is one axis of one tensor, ``(value, axis)``. Operators relate the spaces of
their inputs and outputs (rules in :mod:`._channel_rules`, written once over the IR-free view
of :mod:`._channel_view`):

* **identity**: element-wise ops, activations, norms, residual adds, transposes and the
  batch axes of products map input axis ``i`` to output axis ``j`` one to one (union-find);
* **segment**: concat/split/slice place a part ``P`` at ``[offset, offset + |P|)`` of a whole;
* **factor**: a reshape that splits (or merges) an axis of ``H·D`` channels into ``H × D``
  (row-major: channel ``c = h·D + d``); attention's head axis is such an outer factor.

Constants read along a space are its *uses* (:class:`ChannelUse`); a producer's ``"out"`` use
makes a space a group. A whole's uses are pushed into its parts with their offsets, and a flat
space whose outer factor is a head axis joins that head axis's ``"heads"`` group (unit ``D``).
Pruning unit ``u`` of a group removes indices ``[u·unit, (u+1)·unit) + offset`` along ``axis``
of every use's tensor; for a ``"shape"`` use the entry at position ``axis`` of the reshape /
expand / split-sizes vector becomes ``old · kept // size`` (``-1``/``0`` entries and entries
read at run time from another tensor's shape never need a change; FX size lists have
``tensor=""`` and ``axis`` is the position in ``node``'s list argument). A constant may be read
by several nodes (exporters deduplicate equal constants), so slice per use: give ``node`` a
new constant. A group is not prunable when a member space reaches a graph input or output,
is reduced, softmaxed or indexed along the channels, meets an op without a rule, an axis of
unknown size, a GroupNorm or a depthwise conv (their group count is an attribute), or a split
into equal parts (never guessed). Unknown axes left by dynamic-shape exports are completed
from run-time ``Shape``/``Slice``/``Concat`` reshape targets where they can be read.

GQA: the kv heads are grouped *with* their query heads (one ``"heads"`` group per kv head
axis); the query side then needs a unit of ``n_rep·D`` against ``D`` on the key/value side,
which one ``unit`` cannot express, so such groups are reported with ``prunable=False``. Each
use carries its own ``unit`` and the group its unit count ``units`` (the kv heads), so a
consumer that slices per use (tensor parallelism) needs no more than that; ``blockers`` lists
the reasons that forbid any slicing, apart from those that only stop pruning (the unit
disagreement, quantized weights, a run-time min/max over the channels).

Quantized layers are seen through (:mod:`._channel_view`): ``DequantizeLinear`` /
``quantized_decomposed.dequantize_per_*`` of integer codes, ``DynamicQuantizeMatMul``,
``MatMulNBits`` and the FX decode chain of ``quantize-weights`` are linear layers whose uses
name the stored codes (plus per-channel scale and zero-point uses for the dequantized forms);
activation ``QuantizeLinear``/``DequantizeLinear`` pairs with per-tensor parameters are
element-wise. Their groups are not prunable (prune before quantizing) but can be split.
:func:`linear_weights` lists the linear layers as uses name their weights; :func:`nbits_operands`
and :func:`nbits_chain` find the parts of a block-quantized weight for whoever slices it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ._channel_fx_quant import NBitsChain, nbits_chain
from ._channel_groups import assemble
from ._channel_onnx_quant import NBits, nbits_operands
from ._channel_rules import apply_rules
from ._channel_view import Const, build_view

__all__ = ["ChannelUse", "ChannelGroup", "LinearWeight", "channel_groups", "linear_weights",
           "NBits", "NBitsChain", "nbits_operands", "nbits_chain"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelUse:
    """One constant read along a channel axis.

    ``node``: the operator node that reads ``tensor`` (FX ``fx.Node.name`` / ONNX node name);
    ``tensor``: the constant (FX ``get_attr`` target / ONNX initializer or ``Constant`` output
    name), ``""`` when the use is not a constant (an FX ``view`` size list: ``axis`` is then
    the position in ``node``'s size argument); ``axis``: the axis of ``tensor`` as stored;
    ``role``: ``"out"``, ``"in"``, ``"norm"``, ``"shape"``, ``"act"``, ``"stat"`` (a marker,
    ``tensor=""``: a keep-dim mean/var or a weightless norm counts the channels, so removing
    even a zero channel changes its divisor) or ``"range"`` (a marker: ``node`` takes the
    min/max over all elements at run time, as dynamic activation quantization does);
    ``offset``: the first channel of the group inside ``tensor``'s axis (for a block-quantized
    weight ``node`` is the layer, ``tensor`` its packed codes and ``axis`` an axis of the
    logical ``[N, K]``: codes, scales and zero points are sliced together); ``unit``: how many
    consecutive channels of this axis one unit of the group spans (0 for ``"shape"``/
    ``"stat"``/``"range"``).
    """

    node: str
    tensor: str
    axis: int
    role: str
    offset: int = 0
    unit: int = 0


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are removed together: ``size`` channels in units of ``unit``.

    ``unit`` is 1 when the uses disagree on it (then ``prunable`` is False and ``reason``
    says which nodes read which block sizes; grouped-query attention, a decomposed GroupNorm
    or a flatten of conv channels into a linear); each use's own unit is ``ChannelUse.unit``.
    ``units``: the number of units (heads; kv heads under grouped-query attention), so use
    ``u`` holds ``units · u.unit`` channels of the group. ``blockers``: the reasons no channel
    may be sliced at all (a subset of ``reason``; empty when only the unit disagreement,
    quantized weights or a run-time range stop pruning).
    """

    name: str
    kind: str
    size: int
    unit: int
    uses: tuple[ChannelUse, ...]
    prunable: bool
    reason: str = ""
    units: int = 0
    blockers: tuple[str, ...] = ()


def channel_groups(graph) -> list[ChannelGroup]:
    """The coupled channel groups of an FX ``GraphModule`` (aten dialect from
    ``torch.export``) or an ``onnx_ir.Model``, in graph order of their first producer."""
    view = build_view(graph)
    relations = apply_rules(view)
    groups = [ChannelGroup(name, kind, size, unit, tuple(ChannelUse(*u) for u in uses),
                           prunable, reason, units, blockers)
              for name, kind, size, unit, uses, prunable, reason, units, blockers
              in assemble(view, relations)]
    logger.debug("%d channel groups (%d prunable)", len(groups), sum(g.prunable for g in groups))
    return groups


@dataclass(frozen=True)
class LinearWeight:
    """The constant weight of one linear layer as channel uses name it.

    ``layer``: the product node; ``reader``/``tensor``: the node reading the stored constant and
    the constant (a use of the weight has these ``node``/``tensor``); ``shape``: the weight's
    shape in stored-axis order, so ``shape[use.axis]`` is the size a use slices (the logical
    ``[N, K]`` of packed ``MatMulNBits`` codes); ``storage``: ``""``, ``"int"`` or
    ``"nbits"``; ``companions``: ``(reader, tensor)`` of its per-channel scales/zero points.
    """

    layer: str
    reader: str
    tensor: str
    shape: tuple[int, ...]
    storage: str = ""
    companions: tuple[tuple[str, str], ...] = ()


def linear_weights(graph) -> list[LinearWeight]:
    """The linear layers with constant (maybe quantized) weights that ``channel_groups`` sees,
    in graph order."""
    found = []
    for op in build_view(graph).ops:
        weight = op.ins[1] if op.type == "linear" and len(op.ins) > 1 else None
        if isinstance(weight, Const):
            stored = [0] * len(weight.shape)
            for visible, axis in enumerate(weight.perm):
                stored[axis] = weight.shape[visible]
            found.append(LinearWeight(op.name, weight.reader, weight.tensor, tuple(stored),
                                      weight.storage,
                                      tuple((c.reader, c.tensor) for c in weight.companions)))
    return found

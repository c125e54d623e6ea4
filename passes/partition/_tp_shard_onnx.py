"""Materialise rank ``r`` of an ONNX model annotated by ``shard-tensor-parallel``.

The slicing is the FX one (see :mod:`._tp_shard_fx`) on ``onnx_ir``: groups through the pruning
shrinker, the rank's vocabulary rows (``Gather`` of the local rows at ``ids − v0``, rows of ids
outside ``[v0, v1)`` zeroed by ``Where``), the LM head's local logits, and ``Gemm`` biases of
row-parallel nodes on rank 0 only (``MatMul`` + ``Add`` exports add the bias after the
collective point, which is the ``MatMul``: exact on every rank).

Row-parallel ``DynamicQuantizeMatMul``/``MatMulNBits`` biases (fused inputs 4 and 5) stay on
rank 0 only, like ``Gemm``'s. A dynamic-quantization range node of a sharded group
(``ReduceMin``/``ReduceMax`` of the local channels, plan ``ranges``) becomes the min/max over
the ranks: its value (as ``[1]``) is all-gathered along axis 0 and reduced again; a
row-parallel ``DynamicQuantizeMatMul`` is first spelled out so that its range is such a node
(:mod:`._tp_dynamic_onnx`).

ONNX Runtime has no collectives, so the rank's model is then cut into segments at the
collective points (:mod:`._tp_segments`).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graphpress.export.shards import Collective
from graphpress.graph.onnx import add_initializer, mark, unique_name, value_names

from .._linears import find_linears
from .._rewrite import onnx_const
from ..prune._shrink_onnx import OnnxShrinker
from ._tp_dynamic_onnx import global_range_matmul
from ._tp_groups import TpGroup
from ._tp_segments import cut_segments
from ._tp_slices import rank_slices, vocab_rows
from ._tp_vocab import VocabSite

__all__ = ["shard_onnx"]

logger = logging.getLogger(__name__)

PASS = "shard-tensor-parallel"
_BIAS = {"Gemm": 2, "DynamicQuantizeMatMul": 4, "MatMulNBits": 5,  # fused bias inputs
         "MatMulIntegerToFloat": 6}


def shard_onnx(model: ir.Model, plan: dict, rank: int) -> tuple[list[Collective], list[int]]:
    """Make ``model`` rank ``rank``'s model (pass a copy); return the collective at each
    segment boundary and the pipeline stage of each segment (:mod:`._tp_segments`)."""
    world = plan["world_size"]
    shapes = {v.name: v.shape for v in model.graph.outputs}
    shrinker = OnnxShrinker(model, PASS, tag="tp")
    for data in plan["groups"]:
        group = TpGroup.from_json(data)
        if group.sharded:
            for sub, keep in rank_slices(group, rank, world):
                shrinker.shrink(sub, keep)
    nodes, taken = shrinker.nodes, value_names(model)
    points: dict[str, tuple[str, int | None]] = {}  # node name -> (kind, dim)
    for name in plan["all_reduces"]:
        points[name] = ("all_reduce", None)
    slices = _Slices()
    for site in map(VocabSite.from_json, plan["vocab"]):
        if not site.sharded:
            continue
        rows = vocab_rows(site.vocab, rank, world)
        node = nodes[site.node]
        if site.role == "vocab_row":
            point = _masked_lookup(model.graph, node, rows, slices, taken)
            points.pop(site.node, None)
            points[point] = ("all_reduce", None)
        else:
            point = _local_logits(model, node, rows, slices, taken, shrinker.touched)
            points[point] = ("all_gather", -1)
    combine = lambda node, op: _combine_range(model.graph, node, op, taken)  # noqa: E731
    for name, op in plan.get("ranges", ()):
        made = [combine(nodes[name], op)] if op in ("min", "max") else global_range_matmul(
            model.graph, nodes[name], taken, combine)
        points.update((point, ("all_gather", 0)) for point in made)
        nodes.update((n.name, n) for n in model.graph if n.name == name)
    if rank != 0:
        for data in plan["groups"]:
            for name in data["rows"] if data["sharded"] else ():
                node = nodes[name]
                index = _BIAS.get(node.op_type)
                if index is not None and len(node.inputs) > index and (
                        node.inputs[index] is not None):
                    shrinker.stale[node.inputs[index]] = None
                    node.replace_input_with(index, None)
    shrinker.stale.update(dict.fromkeys(slices.replaced))
    shrinker.finish()  # drops replaced constants, re-infers the shapes of touched values
    return cut_segments(model, points, taken, shapes)


def _const(graph, name, array, taken) -> ir.Value:
    return add_initializer(graph, name, np.asarray(array), PASS, taken)


class _Slices:
    """Vocabulary slices made so far (tied weights are sliced once) and the constants they
    replace (dropped at the end when nothing reads them)."""

    def __init__(self) -> None:
        self.made: dict[tuple[str, int], ir.Value] = {}
        self.replaced: list[ir.Value] = []


def _slice(graph, value: ir.Value, rows, axis: int, slices: _Slices, taken) -> ir.Value:
    """A new constant of ``value``'s ``rows`` along ``axis``."""
    key = (value.name, axis)
    slices.replaced.append(value)
    if key not in slices.made:
        array = onnx_const(value)
        part = np.ascontiguousarray(np.take(array, np.arange(*rows), axis=axis))
        slices.made[key] = _const(graph, f"{value.name}.tp", part, taken)
    return slices.made[key]


def _add(graph, anchor: ir.Node, op: str, inputs, name: str, taken, *, after: bool = False,
         **attrs) -> ir.Value:
    """A new ``op`` node (output named from ``name``) inserted before ``anchor``, or after."""
    out = ir.Value(name=unique_name(graph, name, taken))
    node = ir.node(op, list(inputs), attributes=attrs, outputs=[out],
                   name=unique_name(graph, f"{name}.node", taken))
    (graph.insert_after if after else graph.insert_before)(anchor, mark(node, PASS))
    return out


def _combine_range(graph, node: ir.Node, op: str, taken) -> str:
    """Make ``node``'s min/max of the local channels the min/max over the ranks; returns the
    name of the node whose ``[1]`` output is all-gathered."""
    out = node.outputs[0]
    base = f"{out.name}.tp"
    one = _const(graph, f"{base}.one", np.array([1], np.int64), taken)
    local = _add(graph, node, "Reshape", [out, one], f"{base}.local", taken, after=True)
    if out.dtype is not None:  # shape unknown: [1] here, [W] once gathered
        local.dtype = out.dtype
    reshape = local.producer()
    final = _add(graph, reshape, "ReduceMin" if op == "min" else "ReduceMax", [local],
                 f"{base}.all", taken, after=True, keepdims=0)
    rank = len(out.shape) if out.shape is not None else 0
    if rank:  # a keep-dims reduction: its [1, ..., 1] shape again
        ones = _const(graph, f"{base}.shape", np.ones(rank, np.int64), taken)
        final = _add(graph, final.producer(), "Reshape", [final, ones], f"{base}.keep", taken,
                     after=True)
    for use in list(out.uses()):
        if use.node is not reshape:
            use.node.replace_input_with(use.idx, final)
    return reshape.name


def _masked_lookup(graph, node: ir.Node, rows, slices, taken) -> str:
    """``Gather`` of the local rows; returns the name of the node whose output is reduced."""
    weight, ids = node.inputs
    base = f"{node.outputs[0].name}.tp"
    int_type = ids.dtype.numpy() if ids.dtype is not None else np.int64
    lo = _const(graph, f"{base}.lo", np.array(rows[0], int_type), taken)
    hi = _const(graph, f"{base}.hi", np.array(rows[1], int_type), taken)
    below = _add(graph, node, "Less", [ids, lo], f"{base}.below", taken)
    above = _add(graph, node, "GreaterOrEqual", [ids, hi], f"{base}.above", taken)
    outside = _add(graph, node, "Or", [below, above], f"{base}.outside", taken)
    local = _add(graph, node, "Sub", [ids, lo], f"{base}.local", taken)
    zero = _const(graph, f"{base}.zero", np.array(0, int_type), taken)
    safe = _add(graph, node, "Where", [outside, zero, local], f"{base}.ids", taken)
    node.replace_input_with(0, _slice(graph, weight, rows, 0, slices, taken))
    node.replace_input_with(1, safe)
    axes = _const(graph, f"{base}.axes", np.array([-1], np.int64), taken)
    dtype = weight.const_value.dtype.numpy()
    fill = _const(graph, f"{base}.fill", np.array(0, dtype), taken)
    out = node.outputs[0]
    mask_out = ir.Value(name=unique_name(graph, f"{base}.mask", taken))
    zeroed = ir.Value(name=unique_name(graph, f"{base}.zeroed", taken), type=out.type,
                      shape=out.shape)
    mask = mark(ir.node("Unsqueeze", [outside, axes], outputs=[mask_out],
                        name=unique_name(graph, f"{base}.mask.node", taken)), PASS)
    where = mark(ir.node("Where", [mask_out, fill, out], outputs=[zeroed],
                         name=unique_name(graph, f"{base}.zeroed.node", taken)), PASS)
    graph.insert_after(node, [mask, where])
    for use in list(out.uses()):
        if use.node is not where:
            use.node.replace_input_with(use.idx, zeroed)
    if out.is_graph_output():
        graph.outputs[graph.outputs.index(out)] = zeroed
    return where.name


def _local_logits(model, node: ir.Node, rows, slices, taken, touched: dict) -> str:
    graph = model.graph
    site = next(s for s in find_linears(model) if s.node is node)
    reader = site.via.producer() if site.via is not None else node
    index = 0 if site.via is not None else site.weight_input_index()
    reader.replace_input_with(index, _slice(graph, site.source, rows,
                                            0 if site.stored_nk else 1, slices, taken))
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        node.replace_input_with(2, _slice(graph, node.inputs[2], rows, 0, slices, taken))
    point = node
    users = node.outputs[0].uses()
    if len(users) == 1 and users[0].node.op_type == "Add":  # MatMul + bias export
        add = users[0].node
        bias = add.inputs[1 - users[0].idx]
        if onnx_const(bias) is not None and onnx_const(bias).ndim == 1:
            add.replace_input_with(1 - users[0].idx, _slice(graph, bias, rows, 0, slices, taken))
            point = add
    for value in (site.via, node.outputs[0], point.outputs[0]):
        if value is not None and not value.is_graph_output():
            touched[value] = None  # their recorded shapes hold the whole vocabulary
    return point.name or point.outputs[0].name

"""ONNX side of slicing a ``MatMulNBits`` weight (the math is :mod:`._shrink_nbits`).

A channel use of a ``MatMulNBits`` node names its packed codes with axis 0 (``N``, output
rows) or 1 (``K``, input channels). The node gets new codes, scales and zero points (a fresh
``Reshape``/``Cast`` when it read them through one, so a reader of the old ones is not
affected) and new ``N``/``K`` attributes; the old constants and intermediate nodes go once
nothing reads them.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graphpress.graph.channels import nbits_operands
from graphpress.graph.errors import UnsupportedGraphError
from graphpress.graph.onnx import add_initializer, mark, unique_name

from .._rewrite import onnx_const
from ._shrink_nbits import NBitsArrays, slice_nbits

__all__ = ["reads_codes", "shrink_nbits"]

logger = logging.getLogger(__name__)

ORIGIN = "prune.origin"


def reads_codes(node: ir.Node, tensor: str) -> bool:
    """Whether ``tensor`` is (or was, before slicing) the packed weight of ``node``, a
    ``MatMulNBits`` (its fused bias is an ordinary constant)."""
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return False
    ops = nbits_operands(node)
    if ops is None:
        raise UnsupportedGraphError(f"cannot slice the weight of MatMulNBits {node.name!r} "
                                    "(g_idx, or operands that are not constants); exclude it")
    return tensor in (ops.codes.name, ops.codes.meta.get(ORIGIN))


def shrink_nbits(shrinker, node: ir.Node, use, removed: np.ndarray) -> None:
    """Remove the original channels ``removed`` along ``use.axis`` of ``node``'s weight."""
    ops = nbits_operands(node)
    axis = use.axis
    kept, history = shrinker.ledger.keep(ops.codes.name, axis, ops.n if axis == 0 else ops.k,
                                         removed)
    zero = onnx_const(ops.zero_points) if ops.zero_points is not None else None
    arrays = NBitsArrays(onnx_const(ops.codes), onnx_const(ops.scales), zero, ops.n, ops.k,
                         ops.bits, ops.block, zero is not None and zero.dtype == np.uint8)
    new = slice_nbits(arrays, axis, kept)
    graph, tag = shrinker.graph, shrinker.tag

    def const(value: ir.Value, array: np.ndarray) -> ir.Value:
        origin = value.meta.get(ORIGIN, value.name)
        made = add_initializer(graph, f"{origin}.{tag}", array, shrinker.pass_name,
                               shrinker.taken)
        made.meta[ORIGIN] = origin
        shrinker.stale[value] = None
        return made

    codes = const(ops.codes, new.codes)
    shrinker.ledger.adopt(codes.name, history)
    if ops.reshape is not None:
        shape = np.array([new.n, -(-new.k // new.block), new.block * new.bits // 8], np.int64)
        target = const(ops.reshape.inputs[1], shape)
        _replace_via(shrinker, node, 1, ops.reshape, [codes, target])
    else:
        node.replace_input_with(1, codes)
    scales = const(ops.scales, new.scales)
    if ops.cast is not None:
        _replace_via(shrinker, node, 2, ops.cast, [scales])
    else:
        node.replace_input_with(2, scales)
    if ops.zero_points is not None:
        node.replace_input_with(3, const(ops.zero_points, new.zero_points))
    node.attributes["N"] = ir.AttrInt64("N", new.n)
    node.attributes["K"] = ir.AttrInt64("K", new.k)


def _replace_via(shrinker, node: ir.Node, index: int, via: ir.Node, inputs: list) -> None:
    """Give ``node`` a fresh copy of ``via`` (a ``Reshape``/``Cast``) reading ``inputs``; the
    old ``via`` goes when nothing else reads it."""
    graph, old = shrinker.graph, via.outputs[0]
    out = ir.Value(name=unique_name(graph, f"{old.name}.{shrinker.tag}", shrinker.taken),
                   type=old.type)
    fresh = ir.node(via.op_type, inputs, attributes=dict(via.attributes), outputs=[out],
                    name=unique_name(graph, f"{via.name or old.name}.{shrinker.tag}",
                                     shrinker.taken))
    graph.insert_before(node, mark(fresh, shrinker.pass_name))
    node.replace_input_with(index, out)
    if not old.uses() and not old.is_graph_output():
        graph.remove(via, safe=True)

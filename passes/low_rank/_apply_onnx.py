"""ONNX side of ``factor-low-rank``: one product becomes two thin ones.

With ``W_nk ≈ A·B`` (``A`` ``[N, r]``, ``B`` ``[r, K]``):

* ``MatMul(x, W[K, N])`` → ``MatMul(MatMul(x, Bᵀ[K, r]), Aᵀ[r, N])``; a following bias ``Add``
  is untouched.
* ``Gemm(x, W, C; alpha, beta, transB)`` → ``Gemm(MatMul(x, Bᵀ[K, r]), A', C; alpha, beta,
  transB)`` with ``A' = A`` ``[N, r]`` when ``transB = 1`` and ``Aᵀ`` otherwise, so the bias
  ``C`` and the scalars stay exact.

The factors are new initializers ``<weight>.lowrank.b`` (applied first) and
``<weight>.lowrank.a`` (second) in the weight's dtype; the old weight (and a ``Transpose`` in
front of it) goes when nothing else reads it. Graph-output names are kept.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graphpress.graph.onnx import add_initializer, mark, unique_name

from .._linears import LinearSite
from .._rewrite import bypass_onnx, drop_unused_constants, onnx_const, remove_node_onnx

__all__ = ["factor_onnx", "TAG"]

logger = logging.getLogger(__name__)

TAG = "lowrank"


def factor_onnx(model: ir.Model, site: LinearSite, a: np.ndarray, b: np.ndarray,
                pass_name: str, taken: set[str]) -> None:
    """Replace ``site``'s product by the two thin products of ``A`` ``[N, r]``, ``B`` ``[r, K]``."""
    graph, node = model.graph, site.node
    dtype = onnx_const(site.source).dtype
    base = f"{site.name}.{TAG}"
    x, old = node.inputs[0], node.outputs[0]
    rank = b.shape[0]
    first_w = add_initializer(graph, f"{base}.b", np.ascontiguousarray(b.T.astype(dtype)),
                              pass_name, taken)
    hidden = ir.Value(name=unique_name(graph, f"{base}.hidden", taken), type=x.type)
    if x.shape is not None:
        hidden.shape = ir.Shape([*list(x.shape)[:-1], rank])
    first = ir.node("MatMul", [x, first_w], outputs=[hidden],
                    name=unique_name(graph, f"{base}.first", taken))
    out = ir.Value(name=unique_name(graph, f"{base}.out", taken), type=old.type, shape=old.shape)
    if site.layout == "gemm":  # Gemm keeps C, alpha, beta and transB: the bias stays exact
        attrs = node.attributes
        trans_b = attrs.get_int("transB", 0)
        second_w = add_initializer(graph, f"{base}.a", np.ascontiguousarray(
            (a if trans_b else a.T).astype(dtype)), pass_name, taken)
        second = ir.node("Gemm", [hidden, second_w, *node.inputs[2:]], outputs=[out],
                         attributes={"alpha": attrs.get_float("alpha", 1.0),
                                     "beta": attrs.get_float("beta", 1.0), "transB": trans_b},
                         name=unique_name(graph, f"{base}.second", taken))
    else:
        second_w = add_initializer(graph, f"{base}.a", np.ascontiguousarray(a.T.astype(dtype)),
                                   pass_name, taken)
        second = ir.node("MatMul", [hidden, second_w], outputs=[out],
                         name=unique_name(graph, f"{base}.second", taken))
    for made in (first, second):
        mark(made, pass_name)
    graph.insert_before(node, [first, second])
    if not bypass_onnx(node, old, out):  # never for a fresh product; keep the graph valid
        raise AssertionError(f"factor-low-rank could not bypass {node.name}")
    if site.via is not None and not site.via.uses() and not site.via.is_graph_output():
        remove_node_onnx(site.via.producer())
    drop_unused_constants([site.source])

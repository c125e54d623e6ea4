"""fuse-attention: replace exported scaled-dot-product attention by ORT's ``MultiHeadAttention``.

``torch.onnx`` (dynamo) decomposes ``scaled_dot_product_attention`` into about twenty ONNX
nodes per layer: heads split with ``Reshape``/``Transpose``, keys transposed through a
flattening ``Reshape → Transpose → Reshape``, ``Mul`` by ``√scale`` on both sides, ``MatMul``,
``Add`` of the mask bias, ``Softmax``, a ``Where(IsNaN(p), 0, p)`` guard, ``MatMul`` with the
values and the heads merged back. ONNX Runtime fuses none of it (the guard and the flattening
break its BERT patterns), and every one of those element-wise ops walks a ``[B, H, S, T]``
tensor: on all-MiniLM-L6-v2 they take about a third of the CPU time.

The math kept: with ``q, k, v`` the ``[B, S, H·D]`` projections split into ``H`` heads of
``D``, ``out = merge_heads(softmax(s·q·kᵀ + bias)·v)`` where ``s`` is the product of the
scalar scales found on the path (``√s·q`` and ``√s·kᵀ`` give ``s``). That is exactly
``com.microsoft::MultiHeadAttention(q, k, v, attention_bias=bias, num_heads=H, scale=s)``
(ONNX Runtime CPU and CUDA kernels), up to float summation order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graphpress.graph.onnx import add_initializer, mark, unique_name

from ._rewrite import bypass_onnx, onnx_const, remove_dead_onnx, value_names
from ._shape_expr import Token, dim_token, reshape_tokens
from .base import Pass, PassResult
from .registry import register

__all__ = ["FuseAttention"]

logger = logging.getLogger(__name__)

MS = "com.microsoft"


@dataclass
class _Match:
    q: ir.Value
    k: ir.Value
    v: ir.Value
    heads: int
    scale: float
    bias: ir.Value | None
    guard: bool          # the export guarded Softmax with Where(IsNaN(p), 0, p)
    out_node: ir.Node    # the Reshape that merges the heads back
    name: str


@register
@dataclass(frozen=True)
class FuseAttention(Pass):
    """Fuse exported scaled-dot-product attention into ``com.microsoft::MultiHeadAttention``.

    **Rules**
      1. ``Softmax(axis=-1)`` of ``[scalar·]MatMul(q₄[·c₁], kᵀ[·c₂])[ + bias]`` whose
         probabilities (optionally through ``Where(IsNaN(p), 0, p)``) feed ``MatMul(p, v₄)``,
         then ``Transpose(0,2,1,3)`` and a ``Reshape`` merging the last two axes, becomes one
         ``MultiHeadAttention`` on the ``[B, S, H·D]`` values before the head split.
      2. ``q₄``/``v₄`` are ``Transpose(0,2,1,3)(Reshape(x, [B, S, H, D]))``; ``kᵀ`` is
         ``Transpose(0,1,3,2)`` of such a ``k₄``, ``Transpose(0,2,3,1)`` of the reshape, or the
         exporter's ``Reshape(Transpose(0,2,1)(Reshape(k₄, [-1, S, D])), [B, H, D, S])``. Every
         reshape is proven from static shapes or from the ``Shape``/``Slice``/``Concat``
         arithmetic that builds its target (``_shape_expr``); anything unproven is left alone.
      3. The bias goes to ``attention_bias`` ``[B|1, H|1, S, T]``: lower ranks are unsqueezed,
         query and key axes not provably ``S`` and ``T`` are expanded to them.
      4. When the export guarded the probabilities and the bias may hold ``-inf`` (a fully
         masked row: softmax NaN → guard → 0), the output gets ``Where(IsNaN(o), 0, o)``, which
         gives the same zeros. Finite biases (``Where(mask, 0, float_min)``) need no guard.

    **Requires** an ONNX graph (FX keeps ``aten.scaled_dot_product_attention`` as one node
    already). **Ensures** the graph interface is unchanged; outputs equal within float
    summation order (tests compare ORT before vs after).
    """

    name: ClassVar[str] = "fuse-attention"
    supports: ClassVar[frozenset[str]] = frozenset({"onnx"})

    def run_onnx(self, model: ir.Model) -> PassResult:
        graph, taken = model.graph, value_names(model)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        matches = [m for node in list(graph) if (m := _match(node, opset)) is not None]
        guards = sum(_rewrite(graph, match, self.name, taken) for match in matches)
        if matches:
            model.opset_imports.setdefault(MS, 1)
            remove_dead_onnx(graph)
        stats = {"attention_fused": len(matches),
                 "heads": float(matches[0].heads) if matches else 0.0,
                 "guards_kept": guards}
        return PassResult(model, bool(matches), stats)


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op or node.domain not in ("", "ai.onnx"):
        return None
    return node


def _perm(node: ir.Node | None) -> list[int] | None:
    attr = node.attributes.get("perm") if node is not None else None
    return None if attr is None else list(attr.as_ints())


def _scalar(value: ir.Value | None) -> float | None:
    array = onnx_const(value)
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None


def _strip_scale(value: ir.Value) -> tuple[ir.Value, float]:
    """``value = x·c`` or ``x/c`` with a scalar constant ``c`` → ``(x, c or 1/c)``."""
    for op in ("Mul", "Div"):
        node = _producer(value, op)
        if node is None:
            continue
        a, b = node.inputs
        c = _scalar(b)
        if c is not None and c != 0:
            return a, (c if op == "Mul" else 1.0 / c)
        c = _scalar(a)
        if op == "Mul" and c is not None and c != 0:
            return b, c
    return value, 1.0


def _split_heads(x4: ir.Value) -> tuple[ir.Value, int, int, ir.Node] | None:
    """``x4 = Transpose(0,2,1,3)(Reshape(x, [B, S, H, D]))`` → ``(x, H, D, reshape)``."""
    transpose = _producer(x4, "Transpose")
    if _perm(transpose) != [0, 2, 1, 3]:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    if reshape is None:
        return None
    return _heads_of(reshape)


def _heads_of(reshape: ir.Node) -> tuple[ir.Value, int, int, ir.Node] | None:
    x = reshape.inputs[0]
    tokens = reshape_tokens(reshape)
    if x is None or x.shape is None or len(x.shape) != 3 or tokens is None or len(tokens) != 4:
        return None
    if tokens[0] != dim_token(x, 0) or tokens[1] != dim_token(x, 1):
        return None
    width = x.shape[2] if isinstance(x.shape[2], int) else None
    heads, size = (t[1] if t is not None and t[0] == "int" else None for t in tokens[2:])
    if heads is None and size and width:
        heads = width // size
    if size is None and heads and width:
        size = width // heads
    if not heads or not size or (width is not None and heads * size != width):
        return None
    return x, heads, size, reshape


def _keys(kt: ir.Value) -> tuple[ir.Value, int, int, ir.Node] | None:
    """The ``[B, T, H·D]`` keys behind a ``[B, H, D, T]`` ``kᵀ`` (Rule 2)."""
    transpose = _producer(kt, "Transpose")
    perm = _perm(transpose)
    if perm == [0, 1, 3, 2]:
        return _split_heads(transpose.inputs[0])
    if perm == [0, 2, 3, 1]:
        reshape = _producer(transpose.inputs[0], "Reshape")
        return None if reshape is None else _heads_of(reshape)
    outer = _producer(kt, "Reshape")
    middle = _producer(outer.inputs[0], "Transpose") if outer is not None else None
    inner = _producer(middle.inputs[0], "Reshape") if middle is not None else None
    if inner is None or _perm(middle) != [0, 2, 1]:
        return None
    k4 = inner.inputs[0]
    dims: list[Token] = [dim_token(k4, a) for a in range(4)]
    flat, back = reshape_tokens(inner), reshape_tokens(outer)
    if flat is None or back is None or flat[1:] != [dims[2], dims[3]] or len(flat) != 3:
        return None
    if back != [dims[0], dims[1], dims[3], dims[2]]:
        return None
    return _split_heads(k4)


def _merged_output(context: ir.Value) -> ir.Node | None:
    """The ``Reshape`` merging ``Transpose(0,2,1,3)(context)`` back to ``[B, S, H·D]``."""
    uses = list(context.uses())
    if len(uses) != 1 or uses[0].node.op_type != "Transpose" or _perm(uses[0].node) != [0, 2, 1, 3]:
        return None
    merged = uses[0].node.outputs[0]
    uses = list(merged.uses())
    if len(uses) != 1 or uses[0].node.op_type != "Reshape" or uses[0].idx != 0:
        return None
    reshape = uses[0].node
    tokens = reshape_tokens(reshape)
    if tokens is None or len(tokens) != 3:
        return None
    if tokens[0] != dim_token(merged, 0) or tokens[1] != dim_token(merged, 1):
        return None
    return reshape


def _match(softmax: ir.Node, opset: int) -> _Match | None:  # Rule 1
    if softmax.op_type != "Softmax" or softmax.domain not in ("", "ai.onnx"):
        return None
    axis = softmax.attributes.get("axis")
    if axis is None and opset < 13:  # before opset 13: axis 1 of a flattened 2-D view
        return None
    if axis is not None and axis.as_int() not in (-1, 3):
        return None
    probs, guard = softmax.outputs[0], False
    for use in list(probs.uses()):
        where = use.node
        if where.op_type == "IsNaN":
            guards = [u.node for u in where.outputs[0].uses() if u.node.op_type == "Where"]
            if len(guards) == 1 and guards[0].inputs[2] is probs and _scalar(guards[0].inputs[1]) == 0:
                probs, guard = guards[0].outputs[0], True
    consumers = [u.node for u in probs.uses()]
    if len(consumers) != 1 or consumers[0].op_type != "MatMul" or consumers[0].inputs[0] is not probs:
        return None
    context_node = consumers[0]
    scores, bias = softmax.inputs[0], None
    add = _producer(scores, "Add")
    if add is not None:
        for qk, other in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            if _producer(_strip_scale(qk)[0], "MatMul") is not None:
                scores, bias = qk, other
                break
        else:
            return None
    scores, post = _strip_scale(scores)
    product = _producer(scores, "MatMul")
    if product is None:
        return None
    q4, c1 = _strip_scale(product.inputs[0])
    kt, c2 = _strip_scale(product.inputs[1])
    q, k, v = _split_heads(q4), _keys(kt), _split_heads(context_node.inputs[1])
    out_node = _merged_output(context_node.outputs[0])
    if q is None or k is None or v is None or out_node is None:
        return None
    if not (q[1] == k[1] == v[1]) or q[2] != k[2]:
        return None
    if bias is not None and (bias.shape is None or len(bias.shape) > 4):
        return None
    return _Match(q[0], k[0], v[0], q[1], post * c1 * c2, bias, guard, out_node,
                  out_node.outputs[0].name or "attention")


def _finite_bias(bias: ir.Value | None) -> bool:
    """Whether ``bias`` provably holds no ±inf (a constant, or ``Where`` of finite constants)."""
    if bias is None:
        return True
    array = onnx_const(bias)
    if array is not None:
        return bool(np.isfinite(array).all())
    where = _producer(bias, "Where")
    if where is None:
        return False
    branches = [onnx_const(v) for v in where.inputs[1:]]
    return all(b is not None and np.isfinite(b).all() for b in branches)


def _rewrite(graph: ir.Graph, match: _Match, pass_name: str, taken: set[str]) -> bool:
    """Insert the fused node (and the Rule 4 guard); return whether a guard was needed."""
    before, base = match.out_node, match.name

    def node(op: str, inputs, role: str, domain: str = "", **attrs) -> ir.Value:
        out = ir.Value(name=unique_name(graph, f"{base}.attn.{role}", taken))
        new = ir.node(op, inputs, attributes=attrs, domain=domain, outputs=[out],
                      name=unique_name(graph, f"{base}.attn.{role}_node", taken))
        graph.insert_before(before, mark(new, pass_name))
        return out

    def const(role: str, array) -> ir.Value:
        return add_initializer(graph, f"{base}.attn.{role}", np.asarray(array, np.int64),
                               pass_name, taken)

    bias = match.bias
    if bias is not None:  # Rule 3
        rank = len(bias.shape)
        if rank < 4:
            bias = node("Unsqueeze", [bias, const("axes", list(range(4 - rank)))], "bias4")
        proven = rank >= 2 and dim_token(match.bias, rank - 2) == dim_token(match.q, 1) and \
            dim_token(match.bias, rank - 1) == dim_token(match.k, 1)
        if not proven:
            seq_q = node("Shape", [match.q], "seq_q", start=1, end=2)
            seq_k = node("Shape", [match.k], "seq_k", start=1, end=2)
            shape = node("Concat", [const("ones", [1, 1]), seq_q, seq_k], "bias_shape", axis=0)
            bias = node("Expand", [bias, shape], "bias_full")
    inputs = [match.q, match.k, match.v, None, None, bias]
    while inputs[-1] is None:
        inputs.pop()
    out = node("MultiHeadAttention", inputs, "mha", domain=MS, num_heads=match.heads,
               scale=float(match.scale))
    out.dtype, out.shape = match.out_node.outputs[0].dtype, match.out_node.outputs[0].shape
    guarded = match.guard and not _finite_bias(match.bias)
    if guarded:  # Rule 4
        zero = add_initializer(graph, f"{base}.attn.zero",
                               np.zeros((), out.dtype.numpy() if out.dtype else np.float32),
                               pass_name, taken)
        nan = node("IsNaN", [out], "isnan")
        out = node("Where", [nan, zero, out], "guard")
        out.dtype, out.shape = match.out_node.outputs[0].dtype, match.out_node.outputs[0].shape
    bypass_onnx(match.out_node, match.out_node.outputs[0], out)
    return guarded

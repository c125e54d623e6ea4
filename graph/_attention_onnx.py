"""Attention layers of an ONNX graph (best effort; the rules of ``_attention.py`` for FX).

1. ``com.microsoft::GroupQueryAttention``: ``num_heads``/``kv_num_heads`` attributes,
   ``head_dim = hidden / num_heads``; always causal (ORT's kernel is).
2. ``com.microsoft::MultiHeadAttention`` / ``Attention``: ``num_heads`` (KV heads = heads);
   causal when ``unidirectional=1`` or its mask/bias is causal.
3. ``Attention`` (opset 23): ``q_num_heads``/``kv_num_heads`` or the 4-D shapes; ``is_causal``.
4. The exported decomposition ``MatMul(Q, Kᵀ) → [Mul/Div/Add/Where...] → Softmax →
   [Where/Cast/Dropout] → MatMul(·, V)``: heads from the scores ``[B, H, Sq, Sk]``, ``D`` from
   ``Q``; ``Kᵀ`` is followed back through views, ``Mul`` by a constant and ``Expand``: a rank-5
   ``Expand [B, Hkv, n_rep, S, D]`` (grouped-query ``repeat_kv``) gives the KV heads. Causal
   when a mask added to (or selected into) the scores is a constant lower-triangular tensor or
   is computed by ``Trilu`` or a comparison of two ``Range``-derived tensors.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from ._attention import AttentionSite, triangular
from .analysis import op_name
from .onnx import constant_array

__all__ = ["onnx_sites"]

logger = logging.getLogger(__name__)

_UP = frozenset({"Add", "Mul", "Div", "Sub", "Where", "Cast", "Identity"})
_DOWN = frozenset({"Where", "Cast", "Dropout", "Identity"})
_KEY_PATH = frozenset({"Reshape", "Transpose", "Mul", "Div", "Expand", "Unsqueeze", "Squeeze",
                       "Cast", "Identity"})
_COMPARE = frozenset({"Less", "LessOrEqual", "Greater", "GreaterOrEqual"})
_LIMIT = 400


def onnx_sites(model: ir.Model) -> list[AttentionSite]:
    sites = []
    for index, node in enumerate(model.graph):
        op, label = op_name(node), node.name or f"{node.op_type}_{index}"
        if op.startswith("com.microsoft::") or op == "Attention":
            site = _fused(node, op, label)
        elif op == "Softmax":
            site = _decomposed(node, label)
        else:
            site = None
        if site is not None:
            sites.append(site)
    return sites


def _int_attr(node: ir.Node, name: str) -> int | None:
    attr = node.attributes.get(name)
    return int(attr.value) if attr is not None else None


def _dims(value: ir.Value | None) -> list[int | None] | None:
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def _size(value: ir.Value | None) -> int | None:
    if value is None or value.dtype is None:
        return None
    return int(value.dtype.itemsize) if value.dtype.itemsize >= 1 else None


def _div(a: int | None, b: int | None) -> int | None:
    return a // b if a and b else None


def _fused(node: ir.Node, op: str, label: str) -> AttentionSite | None:
    out = _dims(node.outputs[0]) if node.outputs else None
    hidden = out[-1] if out else None
    query = node.inputs[0] if node.inputs else None
    if op.endswith("::GroupQueryAttention"):
        heads = _int_attr(node, "num_heads")
        return AttentionSite(label, heads, _int_attr(node, "kv_num_heads"), _div(hidden, heads),
                             True, _size(query))
    if op.endswith(("::MultiHeadAttention", "::Attention")):
        heads = _int_attr(node, "num_heads")
        # MultiHeadAttention: key_padding_mask 4, attention_bias 5; Attention: mask_index 3,
        # attention_bias 5
        at = (4, 5) if op.endswith("::MultiHeadAttention") else (3, 5)
        masks = [node.inputs[i] for i in at if i < len(node.inputs)]
        causal = bool(_int_attr(node, "unidirectional")) or any(_causal(m) for m in masks)
        return AttentionSite(label, heads, heads, _div(hidden, heads), causal, _size(query))
    if op == "Attention":
        q = _dims(query)
        heads, kv = _int_attr(node, "q_num_heads"), _int_attr(node, "kv_num_heads")
        k = _dims(node.inputs[1]) if len(node.inputs) > 1 else None
        if q and len(q) == 4:
            heads, dim = q[1], q[3]
            kv = k[1] if k and len(k) == 4 else kv
        else:
            dim = _div(q[-1] if q else None, heads)
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        causal = bool(_int_attr(node, "is_causal")) or _causal(mask)
        return AttentionSite(label, heads, kv or heads, dim, causal, _size(query))
    return None


def _decomposed(softmax: ir.Node, label: str) -> AttentionSite | None:
    scores, masks, cursor = None, [], softmax.inputs[0]
    for _ in range(8):  # walk up to the Q·Kᵀ MatMul
        producer = cursor.producer() if cursor is not None else None
        if producer is None:
            break
        if producer.op_type == "MatMul":
            scores = producer
            break
        if producer.op_type not in _UP:
            break
        branch = [v for v in producer.inputs if v is not None and constant_array(v) is None
                  and v.shape is not None and cursor.shape is not None
                  and len(v.shape) == len(cursor.shape) and v.dtype == cursor.dtype]
        masks.extend(v for v in producer.inputs if v is not None and v not in branch[:1])
        cursor = branch[0] if branch else None
    if scores is None or not _feeds_matmul(softmax):
        return None
    out = _dims(scores.outputs[0])
    q, key = _dims(scores.inputs[0]), scores.inputs[1]
    heads = out[1] if out and len(out) == 4 else None
    kv_heads = _kv_heads(key) or heads
    dim = q[-1] if q else None
    return AttentionSite(label, heads, kv_heads, dim, any(_causal(m) for m in masks), _size(key))


def _feeds_matmul(softmax: ir.Node) -> bool:
    frontier = [softmax.outputs[0]]
    for _ in range(4):
        following = []
        for value in frontier:
            for user, index in value.uses():
                if user.op_type == "MatMul" and index == 0:
                    return True
                if user.op_type in _DOWN:
                    following.extend(user.outputs[:1])
        frontier = following
    return False


def _kv_heads(key: ir.Value | None) -> int | None:
    for _ in range(10):
        producer = key.producer() if key is not None else None
        if producer is None or producer.op_type not in _KEY_PATH:
            return None
        out = _dims(producer.outputs[0])
        if producer.op_type == "Expand" and out and len(out) == 5:
            return out[1]
        key = next((v for v in producer.inputs if v is not None and constant_array(v) is None),
                   None)
    return None


def _causal(mask: ir.Value | None) -> bool:
    """A constant triangular mask, or one computed by Trilu / a position comparison."""
    if mask is None:
        return False
    seen, stack = set(), [mask]
    while stack and len(seen) < _LIMIT:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        array = constant_array(value)
        if array is not None:
            if array.ndim >= 2 and triangular(array):
                return True
            continue
        producer = value.producer()
        if producer is None:
            continue
        if producer.op_type == "Trilu":
            return True
        if producer.op_type in _COMPARE and all(
            v is not None and _from_range(v) for v in producer.inputs[:2]
        ):
            return True
        stack.extend(v for v in producer.inputs if v is not None)
    return False


def _from_range(start: ir.Value) -> bool:
    seen, stack = set(), [start]
    while stack and len(seen) < _LIMIT:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        producer = value.producer()
        if producer is None:
            continue
        if producer.op_type == "Range":
            return True
        stack.extend(v for v in producer.inputs if v is not None)
    return False

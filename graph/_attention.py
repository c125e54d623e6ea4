"""Find attention layers and read their head geometry, for the KV-cache estimate.

FX (aten): every ``scaled_dot_product_attention`` node is one layer. ``q [B, H, Sq, D]`` gives
``H`` and ``D``; the key's head count is the KV-head count, except that a grouped-query model
repeats its KV heads before the call (``repeat_kv``: ``unsqueeze → expand [B, Hkv, n_rep, S, D]
→ reshape``), so the key is followed back through views and the first rank-5 ``expand`` gives
``Hkv``. A layer is causal when ``is_causal=True`` or its mask is built by a position
comparison (``le/lt/ge/gt`` of two tensors that both derive from ``arange``) or by
``tril/triu``, or is a constant lower-triangular mask.

ONNX: see ``_attention_onnx.py``. A model whose layers have different geometries (cross
attention, mixed head counts) reports the most common one; pass the numbers explicitly then.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from .analysis import op_name
from .fx import get_tensor
from .kind import Graph, kind

__all__ = ["AttentionSite", "AttentionSummary", "attention_sites", "summarize", "triangular"]

logger = logging.getLogger(__name__)

_FX_SDPA = ("aten.scaled_dot_product_attention", "aten._scaled_dot_product")
_FX_THROUGH = frozenset(f"aten.{n}" for n in (
    "view reshape _unsafe_view expand unsqueeze clone contiguous alias to _to_copy squeeze "
    "transpose permute"
).split())
_FX_COMPARE = frozenset({"aten.le", "aten.lt", "aten.ge", "aten.gt"})
_SEARCH_LIMIT = 400


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer: its node and what its key cache would hold per token."""

    node: str
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    causal: bool
    element_bytes: int | None


@dataclass(frozen=True)
class AttentionSummary:
    layers: int
    kv_heads: int | None
    head_dim: int | None
    causal: bool
    element_bytes: int | None


def attention_sites(graph: Graph) -> list[AttentionSite]:
    """Attention layers of an FX or ONNX graph in graph order."""
    if kind(graph) == "fx":
        return [_fx_site(graph, n) for n in graph.graph.nodes
                if n.op == "call_function" and op_name(n).startswith(_FX_SDPA)]
    from ._attention_onnx import onnx_sites

    return onnx_sites(graph)


def summarize(sites: Sequence[AttentionSite]) -> AttentionSummary:
    def common(values):
        found = Counter(v for v in values if v is not None)
        return found.most_common(1)[0][0] if found else None

    return AttentionSummary(
        layers=len(sites), kv_heads=common(s.kv_heads for s in sites),
        head_dim=common(s.head_dim for s in sites), causal=any(s.causal for s in sites),
        element_bytes=common(s.element_bytes for s in sites),
    )


def triangular(array: np.ndarray) -> bool:
    """True if the last two axes mask everything above the (bottom-right aligned) diagonal
    and keep something below it: an additive mask (``<= -1e4`` masked) or a boolean one
    (either polarity)."""
    if array.ndim < 2 or array.shape[-2] < 2 or array.shape[-1] < array.shape[-2]:
        return False
    sq, sk = array.shape[-2:]
    upper = np.triu(np.ones((sq, sk), dtype=bool), k=sk - sq + 1)
    flat = array.reshape(-1, sq, sk)
    candidates = [~flat, flat] if flat.dtype == np.bool_ else [flat <= -1e4]
    return any(bool(m[:, upper].all()) and not bool(m[:, ~upper].all()) for m in candidates)


def _static(dim: object) -> int | None:
    return dim if isinstance(dim, int) else None


def _fx_site(gm: fx.GraphModule, node: fx.Node) -> AttentionSite:
    q, k = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args[:2])
    heads = _static(q.shape[1]) if isinstance(q, torch.Tensor) and q.dim() == 4 else None
    head_dim = _static(k.shape[-1]) if isinstance(k, torch.Tensor) else None
    kv_heads = _static(k.shape[1]) if isinstance(k, torch.Tensor) and k.dim() == 4 else None
    cursor = node.args[1]
    for _ in range(8):  # Rule: follow repeat_kv back to the rank-5 expand
        if not isinstance(cursor, fx.Node) or op_name(cursor) not in _FX_THROUGH:
            break
        val = cursor.meta.get("val")
        if op_name(cursor) == "aten.expand" and isinstance(val, torch.Tensor) and val.dim() == 5:
            kv_heads = _static(val.shape[1])
            break
        cursor = cursor.args[0] if cursor.args else None
    causal = bool(node.kwargs.get("is_causal", len(node.args) > 5 and node.args[5] is True))
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    if not causal and isinstance(mask, fx.Node):
        causal = _fx_causal_mask(gm, mask)
    size = k.element_size() if isinstance(k, torch.Tensor) else None
    return AttentionSite(node.name, heads, kv_heads, head_dim, causal, size)


def _fx_causal_mask(gm: fx.GraphModule, mask: fx.Node) -> bool:
    """The mask's ancestors hold tril/triu, a comparison of two position tensors, or it is a
    constant lower-triangular tensor."""
    seen, stack = set(), [mask]
    while stack and len(seen) < _SEARCH_LIMIT:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        op = op_name(node)
        if op in ("aten.tril", "aten.triu"):
            return True
        if op in _FX_COMPARE and len(node.args) >= 2 and all(
            isinstance(a, fx.Node) and _from_arange(a) for a in node.args[:2]
        ):
            return True
        value = get_tensor(gm, node)
        if value is not None and triangular(value.detach().cpu().numpy()):
            return True
        stack.extend(node.all_input_nodes)
    return False


def _from_arange(start: fx.Node) -> bool:
    seen, stack = set(), [start]
    while stack and len(seen) < _SEARCH_LIMIT:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if op_name(node) == "aten.arange":
            return True
        stack.extend(node.all_input_nodes)
    return False

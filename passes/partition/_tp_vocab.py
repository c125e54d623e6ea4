"""Vocab-parallel embedding and LM head: which nodes they are.

* **Embedding** (``vocab_row``): the embedding lookup (FX ``aten.embedding(W, ids)``, ONNX
  ``Gather(W, ids, axis=0)``) of a constant ``W[V, H]`` whose indices come straight from a
  graph input (maybe through a cast); the one with the largest ``V`` is the vocabulary. Rank
  ``r`` holds rows ``[r·V/W, (r+1)·V/W)``, looks up the ids inside that range (others read row
  0 and are zeroed) and one all-reduce sums the ranks' rows: exactly one rank contributes each
  token's row.
* **LM head** (``vocab_column``): a linear layer producing a graph output with ``N = V``
  output channels (or reading the embedding's very tensor: tied weights). Rank ``r`` computes
  logits ``[r·V/W, (r+1)·V/W)`` (column-parallel) and an all-gather along the last axis
  concatenates them.

A vocabulary embedding stays replicated when its table is also read by a node that is not a
sharded site (a tied LM head that cannot be split, e.g. a quantized one: slicing the table
would then hold it twice), or when its rows are integer codes dequantized with a non-zero zero
point (a zeroed row would not dequantize to zero).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from graphpress.graph.analysis import op_name
from graphpress.graph.fx import get_tensor

from .._rewrite import onnx_const
from ._tp_graph import GraphReader

__all__ = ["VocabSite", "find_vocab"]

logger = logging.getLogger(__name__)

_CASTS = {"aten._to_copy", "aten.to", "Cast", "aten.alias", "Identity"}


@dataclass(frozen=True)
class VocabSite:
    """``role``: ``"vocab_row"`` (embedding) or ``"vocab_column"`` (LM head); ``tensor``: the
    ``[V, H]`` / weight constant; ``vocab``: ``V``; ``sharded``/``reason`` as for groups."""

    role: str
    node: str
    tensor: str
    vocab: int
    sharded: bool
    reason: str = ""

    def to_json(self) -> dict:
        return {"role": self.role, "node": self.node, "tensor": self.tensor,
                "vocab": self.vocab, "sharded": self.sharded, "reason": self.reason}

    @staticmethod
    def from_json(data: dict) -> VocabSite:
        return VocabSite(data["role"], data["node"], data["tensor"], data["vocab"],
                         data["sharded"], data["reason"])


def find_vocab(reader: GraphReader, world: int, taken: set[str]) -> list[VocabSite]:
    """The vocabulary embedding and LM head(s) of the graph (``taken``: nodes already
    sharded by a channel group, left alone)."""
    embeddings = [e for e in _embeddings(reader) if e[0] not in taken]
    if not embeddings:
        return []
    node, tensor, vocab = max(embeddings, key=lambda e: e[2])
    sites = [_site("vocab_row", node, tensor, vocab, world)]
    outputs = _graph_output_producers(reader)
    for name, site in reader.linears.items():
        if name in taken or name not in outputs:
            continue
        shape = reader.const_shape(name, site.name)
        n = None if shape is None else (shape[0] if site.stored_nk else shape[1])
        if site.name == tensor or n == vocab:
            sites.append(_site("vocab_column", name, site.name, vocab, world))
    allowed = {s.node for s in sites if s.sharded}
    others = _other_readers(reader, tensor, allowed)
    if sites[0].sharded and others:
        sites[0] = VocabSite("vocab_row", node, tensor, vocab, False,
                             f"the table is also read by {others[0]!r}, which is not split")
    elif sites[0].sharded and _offset_codes(reader, node):
        sites[0] = VocabSite("vocab_row", node, tensor, vocab, False,
                             "its rows are codes dequantized with a non-zero zero point")
    return sites


_VIEWS = _CASTS | {"aten.t", "aten.permute", "aten.transpose", "Transpose"}


def _other_readers(reader: GraphReader, tensor: str, allowed: set[str]) -> list[str]:
    """Nodes outside ``allowed`` that read the constant ``tensor`` (through views/casts)."""
    if reader.kind == "fx":
        stack = [u for n in reader.graph.graph.nodes if n.op == "get_attr" and n.target == tensor
                 for u in n.users]
    else:
        value = reader.graph.graph.initializers.get(tensor)
        stack = [] if value is None else [u.node for u in value.uses()]
    found = []
    while stack:
        node = stack.pop()
        name = node.name if isinstance(node, fx.Node) else (
            node.name or node.outputs[0].name)
        if name in allowed:
            continue
        if op_name(node) in _VIEWS:
            stack.extend(node.users if isinstance(node, fx.Node)
                         else [u.node for out in node.outputs for u in out.uses()])
        else:
            found.append(name)
    return found


def _offset_codes(reader: GraphReader, name: str) -> bool:
    """Whether the rows an ONNX embedding looks up go through a ``DequantizeLinear`` whose zero
    point is not zero."""
    node = reader.nodes[name]
    if reader.kind == "fx":
        return False
    for use in node.outputs[0].uses():
        dq = use.node
        if dq.op_type == "DequantizeLinear" and len(dq.inputs) > 2 and dq.inputs[2] is not None:
            zero = onnx_const(dq.inputs[2])
            if zero is None or np.any(zero != 0):
                return True
    return False


def _site(role: str, node: str, tensor: str, vocab: int, world: int) -> VocabSite:
    if vocab % world:
        return VocabSite(role, node, tensor, vocab, False,
                         f"vocabulary {vocab} does not divide by world_size={world}")
    return VocabSite(role, node, tensor, vocab, True)


def _embeddings(reader: GraphReader) -> list[tuple[str, str, int]]:
    found = []
    for name, node in reader.nodes.items():
        if reader.kind == "fx":
            if node.op != "call_function" or op_name(node) != "aten.embedding":
                continue
            weight, ids = node.args[0], node.args[1]
            tensor = get_tensor(reader.graph, weight) if isinstance(weight, fx.Node) else None
            if tensor is None or tensor.dim() != 2 or not _from_input(ids):
                continue
            found.append((name, weight.target, int(tensor.shape[0])))
        else:
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
                continue
            if node.attributes.get_int("axis", 0) != 0 or len(node.inputs) != 2:
                continue
            weight, ids = node.inputs
            if weight is None or weight.const_value is None or weight.is_graph_input():
                continue
            if len(weight.const_value.shape) != 2 or not _from_input(ids):
                continue
            found.append((name, weight.name, int(weight.const_value.shape[0])))
    return found


def _from_input(value, depth: int = 3) -> bool:
    """Whether ``value`` is a graph input, maybe behind casts."""
    if isinstance(value, fx.Node):
        if value.op == "placeholder":
            return True
        return depth > 0 and value.op == "call_function" and op_name(value) in _CASTS and (
            _from_input(value.args[0], depth - 1))
    if value is None:
        return False
    if value.is_graph_input():
        return True
    producer = value.producer()
    return depth > 0 and producer is not None and op_name(producer) in _CASTS and (
        _from_input(producer.inputs[0], depth - 1))


def _graph_output_producers(reader: GraphReader) -> set[str]:
    if reader.kind == "fx":
        output = next(n for n in reader.graph.graph.nodes if n.op == "output")
        flat = torch.utils._pytree.tree_leaves(output.args)
        return {n.name for n in flat if isinstance(n, fx.Node)}
    names = set()
    for value in reader.graph.graph.outputs:
        producer = value.producer()
        if producer is not None:
            names.add(producer.name or producer.outputs[0].name)
    return names

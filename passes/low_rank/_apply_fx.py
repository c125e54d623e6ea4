"""FX side of ``factor-low-rank``: one aten product becomes two thin ones.

With ``W_nk ≈ A·B`` (``A`` ``[N, r]``, ``B`` ``[r, K]``), in the layout the product reads:

* ``aten.linear(x, W, b)`` → ``aten.linear(aten.linear(x, B), A, b)``;
* ``aten.addmm(b, x, W[K, N])`` → ``aten.addmm(b, aten.mm(x, Bᵀ), Aᵀ)`` (HF ``Conv1D`` and
  ``run_decompositions`` graphs);
* ``aten.mm``/``aten.matmul(x, W[K, N])`` → the same op twice, with ``Bᵀ`` then ``Aᵀ``.

The factors are new buffers ``<weight>.lowrank.b``/``.a`` (dots become underscores) in the
weight's dtype; nodes carry provenance and, when the old product had one, a ``meta["val"]``.
The old weight (and a ``t``/``permute`` in front of it) goes when nothing else reads it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import fx

from graphpress.graph.fx import add_tensor, get_tensor, mark

from .._linears import LinearSite
from .._rewrite import remove_dead_fx

__all__ = ["factor_fx"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
TAG = "lowrank"


def _fake_like(node: fx.Node | None, shape: tuple[int, ...]) -> object:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        try:
            return val.new_empty(shape)
        except Exception:  # symbolic shapes the fake mode cannot rebuild: leave it out
            return None
    return None


def factor_fx(gm: fx.GraphModule, site: LinearSite, a: np.ndarray, b: np.ndarray,
              pass_name: str) -> None:
    """Replace ``site``'s product by the two thin products of ``A`` ``[N, r]``, ``B`` ``[r, K]``."""
    graph, node = gm.graph, site.node
    dtype = get_tensor(gm, site.source).dtype
    rank = b.shape[0]
    index = site.weight_input_index()
    old_weight = node.args[index]
    reads_nk = site.layout == "linear"

    def const(role: str, array: np.ndarray) -> fx.Node:
        stored = np.ascontiguousarray(array if reads_nk else array.T, dtype=np.float32)
        attr = add_tensor(gm, f"{site.name}.{TAG}.{role}", torch.from_numpy(stored).to(dtype))
        made = mark(graph.get_attr(attr), pass_name)
        fake = _fake_like(site.source, tuple(stored.shape))
        if fake is not None:
            made.meta["val"] = fake
        return made

    x = node.args[1 if site.layout == "addmm" else 0]
    with graph.inserting_before(node):
        first_w, second_w = const("b", b), const("a", a)
        if site.layout == "linear":
            hidden = graph.call_function(_aten.linear.default, (x, first_w))
            bias = node.args[2] if len(node.args) > 2 else None
            new = graph.call_function(_aten.linear.default, (hidden, second_w, bias))
        elif site.layout == "addmm":
            hidden = graph.call_function(_aten.mm.default, (x, first_w))
            new = graph.call_function(_aten.addmm.default, (node.args[0], hidden, second_w))
        else:
            op = node.target
            hidden = graph.call_function(op, (x, first_w))
            new = graph.call_function(op, (hidden, second_w))
    for made in (hidden, new):
        mark(made, pass_name)
    x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if isinstance(x_val, torch.Tensor):
        fake = _fake_like(x, (*x_val.shape[:-1], rank))
        if fake is not None:
            hidden.meta["val"] = fake
    if "val" in node.meta:
        new.meta["val"] = node.meta["val"]
    for key in ("nn_module_stack", "stack_trace"):  # where the layer came from, for printing
        if key in node.meta:
            hidden.meta[key] = new.meta[key] = node.meta[key]
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    remove_dead_fx(gm, [old_weight])

"""Find the linear layers of a graph (FX or ONNX) and rebind their constant weights.

Every product ``y = x·Wᵀ`` with a constant 2-D float weight is a :class:`LinearSite` that sees
its weight as ``W_nk`` ``[N = out, K = in]`` whatever the storage, so low-rank factoring,
sparsity and pruning share one view:

* FX ``aten.linear(x, W[, b])``: ``W`` ``[N, K]`` (layout ``"linear"``);
  ``aten.addmm(b, x, W)`` / ``aten.mm(x, W)`` / ``aten.matmul(x, W)``: ``W`` ``[K, N]`` (layouts
  ``"addmm"``/``"mm"``/``"matmul"``; HF ``Conv1D`` stores it so, and ``run_decompositions``
  writes ``addmm(b, x, permute(E, [1, 0]))`` with ``E`` ``[N, K]``). The weight is a
  ``get_attr`` or ``aten.t``/``permute([1, 0])``/``transpose(0, 1)`` of one.
* ONNX ``MatMul(x, W)``: ``W`` ``[K, N]`` (``"matmul"``); ``Gemm(x, W[, C])`` with ``transA = 0``
  (``"gemm"``): ``W`` is ``[N, K]`` with ``transB = 1``, ``[K, N]`` otherwise. The weight is an
  initializer that is no graph input, a ``Constant``, or ``Transpose(perm=[1, 0])`` of one.

``LinearSite.name`` is the stable origin name of the stored constant (FX ``get_attr`` target,
ONNX value name). :func:`replace_weight` never modifies a tensor: it binds a new constant,
in the orientation the product reads (a ``Transpose``/``permute`` in between is dropped when
nothing else reads it), and drops the old constant when it became unused.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from torch import fx

from graphpress.graph import onnx as gonnx
from graphpress.graph.fx import add_tensor, get_tensor
from graphpress.graph.fx import mark as fx_mark
from graphpress.graph.kind import kind

from ._rewrite import drop_unused_constants, onnx_const, remove_dead_fx, remove_node_onnx

__all__ = ["LinearSite", "find_linears", "replace_weight"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_FX_KN = {_aten.addmm.default: ("addmm", 1, 2), _aten.mm.default: ("mm", 0, 1),
          _aten.matmul.default: ("matmul", 0, 1)}  # layout, x index, weight index


@dataclass(frozen=True, eq=False)
class LinearSite:
    """One product ``y = x·W_nkᵀ`` reading a constant weight.

    ``source`` is the stored constant (FX ``get_attr`` node, ONNX value), ``stored_nk`` whether
    it is stored ``[N, K]`` and ``via`` the transpose between it and the product, if any.
    """

    name: str
    node: object
    layout: str
    x: str
    shared: bool
    source: object = None
    stored_nk: bool = True
    via: object = None

    @property
    def reads_nk(self) -> bool:
        """Whether the product itself reads its weight input as ``[N, K]``."""
        if self.layout == "linear":
            return True
        if self.layout == "gemm":
            return bool(self.node.attributes.get_int("transB", 0))
        return False

    def weight_nk(self, graph) -> np.ndarray:
        """The float weight as ``[N, K]``: a fresh array the caller may modify."""
        if isinstance(self.source, fx.Node):
            tensor = get_tensor(graph, self.source).detach()
            array = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).cpu().numpy()
        else:
            array = onnx_const(self.source)
        return np.array(array if self.stored_nk else array.T, copy=True, order="C")

    def weight_input_index(self) -> int:
        return 2 if self.layout == "addmm" else 1


def find_linears(graph, *, exclude: tuple[str, ...] = ()) -> list[LinearSite]:
    """Every linear site of ``graph`` (FX GraphModule or ``onnx_ir.Model``) in graph order.

    ``exclude``: fnmatch patterns matched against the node name and the weight name.
    """
    sites = _find_fx(graph) if kind(graph) == "fx" else _find_onnx(graph)
    return [s for s in sites if not any(
        fnmatch.fnmatchcase(n, p) for p in exclude for n in (s.name, _node_name(s.node)))]


def _node_name(node) -> str:
    return node.name or ""


def _fx_weight(gm: fx.GraphModule, arg) -> tuple[fx.Node, bool, fx.Node | None] | None:
    """(get_attr, transposed?, transpose node) if ``arg`` is a 2-D float constant or the
    transpose of one."""
    if not isinstance(arg, fx.Node):
        return None
    via = None
    if arg.op == "call_function":
        swap = (arg.target is _aten.t.default or (
            arg.target is _aten.permute.default and list(arg.args[1]) == [1, 0]) or (
            arg.target is _aten.transpose.int and sorted(d % 2 for d in arg.args[1:3]) == [0, 1]))
        if not swap or not isinstance(arg.args[0], fx.Node):
            return None
        via, arg = arg, arg.args[0]
    tensor = get_tensor(gm, arg)
    if tensor is None or tensor.dim() != 2 or not tensor.is_floating_point():
        return None
    return arg, via is not None, via


def _find_fx(gm: fx.GraphModule) -> list[LinearSite]:
    found: list[tuple] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is _aten.linear.default and len(node.args) >= 2:
            layout, xi, wi = "linear", 0, 1
        elif node.target in _FX_KN and node.kwargs.get("beta", 1) == 1 and (
                node.kwargs.get("alpha", 1) == 1):
            layout, xi, wi = _FX_KN[node.target]
        else:
            continue
        if len(node.args) <= wi or not isinstance(node.args[xi], fx.Node):
            continue
        weight = _fx_weight(gm, node.args[wi])
        if weight is None or node.args[xi].op == "get_attr":
            continue
        source, transposed, via = weight
        # stored [N, K] iff (linear reads [N, K]) xor (a transpose sits in between)
        stored_nk = (layout == "linear") != transposed
        found.append((node, layout, source, stored_nk, via))
    sites = []
    for node, layout, source, stored_nk, via in found:
        shared = set(source.users) != {via or node} or (via is not None and set(via.users) != {node})
        sites.append(LinearSite(source.target, node, layout, node.args[1 if layout == "addmm" else 0]
                                .name, shared, source, stored_nk, via))
    return sites


def _onnx_weight(value: ir.Value | None) -> tuple[ir.Value, bool, ir.Value | None] | None:
    if value is None:
        return None
    tensor = None if value.is_graph_input() else value.const_value
    if tensor is not None:  # dtype and shape only: reading the data would load it
        ok = len(tensor.shape) == 2 and tensor.dtype.is_floating_point()
        return (value, False, None) if ok else None
    array = onnx_const(value)  # a Constant node
    if array is not None:
        ok = array.ndim == 2 and np.issubdtype(array.dtype, np.floating)
        return (value, False, None) if ok else None
    node = value.producer()
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    perm = node.attributes.get_ints("perm", None)
    inner = _onnx_weight(node.inputs[0])
    if inner is None or inner[2] is not None or (perm is not None and list(perm) != [1, 0]):
        return None
    return inner[0], True, value


def _find_onnx(model: ir.Model) -> list[LinearSite]:
    sites = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        if node.op_type == "MatMul":
            layout, reads_nk = "matmul", False
        elif node.op_type == "Gemm" and not node.attributes.get_int("transA", 0):
            layout, reads_nk = "gemm", bool(node.attributes.get_int("transB", 0))
        else:
            continue
        x = node.inputs[0]
        weight = _onnx_weight(node.inputs[1])
        if weight is None or x is None or onnx_const(x) is not None:
            continue
        source, transposed, via = weight
        stored_nk = reads_nk != transposed
        reader = via.producer() if via is not None else node
        shared = (source.is_graph_output() or {u.node for u in source.uses()} != {reader} or (
            via is not None and (via.is_graph_output() or {u.node for u in via.uses()} != {node})))
        name = source.name or node.name or "weight"
        sites.append(LinearSite(name, node, layout, x.name, shared, source, stored_nk, via))
    return sites


def replace_weight(graph, site: LinearSite, weight_nk: np.ndarray, pass_name: str,
                   tag: str) -> None:
    """Bind a new constant ``weight_nk`` (``[N, K]``) to ``site``'s product, named
    ``f"{site.name}.{tag}"`` in the orientation the product reads, marked with ``pass_name``.
    The old constant (and a transpose in between) is removed when nothing reads it any more.
    """
    array = np.asarray(weight_nk)
    stored = np.ascontiguousarray(array if site.reads_nk else array.T)
    index = site.weight_input_index()
    if isinstance(site.node, fx.Node):
        old = site.node.args[index]
        dtype = get_tensor(graph, site.source).dtype
        attr = add_tensor(graph, f"{site.name}.{tag}",
                          torch.from_numpy(stored.astype(np.float32, copy=False)).to(dtype))
        with graph.graph.inserting_before(site.node):
            new = fx_mark(graph.graph.get_attr(attr), pass_name)
        args = list(site.node.args)
        args[index] = new
        site.node.args = tuple(args)
        remove_dead_fx(graph, [old])
        graph.recompile()
        return
    dtype = onnx_const(site.source).dtype
    value = gonnx.add_initializer(graph.graph, f"{site.name}.{tag}", stored.astype(dtype),
                                  pass_name)
    site.node.replace_input_with(index, value)
    if site.via is not None and not site.via.uses() and not site.via.is_graph_output():
        remove_node_onnx(site.via.producer())
    drop_unused_constants([site.source])

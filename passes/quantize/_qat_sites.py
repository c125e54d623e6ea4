"""Where an FX graph is quantized: the sites :func:`graphpress.passes.quantize.qat.prepare_qat`
turns into fake quantization.

Three shapes, exactly as the quantization passes emit them:

* **affine weight** (``insert-qdq``, ``quantize-dynamic``): an integer ``get_attr`` read by
  ``quantized_decomposed.dequantize_per_channel(q, scales, zero_points|None, axis, qmin, qmax,
  dtype)`` or ``dequantize_per_tensor(q, scale, zero_point, qmin, qmax, dtype)``;
* **activation** (``insert-qdq``): ``dequantize_per_tensor(quantize_per_tensor(x, s, z, qmin,
  qmax, dtype), s, z, qmin, qmax, dtype)`` with Python scalars;
* **block** (``quantize-weights``, ``quantize-ternary``; ``_nbits_fx``): packed ``uint8`` codes
  ``[N, n_blocks·B·b/8]`` decoded by a chain of constant aten ops (``_to_copy``, ``8/b`` ×
  ``div``/``floor``/``mul``/``sub``, ``stack``, ``reshape [N, n_blocks, B]``, ``sub`` zero
  point, ``mul`` scales ``[N, n_blocks, 1]``, ``reshape``, optional ``slice [:, :K]`` and
  dtype cast). The chain is every ancestor of its *end*: the first decode node reachable from
  the codes that is read by another kind of node (the layers; an embedding of constant
  position ids is constant too, hence "kind").

``quantize-dynamic``'s activations (``aten.fake_quantize_per_tensor_affine`` with run-time
qparams) already have a straight-through gradient and are not sites.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 (registers quantized_decomposed ops)
from torch import fx

from graphpress.graph.fx import PROVENANCE, get_tensor

__all__ = ["AffineSite", "ActivationSite", "BlockSite", "find_sites"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_qd = torch.ops.quantized_decomposed
_DEQUANTIZE = (_qd.dequantize_per_channel.default, _qd.dequantize_per_tensor.default)
_CHAIN_OPS = {_aten._to_copy.default, _aten.div.Tensor, _aten.floor.default, _aten.mul.Tensor,
              _aten.sub.Tensor, _aten.stack.default, _aten.reshape.default, _aten.slice.Tensor}


@dataclass(frozen=True)
class AffineSite:
    """An integer weight ``codes`` read through the dequantize node ``node``."""

    node: fx.Node
    codes: fx.Node
    pass_name: str


@dataclass(frozen=True)
class ActivationSite:
    """A static activation Q/DQ pair: ``node`` dequantizes what ``quant`` quantized."""

    node: fx.Node
    quant: fx.Node
    pass_name: str


@dataclass(frozen=True)
class BlockSite:
    """A block-wise decode chain ending at ``end`` (the decoded ``[N, K]`` weight)."""

    end: fx.Node
    codes: fx.Node
    scales: fx.Node
    zero_points: fx.Node | None
    bits: int
    block_size: int
    k: int
    dtype: torch.dtype
    pass_name: str

    @property
    def ternary(self) -> bool:
        return self.pass_name == "quantize-ternary"


Site = AffineSite | ActivationSite | BlockSite


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every quantized weight and static activation of ``gm``, in graph order."""
    constant = _constant_nodes(gm)
    sites: list[Site] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _DEQUANTIZE:
            site = _dequantize_site(gm, node)
        elif node.op == "get_attr":
            site = _block_site(gm, node, constant)
        else:
            continue
        if site is not None:
            sites.append(site)
    return sites


def _pass_of(node: fx.Node, default: str) -> str:
    return node.meta.get(PROVENANCE) or default


def _dequantize_site(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    source = node.args[0]
    if not isinstance(source, fx.Node):
        return None
    if source.op == "get_attr":
        tensor = get_tensor(gm, source)
        if tensor is None or tensor.is_floating_point():
            return None
        return AffineSite(node, source, _pass_of(node, "insert-qdq"))
    if (node.target is _qd.dequantize_per_tensor.default and source.op == "call_function"
            and source.target is _qd.quantize_per_tensor.default):
        if tuple(source.args[1:]) != tuple(node.args[1:]) or len(source.users) != 1:
            logger.warning("prepare-qat: %s/%s is not a matching Q/DQ pair; left as it is",
                           source.name, node.name)
            return None
        return ActivationSite(node, source, _pass_of(node, "insert-qdq"))
    return None


def _constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on constants only (``get_attr`` and ops of them)."""
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
        elif node.op == "call_function" and node.all_input_nodes and all(
                i in constant for i in node.all_input_nodes) and not node.is_impure():
            constant.add(node)
    return constant


def _block_site(gm: fx.GraphModule, codes: fx.Node, constant: set[fx.Node]) -> BlockSite | None:
    tensor = get_tensor(gm, codes)
    if tensor is None or tensor.dtype != torch.uint8 or tensor.dim() != 2:
        return None
    if [u.target for u in codes.users] != [_aten._to_copy.default]:
        return None
    def decoding(n: fx.Node) -> bool:
        return n in constant and n.op == "call_function" and n.target in _CHAIN_OPS

    end, frontier = None, [codes]
    while frontier:  # the first decode node (from the codes) read by anything else: the
        node = frontier.pop(0)  # layers, or an embedding of constant ids (position ids)
        if any(not decoding(u) for u in node.users):
            end = node
            break
        frontier.extend(u for u in node.users if u not in frontier)
    if end is None or end is codes:
        return None
    chain = _ancestors(end)
    if any(n.op == "call_function" and n.target not in _CHAIN_OPS for n in chain):
        return None
    attrs = [n for n in chain if n.op == "get_attr"]
    tensors = {n: get_tensor(gm, n) for n in attrs}
    scales = [n for n, t in tensors.items() if t.is_floating_point() and t.dim() == 3]
    zeros = [n for n, t in tensors.items() if t.dtype == torch.uint8 and t.dim() == 3]
    stacks = [n for n in chain if n.target is _aten.stack.default]
    shapes = [n.args[1] for n in chain if n.target is _aten.reshape.default
              and len(n.args[1]) == 3]
    if len(scales) != 1 or len(zeros) > 1 or len(stacks) != 1 or len(shapes) != 1 or (
            len(attrs) != 2 + len(zeros)):
        logger.warning("prepare-qat: the decode chain of %s has an unknown shape; left as it "
                       "is", codes.name)
        return None
    bits = 8 // len(stacks[0].args[0])
    n, n_blocks, block = (int(v) for v in shapes[0])
    slices = [s for s in chain if s.target is _aten.slice.Tensor]
    k = int(slices[0].args[3]) if slices else n_blocks * block
    dtype = end.kwargs.get("dtype", torch.float32) if end.target is _aten._to_copy.default \
        else torch.float32
    # the decode ops keep their pass's mark even where a later pass (pruning, sharding)
    # rebound the codes
    ternary = any(n.meta.get(PROVENANCE) == "quantize-ternary" for n in chain)
    return BlockSite(end, codes, scales[0], zeros[0] if zeros else None, bits, block, k, dtype,
                     "quantize-ternary" if ternary else "quantize-weights")


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen, stack = {node}, [node]
    while stack:
        for i in stack.pop().all_input_nodes:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return [n for n in node.graph.nodes if n in seen]

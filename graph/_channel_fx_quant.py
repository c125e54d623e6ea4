"""Quantized aten FX layers in the channel view (see :mod:`._channel_view`).

* ``quantized_decomposed.dequantize_per_channel(q, scales, zero_points, axis, ...)`` and
  ``dequantize_per_tensor(q, ...)`` of a ``get_attr`` ``q`` (what ``insert-qdq`` and
  ``quantize-dynamic`` write for weights) are looked through: their readers see a
  :class:`Const` of ``q`` (``storage="int"``) with per-channel scales/zero points as companions.
* The activation fake-quantization ops (``quantize_per_tensor``/``dequantize_per_tensor`` of a
  value, ``aten.fake_quantize_per_tensor_affine``) are element-wise.
* ``aten.min(x)``/``aten.max(x)`` (a whole-tensor reduction: dynamic quantization's run-time
  range) are ``"range"`` ops.
* The decode chain of ``quantize-weights`` on FX (:func:`nbits_chain`: packed codes →
  ``_to_copy``/``div``/``floor``/``sub``/``mul`` → ``stack`` → ``reshape [N, blocks, B]`` →
  ``sub`` zero points → ``mul`` scales → ``reshape [N, blocks·B]`` [→ ``slice`` to ``K``]
  [→ ``_to_copy``]) is a :class:`Const` of the packed codes with the logical shape ``[N, K]``
  (``storage="nbits"``), read by the layer itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ._channel_view import Companion, Const
from .fx import get_tensor

__all__ = ["fx_dequantized", "fx_quant_op", "nbits_chain", "NBitsChain", "DEQUANTIZE"]

_aten = torch.ops.aten

DEQUANTIZE = {"quantized_decomposed.dequantize_per_channel",
              "quantized_decomposed.dequantize_per_tensor"}
_ACTIVATION = {"quantized_decomposed.quantize_per_tensor",
               "quantized_decomposed.dequantize_per_tensor",
               "aten.fake_quantize_per_tensor_affine"}
_CASTS = {_aten._to_copy.default, _aten.to.dtype}


def _get_attr(gm: fx.GraphModule, arg) -> torch.Tensor | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return get_tensor(gm, arg)
    return None


def fx_dequantized(gm: fx.GraphModule, node: fx.Node, name: str) -> Const | None:
    """A :class:`Const` of the integer codes ``node`` (a dequantize op named ``name``)
    dequantizes, or ``None`` (computed codes, an unknown layout)."""
    if name not in DEQUANTIZE or not node.args:
        return None
    codes = _get_attr(gm, node.args[0])
    if codes is None or codes.dim() == 0:
        return None
    rank, companions = codes.dim(), []
    if name.endswith("per_channel"):
        axis = int(node.args[3]) % rank
        for arg in node.args[1:3]:
            tensor = _get_attr(gm, arg)
            if arg is None:
                continue
            if tensor is None or tuple(tensor.shape) != (codes.shape[axis],):
                return None
            companions.append(Companion(arg.target, node.name, axis, 0))
    elif any(isinstance(a, fx.Node) and a.op != "get_attr" for a in node.args[1:3]):
        return None  # a computed per-tensor scale: still per tensor, but keep it simple
    return Const(node.args[0].target, node.name, tuple(codes.shape), tuple(range(rank)),
                 tuple(companions), "int")


@dataclass(frozen=True)
class NBitsChain:
    """The FX decode chain of one block-quantized weight (see the module docstring)."""

    codes: fx.Node  # get_attr uint8 [N, blocks·B·bits/8]
    scales: fx.Node  # get_attr [N, blocks, 1]
    zero_points: fx.Node | None  # get_attr [N, blocks, 1], or None (symmetric)
    blocks_view: fx.Node  # reshape(stack, [N, blocks, B])
    flat_view: fx.Node  # reshape(mul, [N, blocks·B])
    cut: fx.Node | None  # slice(flat, 1, 0, K) when K is not a multiple of B
    bits: int
    block: int
    n: int
    k: int


def _through_cast(arg):
    while isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in _CASTS:
        arg = arg.args[0]
    return arg


def nbits_chain(gm: fx.GraphModule, weight) -> NBitsChain | None:
    """The decode chain ending at ``weight`` (a layer's weight argument), or ``None``."""
    node = _through_cast(weight)
    cut = None
    if isinstance(node, fx.Node) and node.target is _aten.slice.Tensor:
        cut, node = node, node.args[0]
    if not isinstance(node, fx.Node) or node.target is not _aten.reshape.default:
        return None
    flat, mul = node, node.args[0]
    if not isinstance(mul, fx.Node) or mul.target is not _aten.mul.Tensor:
        return None
    centred, scales = mul.args
    if _get_attr(gm, scales) is None or not isinstance(centred, fx.Node) or (
            centred.target is not _aten.sub.Tensor):
        return None
    view, zero = centred.args
    zero = _through_cast(zero)
    zero_points = zero if isinstance(zero, fx.Node) else None
    if zero_points is not None and _get_attr(gm, zero_points) is None:
        return None
    if not isinstance(view, fx.Node) or view.target is not _aten.reshape.default:
        return None
    stack = view.args[0]
    if not isinstance(stack, fx.Node) or stack.target is not _aten.stack.default:
        return None
    codes = _codes(stack.args[0][0])
    tensor = _get_attr(gm, codes)
    if tensor is None or tensor.dtype != torch.uint8:
        return None
    n, blocks, block = (int(d) for d in view.args[1])
    bits = 8 // len(stack.args[0])
    k = int(cut.args[3]) if cut is not None else blocks * block
    if tuple(tensor.shape) != (n, blocks * block * bits // 8):
        return None
    return NBitsChain(codes, scales, zero_points, view, flat, cut, bits, block, n, k)


def _codes(part) -> fx.Node | None:
    """The packed codes under one decoded part: ``sub(floor(div(cast(codes), 2^i)), ...)``."""
    node = part
    for _ in range(4):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return node if isinstance(node, fx.Node) and node.op == "get_attr" else None
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "get_attr" else None


def fx_quant_op(node: fx.Node, name: str, ins) -> tuple[str, list, dict] | None:
    """The normalised op of an activation quantization or range node, or ``None``."""
    if name in _ACTIVATION and ins and isinstance(ins[0], str):
        return "unary", ins[:1], {}
    if node.target in (_aten.min.default, _aten.max.default) and isinstance(ins[0], str):
        return "range", ins[:1], {}
    return None

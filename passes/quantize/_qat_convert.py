"""``convert_qat``'s rebuild: each fake-quant site back to the nodes its quantization pass emits.

The integer codes and the effective scales are *evaluated from the prepared graph's own nodes*
(they depend on constants only: master weights, scales, zero points), so the converted graph
dequantizes exactly the values the prepared graph computed in its forward pass:

* affine weight → an integer buffer (the original attribute name) and the original
  ``dequantize_per_channel``/``dequantize_per_tensor`` call, with the learned scale (a new
  buffer, or a Python float per tensor) or the original scale attribute;
* activation → ``quantize_per_tensor`` + ``dequantize_per_tensor`` with the (learned) scale;
* block → :class:`BlockQuant` of the codes, scales and zero points, rebuilt by
  ``_nbits_fx._dequantize_nodes`` (the very emitter of ``quantize-weights``/``quantize-ternary``).

Every rebuilt node is marked with the original pass, as if that pass had written it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import fx

from graphpress.graph.fx import get_tensor

from ._blockwise import BlockQuant
from ._nbits_fx import _dequantize_nodes
from ._qat_emit import Builder
from ._qat_prepare import ActivationRecord, AffineRecord, BlockRecord

__all__ = ["rebuild", "evaluate"]

logger = logging.getLogger(__name__)

_qd = torch.ops.quantized_decomposed


@torch.no_grad()
def evaluate(gm: fx.GraphModule, node: fx.Node, cache: dict[fx.Node, Any]) -> Any:
    """The value of a node that depends on constants only."""
    if node in cache:
        return cache[node]
    if node.op == "get_attr":
        value = get_tensor(gm, node)
    elif node.op == "call_function":
        args = fx.node.map_arg(node.args, lambda n: evaluate(gm, n, cache))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: evaluate(gm, n, cache))
        value = node.target(*args, **kwargs)
    else:
        raise ValueError(f"{node.name} is not computed from constants")
    cache[node] = value.detach() if isinstance(value, torch.Tensor) else value
    return cache[node]


def rebuild(gm: fx.GraphModule, record: Any, nodes: dict[str, fx.Node],
            cache: dict[fx.Node, Any]) -> fx.Node:
    """The original pass's nodes for ``record`` (inserted at the graph's insertion point)."""
    b = Builder(gm, record.pass_name)
    if isinstance(record, AffineRecord):
        return _affine(b, record, nodes, cache)
    if isinstance(record, ActivationRecord):
        return _activation(b, record, nodes, cache)
    return _block(b, record, nodes, cache)


def _scale(gm, value: str | float, nodes, cache) -> Any:
    return value if isinstance(value, float) else evaluate(gm, nodes[value], cache)


def _affine(b: Builder, r: AffineRecord, nodes, cache) -> fx.Node:
    codes = evaluate(b.gm, nodes[r.codes], cache).to(r.codes_dtype)
    q = b.attribute(r.codes_attr, codes.contiguous(), parameter=False)
    if r.scale_attr is None:  # per tensor
        scale = _scale(b.gm, r.scale, nodes, cache)
        scale = float(scale) if isinstance(scale, torch.Tensor) else scale
        zero = r.zero_point
    else:
        scale = (b.attribute(r.scale_attr, evaluate(b.gm, nodes[r.scale], cache).reshape(-1)
                             .contiguous(), parameter=False) if r.learned
                 else b.graph.get_attr(r.scale))
        zero = None if r.zero_point is None else b.graph.get_attr(r.zero_point)
        for node in (scale, zero):
            if node is not None:
                node.meta["graphpress.pass"] = r.pass_name
    return b(r.op, q, scale, zero, *r.rest, **dict(r.kwargs))


def _activation(b: Builder, r: ActivationRecord, nodes, cache) -> fx.Node:
    scale = _scale(b.gm, r.scale, nodes, cache)
    scale = float(scale) if isinstance(scale, torch.Tensor) else scale
    args = (scale, r.zero_point, r.qmin, r.qmax, r.dtype)
    q = b(_qd.quantize_per_tensor.default, nodes[r.input], *args)
    return b(_qd.dequantize_per_tensor.default, q, *args)


def _block(b: Builder, r: BlockRecord, nodes, cache) -> fx.Node:
    codes = evaluate(b.gm, nodes[r.codes], cache)  # [N, n_blocks, B], integers as floats
    n, n_blocks, block = codes.shape
    scale = evaluate(b.gm, nodes[r.scale], cache).float().expand(n, n_blocks, 1)
    zeros = None if r.zero_points is None else _attribute(b.gm, r.zero_points)
    bq = BlockQuant(codes.reshape(n, n_blocks * block).to(torch.uint8).numpy(),
                    np.ascontiguousarray(scale[..., 0].numpy(), dtype=np.float32),
                    None if zeros is None else zeros[..., 0].numpy(), r.bits, block, r.k)
    return _dequantize_nodes(b.gm, r.origin, bq, r.dtype, r.pass_name)


def _attribute(gm: fx.GraphModule, target: str) -> torch.Tensor:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value

"""FX side of block-wise weight-only quantization: packed uint8 storage + aten dequantize ops.

A weight ``W_nk`` (``aten.linear`` weight ``[N, K]`` or ``aten.embedding`` table) is replaced by
buffers holding exactly what ONNX's ``MatMulNBits`` holds (codes packed low bits first
``uint8 [N, n_blocks·B·b/8]``, scales ``[N, n_blocks, 1]``, zero points ``uint8 [N, n_blocks, 1]``
unpacked when asymmetric) and a chain of aten ops computing ``Ŵ = (q − z)·s``:
cast, ``⌊p/2^(b·i)⌋ mod 2^b`` for ``i < 8/b`` (float ``div``/``floor``/``mul``/``sub``, exact for
bytes; the exporter mistypes uint8 bitwise ops), ``stack``, ``reshape [N, n_blocks, B]``,
``sub``, ``mul``, ``reshape [N, n_blocks·B]``, ``slice [:, :K]``. The layer then reads ``Ŵ``, so
the FX graph computes what ORT computes (up to float summation order). Exporting it with
``graphpress.export.to_onnx`` gives plain ONNX ops (``Cast``/``Div``/``Floor``/``Mul``/``Sub``/``Concat``/
``Reshape`` feeding ``MatMul``/``Gather``; the constant folder may fold small ones back to
float), not ``MatMulNBits``.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import fx

from graphpress.graph.fx import add_tensor, get_tensor, mark

from .._rewrite import remove_dead_fx, require_canonical
from ..base import PassResult
from ._blockwise import BlockQuant, pack, packed_bytes

__all__ = ["quantize_fx"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten


def quantize_fx(gm: fx.GraphModule, quantizer: Callable[[np.ndarray], BlockQuant],
                pass_name: str, *, embeddings: bool, exclude: tuple[str, ...]) -> PassResult:
    """Rewrite every eligible ``aten.linear``/``aten.embedding`` weight of ``gm``."""
    require_canonical(gm)
    sites: dict[str, list[tuple[fx.Node, int]]] = {}
    for node in gm.graph.nodes:
        if node.target is _aten.linear.default and len(node.args) >= 2:
            index = 1
        elif node.target is _aten.embedding.default and embeddings:
            index = 0
        else:
            continue
        weight = node.args[index]
        tensor = get_tensor(gm, weight) if isinstance(weight, fx.Node) else None
        if tensor is None or tensor.dim() != 2 or not tensor.is_floating_point():
            continue
        if any(fnmatch.fnmatchcase(n, p) for p in exclude for n in (node.name, weight.target)):
            continue
        sites.setdefault(weight.target, []).append((node, index))
    stats = {"weights_quantized": 0, "embeddings_quantized": 0, "skipped_small": 0,
             "shared_weights": 0, "weight_bytes_before": 0, "weight_bytes_after": 0}
    stale = []
    for target, uses in sites.items():
        weight = uses[0][0].args[uses[0][1]]
        tensor = get_tensor(gm, weight).detach()
        w = tensor.float().numpy()
        n, k = w.shape
        bq = quantizer(w)
        after = packed_bytes(n, k, bq.bits, bq.block_size, bq.zero_points is None,
                             tensor.element_size())
        if k < 16 or after >= tensor.numel() * tensor.element_size():
            stats["skipped_small"] += 1
            continue
        if set(weight.users) - {node for node, _ in uses}:  # read elsewhere: stays float, shared
            stats["skipped_shared_float"] = stats.get("skipped_shared_float", 0) + 1
            continue
        with gm.graph.inserting_before(uses[0][0]):
            deq = _dequantize_nodes(gm, target, bq, tensor.dtype, pass_name)
        for node, index in uses:
            args = list(node.args)
            args[index] = deq
            node.args = tuple(args)
            stats["embeddings_quantized" if index == 0 else "weights_quantized"] += 1
        stats["shared_weights"] += len(uses) > 1
        stats["weight_bytes_before"] += tensor.numel() * tensor.element_size()
        stats["weight_bytes_after"] += after
        stale.append(weight)
    remove_dead_fx(gm, stale)
    modified = stats["weights_quantized"] + stats["embeddings_quantized"] > 0
    stats["weights_quantized"] += stats["embeddings_quantized"]
    stats["weight_ratio"] = stats["weight_bytes_before"] / max(stats["weight_bytes_after"], 1)
    if modified:
        gm.recompile()
    return PassResult(gm, modified, stats)


def _dequantize_nodes(gm: fx.GraphModule, origin: str, bq: BlockQuant, dtype: torch.dtype,
                      pass_name: str) -> fx.Node:
    graph = gm.graph
    n, n_blocks = bq.scales.shape
    tag = pass_name.split("-")[-1]

    def call(op, *args) -> fx.Node:
        return mark(graph.call_function(op, args), pass_name)

    def buffer(role: str, array: np.ndarray) -> fx.Node:
        name = add_tensor(gm, f"{origin}.{tag}.{role}", torch.from_numpy(np.ascontiguousarray(array)))
        return mark(graph.get_attr(name), pass_name)

    codes = buffer("codes", pack(bq.q, bq.bits, bq.block_size).reshape(n, -1))
    scales = buffer("scales", bq.scales.astype(np.float32)[..., None])
    packed = mark(graph.call_function(_aten._to_copy.default, (codes,), {"dtype": torch.float32}),
                  pass_name)
    parts = []
    for i in range(8 // bq.bits):  # code_i = ⌊p/2^(b·i)⌋ mod 2^b, exact in float32
        shifted = call(_aten.floor.default, call(_aten.div.Tensor, packed, float(1 << (bq.bits * i))))
        high = call(_aten.floor.default, call(_aten.div.Tensor, shifted, float(1 << bq.bits)))
        parts.append(call(_aten.sub.Tensor, shifted, call(_aten.mul.Tensor, high,
                                                          float(1 << bq.bits))))
    values = call(_aten.reshape.default, call(_aten.stack.default, parts, -1),
                  [n, n_blocks, bq.block_size])
    if bq.zero_points is None:
        centred = call(_aten.sub.Tensor, values, float(1 << (bq.bits - 1)))
    else:
        zp = buffer("zero_points", bq.zero_points[..., None])
        zp = mark(graph.call_function(_aten._to_copy.default, (zp,), {"dtype": torch.float32}),
                  pass_name)
        centred = call(_aten.sub.Tensor, values, zp)
    w = call(_aten.reshape.default, call(_aten.mul.Tensor, centred, scales),
             [n, n_blocks * bq.block_size])
    if n_blocks * bq.block_size != bq.k:
        w = call(_aten.slice.Tensor, w, 1, 0, bq.k)
    if dtype != torch.float32:
        w = mark(graph.call_function(_aten._to_copy.default, (w,), {"dtype": dtype}), pass_name)
    return w

"""FX side of block-wise weight-only quantization: packed uint8 storage + aten dequantize ops.

A weight ``W_nk`` (``aten.linear`` weight ``[N, K]`` or ``aten.embedding`` table) is replaced by
buffers holding exactly what ONNX's ``MatMulNBits`` holds (codes packed low bits first
``uint8 [N, n_blocks·B·b/8]``, scales ``[N, n_blocks, 1]``, zero points ``uint8 [N, n_blocks, 1]``
unpacked when asymmetric) and a chain of aten ops computing ``Ŵ = (q − z)·s``:
cast, ``⌊p/2^(b·i)⌋ mod 2^b`` for ``i < 8/b`` (float ``div``/``floor``/``mul``/``sub``, exact for
bytes; the exporter mistypes uint8 bitwise ops), ``stack``, ``reshape [N, n_blocks, B]``,
``sub``, ``mul``, ``reshape [N, n_blocks·B]``, ``slice [:, :K]``. The layer then reads ``Ŵ``, so
the FX graph computes what ORT computes (up to float summation order). ``graphpress.export.to_onnx``
exports each quantized linear as one ``com.microsoft.MatMulNBits`` reading these buffers
(``export/_nbits.py`` recognises the chain and checks it decodes to the same weight); an
embedding table's chain, or any export with ``matmul_nbits=False``, stays plain ONNX ops
(``Cast``/``Div``/``Floor``/``Mul``/``Sub``/``Concat``/``Reshape`` feeding ``Gather``/``MatMul``).

Calibrated codes follow the ONNX path (``weights.quantize_sites``) site for site: the input
statistics of a linear are those of its activation node ``x`` (``aten.linear(x, W, b)``);
GPTQ gets them through the ``quantizer``; AWQ gives the layers reading one ``x`` a shared
scale ``s``, a new buffer ``1/s`` and one ``aten.mul(x, 1/s)`` feeding them, and codes of
``W·diag(s)``, so ``y = (x/s)·Q(W·diag(s))ᵀ``.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx

from graphpress.graph.fx import add_tensor, get_tensor, mark

from .._rewrite import remove_dead_fx, require_canonical
from ..base import PassResult
from ._blockwise import BlockQuant, quantize_rtn
from ._gptq import InputStats, awq_scales, output_error
from ._packing import packed_bytes

__all__ = ["FxSite", "find_fx_sites", "quantize_fx_sites", "quantize_fx"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten

#: ``quantizer(W_nk, input statistics or None) -> BlockQuant``
Quantizer = Callable[[np.ndarray, "InputStats | None"], BlockQuant]


@dataclass(frozen=True)
class FxSite:
    """One use of a constant weight: ``node`` reads ``node.args[index]`` as ``W_nk``."""

    node: fx.Node
    op: str  # "linear" or "gather" (aten.embedding), as the ONNX sites name a table read
    index: int  # 1: aten.linear(x, W, b); 0: aten.embedding(E, ids)
    weight: fx.Node  # the get_attr node read (as found, before any rewrite)
    x: fx.Node  # the activation of a linear (its calibration target) or an embedding's ids

    @property
    def key(self) -> str:
        return self.weight.target


def find_fx_sites(gm: fx.GraphModule, *, embeddings: bool, exclude: tuple[str, ...]
                  ) -> list[FxSite]:
    """Every ``aten.linear``/``aten.embedding`` of ``gm`` reading a 2-D float constant."""
    require_canonical(gm)
    sites = []
    for node in gm.graph.nodes:
        if node.target is _aten.linear.default and len(node.args) >= 2:
            op, index = "linear", 1
        elif node.target is _aten.embedding.default and embeddings and len(node.args) >= 2:
            op, index = "gather", 0
        else:
            continue
        weight, x = node.args[index], node.args[1 - index]
        tensor = get_tensor(gm, weight) if isinstance(weight, fx.Node) else None
        if tensor is None or tensor.dim() != 2 or not tensor.is_floating_point():
            continue
        if not isinstance(x, fx.Node):
            continue
        if any(fnmatch.fnmatchcase(n, p) for p in exclude for n in (node.name, weight.target)):
            continue
        sites.append(FxSite(node, op, index, weight, x))
    return sites


def quantize_fx(gm: fx.GraphModule, quantizer: Callable[[np.ndarray], BlockQuant],
                pass_name: str, *, embeddings: bool, exclude: tuple[str, ...]) -> PassResult:
    """Rewrite every eligible weight of ``gm`` with uncalibrated codes ``quantizer(W_nk)``."""
    sites = find_fx_sites(gm, embeddings=embeddings, exclude=exclude)
    stats = quantize_fx_sites(gm, sites, lambda w, _: quantizer(w), pass_name, {})
    return PassResult(gm, stats["weights_quantized"] > 0, stats)


def quantize_fx_sites(gm: fx.GraphModule, sites: list[FxSite], quantizer: Quantizer,
                      pass_name: str, plan: dict[str, Any], *,
                      layout: tuple[int, int, bool] | None = None) -> dict[str, float]:
    """Quantize ``sites`` (grouped by weight) and rewrite them; return the stats.

    ``plan`` is ``QuantizeWeights._plan``'s: ``{"stats": {x name: InputStats}, "awq": bool}``
    or empty; ``layout`` ``(bits, block_size, symmetric)`` lets the size rule run before the
    codes are computed and is required with a plan (AWQ and the RTN reference error need it).
    """

    if plan and layout is None:
        raise ValueError("quantize_fx_sites: a calibrated plan needs layout=(bits, block, sym)")
    groups: dict[str, list[FxSite]] = {}
    for site in sites:
        groups.setdefault(site.key, []).append(site)
    found: dict[str, InputStats] = plan.get("stats", {})
    stats = {"weights_quantized": 0, "embeddings_quantized": 0, "skipped_small": 0,
             "skipped_shared_float": 0,
             "shared_weights": 0, "weight_bytes_before": 0, "weight_bytes_after": 0}
    todo: list[tuple[list[FxSite], torch.Tensor, np.ndarray]] = []
    for group in groups.values():
        tensor = get_tensor(gm, group[0].weight).detach()
        n, k = tensor.shape
        nbytes = tensor.numel() * tensor.element_size()
        if k < 16 or (layout is not None and
                      packed_bytes(n, k, *layout, tensor.element_size()) >= nbytes):
            stats["skipped_small"] += 1  # Rule 5: never bigger
            continue
        readers = {user for site in group for user in site.weight.users}
        if readers - {site.node for site in group}:  # Rule 5: read elsewhere, stays float
            stats["skipped_shared_float"] += 1
            continue
        todo.append((group, tensor, tensor.float().numpy()))
    scaled = _awq(gm, todo, found, layout, pass_name, stats) if plan.get("awq") else {}
    errors, rtn_errors, stale = [], [], []
    for group, tensor, w in todo:
        x_stats = found.get(group[0].x.name) if len(group) == 1 else None
        scale = scaled.get(group[0].node)
        if scale is not None:  # Rule 4 (awq): W·diag(s) by RTN, x/s by the new mul
            bq = quantize_rtn(w * scale[0][None, :], *layout)
        else:
            bq = quantizer(w, x_stats)
        after = packed_bytes(*w.shape, bq.bits, bq.block_size, bq.zero_points is None,
                             tensor.element_size())
        if after >= tensor.numel() * tensor.element_size():  # only without a layout
            stats["skipped_small"] += 1
            continue
        if x_stats is not None and x_stats.sample:
            errors.append(output_error(x_stats, w, bq, None if scale is None else scale[0]))
            rtn_errors.append(output_error(x_stats, w, quantize_rtn(w, *layout), None))
        with gm.graph.inserting_before(group[0].node):
            deq = _dequantize_nodes(gm, group[0].key, bq, tensor.dtype, pass_name)
        for site in group:  # Rules 1-3
            args = list(site.node.args)
            args[site.index] = deq
            if scale is not None:
                args[0] = scale[1]
            site.node.args = tuple(args)
            stats["embeddings_quantized" if site.op == "gather" else "weights_quantized"] += 1
        stats["shared_weights"] += len(group) > 1
        stats["weight_bytes_before"] += tensor.numel() * tensor.element_size()
        stats["weight_bytes_after"] += after
        stale.extend(dict.fromkeys(site.weight for site in group))
    remove_dead_fx(gm, stale)
    if errors:
        stats["output_error_mean"] = float(np.mean(errors))
        stats["rtn_output_error_mean"] = float(np.mean(rtn_errors))
    stats["weight_ratio"] = stats["weight_bytes_before"] / max(stats["weight_bytes_after"], 1)
    stats["weights_quantized"] += stats["embeddings_quantized"]
    if stats["weights_quantized"]:
        gm.recompile()
    return stats


def _awq(gm, todo, found, layout, pass_name, stats) -> dict[fx.Node, tuple[np.ndarray, fx.Node]]:
    """Rule 4 (awq): one scale per input node, shared by its unshared linear sites."""
    by_input: dict[fx.Node, list[tuple[FxSite, torch.Tensor, np.ndarray]]] = {}
    for group, tensor, w in todo:
        site = group[0]
        if len(group) == 1 and site.op == "linear" and site.x.name in found:
            by_input.setdefault(site.x, []).append((site, tensor, w))
    scaled, alphas = {}, []
    for x, members in by_input.items():
        s, alpha, _ = awq_scales([w for *_, w in members], found[x.name], *layout)
        alphas.append(alpha)
        if alpha == 0.0:
            continue  # plain RTN is best: no mul
        inv = torch.from_numpy(1.0 / s).to(members[0][1].dtype)
        with gm.graph.inserting_before(members[0][0].node):  # sites come in graph order
            attr = mark(gm.graph.get_attr(add_tensor(gm, f"{x.name}.awq.inv_scale", inv)),
                        pass_name)
            mul = mark(gm.graph.create_node("call_function", _aten.mul.Tensor, (x, attr),
                                            name=f"{x.name}_awq_mul"), pass_name)
        for site, *_ in members:
            scaled[site.node] = (s, mul)
    stats["awq_alpha_mean"] = float(np.mean(alphas)) if alphas else 0.0
    return scaled


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

    codes = buffer("codes", bq.packed().reshape(n, -1))
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

"""quantize-weights: block-wise weight-only quantization (8/4/2 bits) to ORT's ``MatMulNBits``.

Every constant weight ``W_nk`` ``[N, K]`` of a linear layer (and of an embedding table) is cut
into blocks of ``block_size`` along ``K`` (the last block zero-padded, so any ``K`` works) with a
scale and, if asymmetric, a zero point per block; ``Ŵ = (q − z)·s``
(math: ``_blockwise``; packing: ``_packing``). The codes come from round-to-nearest with an MSE-optimal
clip (``rtn``), from GPTQ with act-order on the Hessian ``H = 2XᵀX/n`` of the layer's
calibration inputs (``gptq``), or from an AWQ-style activation-aware scaling ``x/s``,
``W·diag(s)`` (``awq``; math: ``_gptq``). ``clip_search=false`` gives plain round-to-nearest
(about twice as fast, slightly less accurate). A weight is quantized only where its packed form is
smaller than the float tensor, so the model never grows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from graphpress.graph.errors import PassSpecError

from .._collect import collect
from .._rewrite import drop_unused_constants, remove_node_onnx, value_names
from ..base import Pass, PassResult
from ..registry import register
from ._blockwise import BlockQuant, fp16_exact, quantize_rtn
from ._gptq import InputStats, awq_scales, gptq, output_error
from ._nbits_onnx import MS, Packed, Site, find_sites, rewrite_site
from ._packing import packed_bytes

__all__ = ["QuantizeWeights", "quantize_sites"]

logger = logging.getLogger(__name__)


@register
@dataclass(frozen=True)
class QuantizeWeights(Pass):
    """Quantize linear and embedding weights block-wise to 8/4/2 bits (weight-only).

    **Rules**
      1. ONNX ``MatMul(x, W)`` / ``Gemm(x, W[, C])`` with a constant 2-D float ``W`` (also
         ``Transpose(E)``) → ``com.microsoft::MatMulNBits(x, B, scales[, zero_points])``
         (``+ Add(C·beta)`` for a Gemm bias); FX ``aten.linear(x, W, b)`` → ``linear`` of a
         dequantized weight computed from packed uint8 storage.
      2. With ``embeddings``: ONNX ``Gather(E, ids)`` (axis 0, constant 2-D ``E``) →
         ``com.microsoft::GatherBlockQuantized`` (+ ``Slice`` when ``K`` is not a multiple of
         the block); FX ``aten.embedding(E, ids)`` → the same on gathered rows.
      3. A constant used by several sites (tied embedding/LM head) is quantized once (RTN) and
         its packed tensors are shared.
      4. ``gptq``: codes by GPTQ (act-order optional) on each layer's calibration Hessian
         (the statistics of its input: ONNX value ``x`` / FX node ``x`` of ``linear(x, W)``);
         ``awq``: layers reading the same input share one scale ``s`` and one new
         ``Mul(x, 1/s)`` (FX: ``aten.mul`` by a new ``1/s`` buffer). Shared weights fall back
         to Rule 3.
      5. Skipped: names matching ``exclude`` (fnmatch, node or weight name), ``K < 16``,
         weights whose packed form is not smaller than the float tensor, and weights also read
         by a node that is not quantized (a tied table whose other use stays float): the
         float tensor stays and stays shared, so the model never grows.

    **Requires** calibration batches for ``gptq``/``awq``, on FX and ONNX alike; ``auto`` (the
    default) runs GPTQ when calibration batches are given (best quality in the benchmark:
    cosine 0.989 vs 0.974 for RTN on all-MiniLM-L6-v2 at 4-bit, block 32) and RTN otherwise.
    **Ensures** the graph interface is unchanged.
    """

    name: ClassVar[str] = "quantize-weights"
    bits: int = 4
    block_size: int = 32
    algorithm: Literal["auto", "rtn", "gptq", "awq"] = "auto"
    symmetric: bool = False
    embeddings: bool = True
    act_order: bool = True
    clip_search: bool = True
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise PassSpecError(f"quantize-weights: bits={self.bits} must be 2, 4 or 8")
        b = self.block_size
        if b < 16 or b > 256 or b & (b - 1):
            raise PassSpecError(
                f"quantize-weights: block_size={b} must be a power of two in 16..256")

    accepts_calibration: ClassVar[bool] = True  # auto: GPTQ with batches, RTN without

    @property
    def needs_calibration(self) -> bool:  # overrides the ClassVar: only GPTQ/AWQ need data
        return self.algorithm in ("gptq", "awq")

    def resolved(self, calibration: Any) -> QuantizeWeights:
        """This pass with ``auto`` replaced by the algorithm it runs (GPTQ iff batches)."""
        if self.algorithm != "auto":
            return self
        return replace(self, algorithm="gptq" if calibration is not None else "rtn")

    def run_onnx(self, model: ir.Model, calibration: Any = None) -> PassResult:
        if self.algorithm == "auto":
            return self.resolved(calibration).run_onnx(model, calibration)
        start = time.perf_counter()
        sites = find_sites(model, embeddings=self.embeddings, exclude=self.exclude)
        stats = quantize_sites(model, sites, self._quantizer, self.name, "wq", self._plan(
            model, sites, calibration), bits=self.bits, block_size=self.block_size,
            symmetric=self.symmetric)
        stats["seconds"] = time.perf_counter() - start
        stats["gptq"] = float(self.algorithm == "gptq")
        return PassResult(model, stats["weights_quantized"] > 0, stats)

    def run_fx(self, gm, calibration: Any = None) -> PassResult:
        from ._nbits_fx import find_fx_sites, quantize_fx_sites

        if self.algorithm == "auto":
            return self.resolved(calibration).run_fx(gm, calibration)
        start = time.perf_counter()
        sites = find_fx_sites(gm, embeddings=self.embeddings, exclude=self.exclude)
        stats = quantize_fx_sites(gm, sites, self._quantizer, self.name, self._plan(
            gm, sites, calibration), layout=(self.bits, self.block_size, self.symmetric))
        stats["seconds"] = time.perf_counter() - start
        stats["gptq"] = float(self.algorithm == "gptq")
        return PassResult(gm, stats["weights_quantized"] > 0, stats)

    def _quantizer(self, w: np.ndarray, stats: InputStats | None) -> BlockQuant:
        if self.algorithm == "gptq" and stats is not None:
            return gptq(w, stats.hessian, self.bits, self.block_size, self.symmetric,
                        act_order=self.act_order)
        return quantize_rtn(w, self.bits, self.block_size, self.symmetric, self.clip_search)

    def _plan(self, graph: Any, sites: list, calibration: Any) -> dict[str, Any]:
        """Calibration statistics per activation name for the unshared linear sites (ONNX
        ``Site`` or FX ``FxSite``: ``key``, ``op``, ``x.name``; ``graph`` of either kind)."""
        if self.algorithm == "rtn":
            return {}
        uses: dict[tuple, int] = {}
        for site in sites:
            uses[site.key] = uses.get(site.key, 0) + 1
        names = sorted({s.x.name for s in sites if s.op != "gather" and uses[s.key] == 1})
        found: dict[str, InputStats] = {}

        def consume(name: str, array: np.ndarray) -> None:
            if name not in found:
                found[name] = InputStats(array.shape[-1], need_hessian=self.algorithm == "gptq")
            found[name].update(array)

        if names:
            collect(graph, calibration, names, consume)
        return {"stats": found, "awq": self.algorithm == "awq"}


def quantize_sites(model: ir.Model, sites: list[Site], quantizer: Callable, pass_name: str,
                   tag: str, plan: dict[str, Any], *, bits: int, block_size: int,
                   symmetric: bool) -> dict[str, float]:
    """Quantize ``sites`` (grouped by weight) and rewrite them; return the stats."""
    graph, taken = model.graph, value_names(model)
    groups: dict[tuple, list[Site]] = {}
    for site in sites:
        groups.setdefault(site.key, []).append(site)
    found: dict[str, InputStats] = plan.get("stats", {})
    stats = {"weights_quantized": 0, "embeddings_quantized": 0, "skipped_small": 0,
             "skipped_shared_float": 0,
             "shared_weights": 0, "weight_bytes_before": 0, "weight_bytes_after": 0}
    todo: list[tuple[list[Site], np.ndarray]] = []
    for group in groups.values():
        w = group[0].weight()
        n, k = w.shape
        after = packed_bytes(n, k, bits, block_size, symmetric, w.dtype.itemsize)
        if k < 16 or after >= w.nbytes:  # Rule 5: never bigger
            stats["skipped_small"] += 1
            continue
        if _read_elsewhere(group):  # Rule 5: the float tensor stays, a copy would add bytes
            stats["skipped_shared_float"] += 1
            continue
        stats["weight_bytes_before"] += w.nbytes
        stats["weight_bytes_after"] += after
        stats["shared_weights"] += len(group) > 1
        todo.append((group, w))
    scaled = _awq(graph, todo, found, bits, block_size, symmetric, pass_name, taken,
                  stats) if plan.get("awq") else {}
    errors, rtn_errors = [], []
    for group, w in todo:
        x_stats = found.get(group[0].x.name) if len(group) == 1 else None
        scale = scaled.get(id(group[0].node))
        if scale is not None:  # Rule 4 (awq): W·diag(s) by RTN, x/s by the new Mul
            bq = quantize_rtn(w * scale[0][None, :], bits, block_size, symmetric)
        else:
            bq = quantizer(w, x_stats)
        if x_stats is not None and x_stats.sample:
            errors.append(output_error(x_stats, w, bq, None if scale is None else scale[0]))
            rtn_errors.append(output_error(x_stats, w, quantize_rtn(w, bits, block_size,
                                                                     symmetric), None))
        # scales chosen as float16 values are stored as float16 (Cast back where needed)
        packed = Packed(bq, np.dtype(np.float16) if fp16_exact(bq.scales) else w.dtype, w.dtype)
        for site in group:  # Rules 1-3
            x = scale[1] if scale is not None else site.node.inputs[1 if site.op == "gather" else 0]
            rewrite_site(graph, site, packed, x, pass_name, tag, taken)
            stats["embeddings_quantized" if site.op == "gather" else "weights_quantized"] += 1
    for group, _ in todo:
        for site in group:
            for value in site.extra:  # a Transpose nobody reads any more
                producer = value.producer()
                if producer is not None and not value.uses() and not value.is_graph_output():
                    remove_node_onnx(producer)
        drop_unused_constants([group[0].source])
    if todo:
        model.opset_imports.setdefault(MS, 1)
    if errors:
        stats["output_error_mean"] = float(np.mean(errors))
        stats["rtn_output_error_mean"] = float(np.mean(rtn_errors))
    stats["weight_ratio"] = stats["weight_bytes_before"] / max(stats["weight_bytes_after"], 1)
    stats["weights_quantized"] += stats["embeddings_quantized"]
    return stats


def _read_elsewhere(group: list[Site]) -> bool:
    """Whether the weight of ``group`` is also read by a node that is not one of its sites
    (e.g. a tied table whose ``Gather`` is not quantized), or is a graph output."""
    source = group[0].source
    mine = {id(site.node) for site in group}
    mine |= {id(v.producer()) for site in group for v in site.extra if v.producer() is not None}
    extra = [v for site in group for v in site.extra]
    sites = {id(site.node) for site in group}
    return (source.is_graph_output() or any(id(use.node) not in mine for use in source.uses())
            or any(v.is_graph_output() or any(id(u.node) not in sites for u in v.uses())
                   for v in extra))


def _awq(graph, todo, found, bits, block_size, symmetric, pass_name, taken, stats):
    """Rule 4 (awq): one scale per input shared by its unshared linear sites."""
    from graphpress.graph.onnx import add_initializer, mark, unique_name

    by_input: dict[str, list[tuple[Site, np.ndarray]]] = {}
    for group, w in todo:
        if len(group) == 1 and group[0].op != "gather" and group[0].x.name in found:
            by_input.setdefault(group[0].x.name, []).append((group[0], w))
    scaled, alphas = {}, []
    for name, members in by_input.items():
        s, alpha, _ = awq_scales([w for _, w in members], found[name], bits, block_size, symmetric)
        alphas.append(alpha)
        if alpha == 0.0:
            continue  # plain RTN is best: no Mul
        x = members[0][0].x
        inv = add_initializer(graph, f"{name}.awq.inv_scale", (1.0 / s).astype(
            members[0][1].dtype), pass_name, taken)
        out = ir.Value(name=unique_name(graph, f"{name}.awq.scaled", taken), type=x.type,
                       shape=x.shape)
        node = mark(ir.node("Mul", [x, inv], outputs=[out],
                            name=unique_name(graph, f"{name}.awq.mul", taken)), pass_name)
        graph.insert_before(members[0][0].node, node)
        for site, _ in members:
            scaled[id(site.node)] = (s, out)
    stats["awq_alpha_mean"] = float(np.mean(alphas)) if alphas else 0.0
    return scaled

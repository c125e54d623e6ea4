"""quantize-dynamic: int8 weights, activations quantized at run time by ONNX Runtime.

A constant float weight ``W`` (K×N, the right operand of ``MatMul``/``Gemm``) becomes int8
per output column ``n`` (or per tensor):

* symmetric: ``s_n = max_k |W_kn| / 127``, ``q = clip(round(W / s), -127, 127)``, zero point 0;
* asymmetric: ``s_n = (max(W_:n, 0) - min(W_:n, 0)) / 255``,
  ``z_n = clip(round(-128 - min(W_:n, 0) / s_n), -128, 127)``, ``q = clip(round(W/s) + z)``.

ORT's fused ``com.microsoft::DynamicQuantizeMatMul(A, q, s, z, bias)`` quantizes ``A`` to uint8
per tensor on every call (``a = round(A / s_A) + z_A`` with the range of ``A`` widened to
contain 0), multiplies in integers and rescales: ``Y ≈ s_A·s_n·Σ_k (a - z_A)(q_kn - z_n) + b_n``.
One fused node is faster than the ``DynamicQuantizeLinear``/``MatMulInteger``/``Cast``/``Mul``
chain (no int32 tensor materialised, bias added in the same pass over Y).

Block-wise (``block_size = B > 0``): each column is cut into blocks of B rows of
``W`` (K padded with zeros to a multiple of B) and each block gets its own symmetric (or
asymmetric) int8 scale, stored as ``com.microsoft::MatMulNBits`` with ``bits = 8`` and
``accuracy_level = 4``: ORT then quantizes ``A`` at run time to int8 *per row and block*
(``s = max_k |A_mk| / 127`` over each block of B columns of A) and multiplies in int8. The
activation scale follows each token instead of the whole tensor, so outlier tokens or channels
no longer flatten everyone else's precision. On all-MiniLM-L6-v2 (B = 128) the embedding cosine
vs fp32 rises from 0.993 to 0.999 at 1 + 4/B bytes per weight, but ORT 1.31's CPU kernel ran
the whole model no faster than fp32, so the default is the per-channel form (``block_size=0``).

Embedding tables (``Gather`` of a constant float K×D table on axis 0) become int8 per row
``v`` (``s_v = max_d |E_vd| / 127``); the rows are gathered first and dequantized after
(``Cast(Gather(q, ids)) · Gather(s, ids)``), so only the looked-up rows are ever float.

On aten FX graphs (``_dynamic_fx``) the same int8 weights are dequantized in the graph and the
activation is fake-quantized with the run-time qparams above, so the FX graph simulates ORT's
dynamic int8 arithmetic and exports to ``QuantizeLinear``/``DequantizeLinear`` (not fused ops).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from graphpress.graph.errors import PassSpecError, PostconditionError, PreconditionError

from .._rewrite import drop_unused_constants, onnx_const, value_names
from ..base import Pass, PassResult
from ..registry import register

__all__ = ["QuantizeDynamic", "quantize_int8"]

logger = logging.getLogger(__name__)

MS = "com.microsoft"


def quantize_blocks(w: np.ndarray, block: int, *, symmetric: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits (bits=8) layout of ``w`` (K×N): ``(q uint8 [N, K/B, B], scale [N·K/B],
    zero uint8 [N·K/B] or None for the symmetric default 128)``, K zero-padded to B·⌈K/B⌉."""
    k, n = w.shape
    blocks = -(-k // block)
    wt = np.zeros((n, blocks * block), dtype=np.float32)
    wt[:, :k] = np.asarray(w, dtype=np.float32).T
    q, scale, zero = quantize_int8(wt.reshape(n * blocks, block), axis=0, symmetric=symmetric)
    q = (q.astype(np.int16) + 128).astype(np.uint8).reshape(n, blocks, block)
    return q, scale, None if zero is None else (zero.astype(np.int16) + 128).astype(np.uint8)


def quantize_int8(w: np.ndarray, *, axis: int | None, symmetric: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(q, scale, zero_point)`` of ``w`` in int8, per slice along ``axis`` (None: per tensor);
    ``scale`` and ``zero_point`` have the shape of that axis (``()`` per tensor)."""
    w64 = np.asarray(w, dtype=np.float64)
    reduce = None if axis is None else tuple(i for i in range(w64.ndim) if i != axis % w64.ndim)
    lo = np.minimum(w64.min(axis=reduce), 0.0)
    hi = np.maximum(w64.max(axis=reduce), 0.0)
    if symmetric:
        scale = np.maximum(hi, -lo) / 127.0
        zero = None
    else:
        scale = (hi - lo) / 255.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    shape = [1] * w64.ndim if axis is None else [-1 if i == axis % w64.ndim else 1
                                                 for i in range(w64.ndim)]
    s = scale.astype(np.float64).reshape(shape)
    if symmetric:
        q = np.clip(np.rint(w64 / s), -127, 127)
    else:
        zero = np.clip(np.rint(-128.0 - lo / scale), -128, 127).astype(np.int8)
        q = np.clip(np.rint(w64 / s) + zero.reshape(shape), -128, 127)
    return q.astype(np.int8), scale, zero


@register
@dataclass(frozen=True)
class QuantizeDynamic(Pass):
    """Quantize constant weights to int8; ORT quantizes activations at run time.

    **Rules**
      1. ``MatMul(A, W)``, ``W`` a constant float32 K×N with at least ``min_elements`` elements
         and A float32 → with ``block_size = B > 0``: ``com.microsoft::MatMulNBits(A, q, scale,
         [zero], bias=[bias], bits=8, block_size=B, accuracy_level=4)``, int8 per block of B
         along K; with ``block_size = 0``: ``com.microsoft::DynamicQuantizeMatMul(A, q, scale,
         [zero], [bias])``, int8 per output column (``per_channel``) or per tensor.
      2. A following ``Add`` of a constant float32 vector of length N (the MatMul's only use)
         becomes the fused bias; the ``Add`` is removed.
      3. ``Gemm(A, B, C)`` with ``alpha = beta = 1``, ``transA = 0``, constant ``B`` and a
         length-N (or absent) ``C`` is rule 1 on ``B`` (``Bᵀ`` when ``transB = 1``), bias ``C``.
      4. With ``embeddings``: ``Gather(E, ids, axis=0)``, ``E`` a constant float32 table →
         ``Cast(Gather(q, ids)) · Gather(scale, ids)`` with int8 ``q`` per row.
      4b. Tied table: if ``E`` also feeds ``MatMul(A, Transpose(E))`` (an LM head; per-channel,
         symmetric, ``block_size = 0``), that MatMul becomes ``DynamicQuantizeMatMul(A,
         Transpose(q), scale)`` on the same int8 ``q`` (ORT folds the constant Transpose at
         load time): one int8 table on disk, the float ``E`` is removed.
      5. A node whose name or weight name matches a pattern in ``exclude`` (fnmatch) stays,
         and a weight any of whose uses stays float is not quantized (the model never grows);
         a weight shared by several quantized nodes is quantized once.
      6. Weights left unused are removed. Names: ``<weight>.qdyn.q|scale|zero|bias``,
         ``<node>.qdyn.*`` for nodes.

      7. FX (aten) graphs: ``aten.linear``/``mm``/``matmul``/``addmm`` (and ``aten.embedding``)
         reading a constant float32 weight get int8 buffers ``<weight>_qdyn_q|scale|zero_point``
         dequantized in the graph, and the activation is fake-quantized to uint8 with
         qparams computed at run time as ``DynamicQuantizeLinear`` does (``_dynamic_fx``);
         exported, this is ``QuantizeLinear``/``DequantizeLinear`` around a float ``MatMul``
         (ORT does not fuse it into ``MatMulInteger``). ``block_size`` is ONNX-only.

    **Requires** an ONNX model, or an aten FX graph with ``block_size=0``. **Ensures** no
    float layer that rule 1/3/7 covers remains outside ``exclude``.
    """

    name: ClassVar[str] = "quantize-dynamic"
    supports: ClassVar[frozenset[str]] = frozenset({"fx", "onnx"})
    block_size: int = 0
    per_channel: bool = True
    symmetric: bool = True
    embeddings: bool = True
    exclude: tuple[str, ...] = ()
    min_elements: int = 1024

    def __post_init__(self) -> None:
        if self.block_size and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise PassSpecError(
                f"quantize-dynamic: block_size={self.block_size} must be 0 (per-channel "
                "DynamicQuantizeMatMul) or a power of two >= 16 (e.g. block_size=128)"
            )
        if self.min_elements < 1:
            raise PassSpecError(f"quantize-dynamic: min_elements={self.min_elements} must be >= 1")

    def requires(self, graph) -> None:
        if not isinstance(graph, ir.Model):
            return
        opset = graph.opset_imports.get(MS)
        if opset not in (None, 1):
            raise PreconditionError(
                f"quantize-dynamic emits com.microsoft opset 1 ops but the model imports "
                f"com.microsoft opset {opset}; drop that import or skip this pass"
            )

    def _excluded(self, *names: str | None) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for n in names if n for p in self.exclude)

    def run_onnx(self, model: ir.Model) -> PassResult:
        from ._dynamic_rewrite import Rewriter

        rewriter = Rewriter(self, model.graph, value_names(model))
        plans = rewriter.plan()
        if not plans:
            return PassResult(model, False, {"matmuls_quantized": 0, "gathers_quantized": 0})
        model.opset_imports.setdefault(MS, 1)
        stats = rewriter.apply(plans)
        stats["initializers_removed"] = drop_unused_constants(rewriter.sources)
        logger.debug("quantize-dynamic: %s", stats)
        return PassResult(model, True, stats)

    def run_fx(self, gm) -> PassResult:
        from ._dynamic_fx import run_fx

        if self.block_size:
            raise PreconditionError(
                f"quantize-dynamic: block_size={self.block_size} (MatMulNBits) is ONNX-only; "
                "use block_size=0 on FX graphs or export to ONNX first (graphpress.export.to_onnx)"
            )
        return run_fx(self, gm)

    def ensures(self, graph) -> None:
        if isinstance(graph, ir.Model):
            from ._dynamic_rewrite import Rewriter

            left = [p.node.name for p in Rewriter(self, graph.graph, set()).plan()]
        else:
            from ._dynamic_fx import plan_fx

            left = [s.node.name for s in plan_fx(self, graph)]
        if left:
            raise PostconditionError(
                f"quantize-dynamic left {len(left)} quantizable nodes float "
                f"(e.g. {left[0]!r}); this is a bug, please report it"
            )


def float_const(value: ir.Value | None) -> np.ndarray | None:
    """The array of a float32 constant ``value`` (None for anything else)."""
    array = onnx_const(value)
    return array if array is not None and array.dtype == np.float32 else None


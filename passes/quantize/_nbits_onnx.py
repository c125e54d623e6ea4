"""Find block-quantizable weights in an ONNX model and rewrite them to ORT's ``com.microsoft``
``MatMulNBits`` / ``GatherBlockQuantized``.

Scales that are exact float16 values are stored as float16: ``GatherBlockQuantized`` then gives
float16 rows (a ``Cast`` follows) and ``MatMulNBits`` reads them through a ``Cast`` that ORT
folds into a float32 initializer at load time, so only the file gets smaller.

A *site* is one use of a constant float weight: ``MatMul(x, W)`` (``W`` ``[K, N]``, or
``Transpose(E)`` of a constant ``E`` ``[N, K]``, as exporters write a tied LM head),
``Gemm(x, W)`` with ``alpha = 1``, ``transA = 0`` (``transB`` either way; ``C·beta`` becomes a
following ``Add``) or ``Gather(E, ids)`` on axis 0 of a 2-D table. Every site sees its weight as
``W_nk`` ``[N, K]`` (quantized along ``K``). Sites whose ``W_nk`` is the same constant in the
same orientation share one set of packed tensors (``MatMulNBits`` reads the 2-D
``GatherBlockQuantized`` codes through a ``Reshape`` that ORT folds at load time), so a tied
embedding/LM head is stored once.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphpress.graph.onnx import add_initializer, mark, unique_name

from .._rewrite import bypass_onnx, drop_unused_constants, onnx_const
from ._blockwise import BlockQuant
from ._packing import pack_zero_points

__all__ = ["Site", "Packed", "find_sites", "rewrite_site", "MS"]

logger = logging.getLogger(__name__)

MS = "com.microsoft"


@dataclass
class Site:
    """One use of a constant weight: ``node`` reads ``W_nk = array`` (or its transpose)."""

    node: ir.Node
    op: str  # "matmul", "gemm" or "gather"
    source: ir.Value  # the constant holding the array
    transpose: bool  # W_nk = array.T (MatMul weight [K, N], Gemm without transB)
    x: ir.Value  # activation (MatMul/Gemm) or indices (Gather)
    bias: np.ndarray | None = None
    extra: list[ir.Value] = field(default_factory=list)  # consts that may become unused

    @property
    def key(self) -> tuple[int, bool]:
        return id(self.source), self.transpose

    @property
    def name(self) -> str:
        return self.source.name or self.node.name or "weight"

    def weight(self) -> np.ndarray:
        array = onnx_const(self.source)
        return array.T if self.transpose else array


def _const_2d(value: ir.Value | None) -> tuple[ir.Value, bool, list[ir.Value]] | None:
    """(constant, transposed?, intermediates) if ``value`` is a 2-D float constant or the
    ``Transpose(perm=[1, 0])`` of one."""
    if value is None:
        return None
    tensor = None if value.is_graph_input() else value.const_value
    if tensor is not None:  # dtype and shape only: reading the data copies it
        ok = len(tensor.shape) == 2 and tensor.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)
        return (value, False, []) if ok else None
    array = onnx_const(value)  # a Constant node
    if array is not None:
        ok = array.ndim == 2 and array.dtype in (np.float32, np.float16)
        return (value, False, []) if ok else None
    node = value.producer()
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    perm = node.attributes.get_ints("perm", None)
    inner = _const_2d(node.inputs[0])
    if inner is None or inner[1] or (perm is not None and list(perm) != [1, 0]):
        return None
    return inner[0], True, [value]


def find_sites(model: ir.Model, *, embeddings: bool, exclude: tuple[str, ...]) -> list[Site]:
    """All quantizable sites of the main graph, in graph order."""
    sites = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or _excluded(node, exclude):
            continue
        site = None
        if node.op_type == "MatMul" and len(node.inputs) == 2 and onnx_const(node.inputs[0]) is None:
            found = _const_2d(node.inputs[1])
            if found is not None:  # MatMul W is [K, N]: W_nk = W.T, or E for Transpose(E)
                site = Site(node, "matmul", found[0], not found[1], node.inputs[0], extra=found[2])
        elif node.op_type == "Gemm":
            site = _gemm_site(node)
        elif node.op_type == "Gather" and embeddings and node.attributes.get_int("axis", 0) == 0:
            found = _const_2d(node.inputs[0])
            if found is not None and not found[1]:
                site = Site(node, "gather", found[0], False, node.inputs[1])
        if site is not None and not _excluded(site.source, exclude):
            sites.append(site)
    return sites


def _gemm_site(node: ir.Node) -> Site | None:
    attrs = node.attributes
    if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0:
        return None
    found = _const_2d(node.inputs[1])
    if found is None or found[1]:
        return None
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = onnx_const(node.inputs[2])
        if bias is None:
            return None
        bias = (bias * attrs.get_float("beta", 1.0)).astype(bias.dtype)
    transposed = bool(attrs.get_int("transB", 0))
    return Site(node, "gemm", found[0], not transposed, node.inputs[0], bias=bias)


def _excluded(item: ir.Node | ir.Value, patterns: tuple[str, ...]) -> bool:
    name = item.name or ""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class Packed:
    """The packed tensors of one ``W_nk`` (made on first use, shared by its sites)."""

    def __init__(self, bq: BlockQuant, dtype: np.dtype, float_dtype: np.dtype) -> None:
        self.bq, self.dtype, self.float_dtype = bq, dtype, float_dtype  # scales, weight dtypes
        self.codes: ir.Value | None = None
        self.scales: ir.Value | None = None
        self.zero_points: ir.Value | None = None

    def values(self, graph: ir.Graph, base: str, tag: str, pass_name: str, taken: set[str]):
        if self.codes is None:
            bq = self.bq
            codes = bq.packed()
            self.codes = add_initializer(graph, f"{base}.{tag}.codes",
                                         codes.reshape(codes.shape[0], -1), pass_name, taken)
            self.scales = add_initializer(graph, f"{base}.{tag}.scales",
                                          bq.scales.astype(self.dtype), pass_name, taken)
            if bq.zero_points is not None:
                self.zero_points = add_initializer(
                    graph, f"{base}.{tag}.zero_points",
                    pack_zero_points(bq.zero_points, bq.bits), pass_name, taken)
        return self.codes, self.scales, self.zero_points


def rewrite_site(graph: ir.Graph, site: Site, packed: Packed, x: ir.Value, pass_name: str,
                 tag: str, taken: set[str]) -> None:
    """Replace ``site.node`` by ``MatMulNBits``/``GatherBlockQuantized`` reading ``packed``."""
    bq = packed.bq
    codes, scales, zps = packed.values(graph, site.name, tag, pass_name, taken)
    node, old = site.node, site.node.outputs[0]
    base = node.name or old.name
    new_nodes = []

    def value(role: str) -> ir.Value:
        return ir.Value(name=unique_name(graph, f"{base}.{tag}.{role}", taken))

    def add(op: str, inputs, role: str, domain: str = "", **attrs) -> ir.Value:
        out = value(role)
        made = ir.node(op, inputs, attributes=attrs, domain=domain, outputs=[out],
                       name=unique_name(graph, f"{base}.{tag}.{role}.node", taken))
        new_nodes.append(mark(made, pass_name))
        return out

    def const(role: str, array: np.ndarray) -> ir.Value:
        return add_initializer(graph, f"{base}.{tag}.{role}", array, pass_name, taken)

    n, n_blocks = bq.scales.shape
    if site.op == "gather":
        out = add("GatherBlockQuantized", [codes, x, scales] + ([zps] if zps is not None else []),
                  "gather", MS, bits=bq.bits, block_size=bq.block_size, gather_axis=0,
                  quantize_axis=1)
        if packed.dtype != packed.float_dtype:  # fp16 scales give fp16 rows
            out = add("Cast", [out], "cast", to=old.dtype or ir.DataType.FLOAT)
        if n_blocks * bq.block_size != bq.k:  # the padded columns of the last block go
            out = add("Slice", [out, const("starts", np.array([0])), const("ends", np.array([bq.k])),
                                const("axes", np.array([-1]))], "slice")
    else:
        blob = bq.block_size * bq.bits // 8
        shape = const("b_shape", np.array([n, n_blocks, blob], np.int64))
        b = add("Reshape", [codes, shape], "b")
        if packed.dtype != packed.float_dtype:  # fp16 scales on disk; ORT folds the Cast
            scales = add("Cast", [scales], "scales_cast", to=old.dtype or ir.DataType.FLOAT)
        inputs = [x, b, scales] + ([zps] if zps is not None else [])
        out = add("MatMulNBits", inputs, "matmul", MS, K=bq.k, N=n, bits=bq.bits,
                  block_size=bq.block_size)
        if site.bias is not None:
            out = add("Add", [out, const("bias", site.bias)], "bias_add")
    out.dtype, out.shape = old.dtype, old.shape
    graph.insert_before(node, new_nodes)
    bias = node.inputs[2] if site.op == "gemm" and len(node.inputs) > 2 else None
    bypass_onnx(node, old, out)
    if bias is not None:  # copied to <node>.<tag>.bias above; the original may be unread now
        drop_unused_constants([bias])

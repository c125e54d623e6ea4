"""Export FX block-quantized linears and embedding tables as ONNX Runtime's
``com.microsoft.MatMulNBits`` and ``GatherBlockQuantized``.

``quantize-weights`` on an FX graph stores a linear's weight as packed codes, scales and
(asymmetric) zero points, decoded by a chain of aten ops ``Ŵ = (q − z)·s`` that the layer reads
(``passes/quantize/_nbits_fx.py``). Exported as it is, ORT would run that chain (or the
exporter's constant folder would fold small ones back to float weights). :func:`nbits_export_copy`
gives :func:`~graphpress.export.onnx.to_onnx` a copy of the graph in which each
``aten.linear(x, Ŵ, b)`` whose ``Ŵ`` is such a chain reads the buffers directly through one
``torch.onnx.ops.symbolic("com.microsoft::MatMulNBits")`` node (plus an ``add`` for the bias),
in MatMulNBits' layout: codes ``uint8 [N, n_blocks, B·bits/8]`` (low bits first), scales
``[N·n_blocks]``, zero points packed ``uint8 [N, ⌈n_blocks·bits/8⌉]`` (absent when symmetric:
the default ``2^(bits−1)``). Each ``aten.embedding(Ŵ, ids)`` likewise becomes one
``GatherBlockQuantized`` (codes ``[N, n_blocks·B·bits/8]``, scales ``[N, n_blocks]``, the same
packed zero points; gather axis 0, quantized axis 1), sliced to ``K`` when the last block is
padded. Without this, ORT folds a chain into float weights when it loads the model: the file
is small but the memory is not.

A chain is recognised by its structure (codes → cast → bit extraction → ``stack`` →
``reshape [N, n_blocks, B]`` → ``sub`` zero point → ``mul`` scales → ``reshape`` → maybe
``slice [:, :K]``) and then checked numerically: decoding the buffers the MatMulNBits way must
equal the chain's value exactly, otherwise the linear is exported as it is. The caller's graph
is never modified; the copy shares its tensors.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from graphpress.graph.fx import get_tensor

__all__ = ["NbitsSite", "find_nbits_sites", "nbits_export_copy", "SUPPORTED_BITS"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
SUPPORTED_BITS = (4, 8)  # what ORT's CPU and CUDA MatMulNBits kernels take


@dataclass(frozen=True)
class NbitsSite:
    """A linear (``aten.linear``, weight argument 1) or an embedding lookup
    (``aten.embedding``, table argument 0) reading a weight decoded from block-quantized
    buffers."""

    node: fx.Node
    name: str  # the codes buffer's attribute name, for the new buffers' names
    codes: np.ndarray  # uint8 [N, n_blocks, blob]
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, n_blocks], unpacked
    bits: int
    block_size: int
    k: int

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    def decode(self) -> np.ndarray:
        """``Ŵ [N, K]`` as MatMulNBits computes it (float32)."""
        n, n_blocks, _ = self.codes.shape
        shifts = np.arange(0, 8, self.bits, dtype=np.uint8)
        q = (self.codes[..., None] >> shifts) & np.uint8((1 << self.bits) - 1)
        q = q.reshape(n, n_blocks, self.block_size).astype(np.float32)
        z = (np.full((n, n_blocks), 1 << (self.bits - 1), np.float32) if self.zero_points is None
             else self.zero_points.astype(np.float32))
        w = (q - z[..., None]) * self.scales[..., None]
        return w.reshape(n, -1)[:, : self.k]

    def packed_zero_points(self) -> np.ndarray | None:
        """Zero points packed along the blocks, low bits first: ``[N, ⌈n_blocks·bits/8⌉]``."""
        if self.zero_points is None:
            return None
        n, n_blocks = self.zero_points.shape
        per_byte = 8 // self.bits
        padded = np.zeros((n, -(-n_blocks // per_byte) * per_byte), np.uint8)
        padded[:, :n_blocks] = self.zero_points
        groups = padded.reshape(n, -1, per_byte).astype(np.uint16)
        return (groups << (np.arange(per_byte) * self.bits)).sum(axis=2).astype(np.uint8)


def _arg(node: object, index: int) -> object:
    return node.args[index] if isinstance(node, fx.Node) and len(node.args) > index else None


def _is(node: object, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _tensor(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    return get_tensor(gm, node) if isinstance(node, fx.Node) else None


_WEIGHT_ARG = {_aten.linear.default: 1, _aten.embedding.default: 0}


def _parse(gm: fx.GraphModule, node: fx.Node) -> NbitsSite | None:
    """The buffers behind ``node``'s weight if it is a decode chain, else ``None``."""
    w, k = _arg(node, _WEIGHT_ARG[node.target]), None
    if _is(w, _aten.slice.Tensor) and _arg(w, 1) == 1 and _arg(w, 2) in (0, None):
        w, k = _arg(w, 0), _arg(w, 3)
    if not _is(w, _aten.reshape.default) or not _is(_arg(w, 0), _aten.mul.Tensor):
        return None
    centred, scales_node = _arg(w, 0).args[:2]
    scales = _tensor(gm, scales_node)
    if not _is(centred, _aten.sub.Tensor) or scales is None or scales.dtype != torch.float32:
        return None
    values, zero = centred.args[:2]
    if not (_is(values, _aten.reshape.default) and _is(_arg(values, 0), _aten.stack.default)):
        return None
    parts = _arg(values, 0).args[0]
    bits = 8 // len(parts) if parts and 8 % len(parts) == 0 else 0
    shape = list(_arg(values, 1) or [])
    root = _arg(_arg(_arg(parts[0], 0), 0), 0)  # sub(floor(div(packed)), ...) -> packed
    codes_node = _arg(root, 0) if _is(root, _aten._to_copy.default) else None
    codes = _tensor(gm, codes_node)
    if bits not in SUPPORTED_BITS or len(shape) != 3 or codes is None or codes.dtype != torch.uint8:
        return None
    n, n_blocks, block_size = shape
    zero_points = None
    if isinstance(zero, fx.Node):
        zp = _tensor(gm, _arg(zero, 0)) if _is(zero, _aten._to_copy.default) else None
        if zp is None or zp.dtype != torch.uint8:
            return None
        zero_points = zp.reshape(n, n_blocks).numpy()
    elif zero != float(1 << (bits - 1)):
        return None
    if codes.numel() != n * n_blocks * block_size * bits // 8 or scales.numel() != n * n_blocks:
        return None
    return NbitsSite(node, str(codes_node.target), codes.reshape(n, n_blocks, -1).numpy(),
                       scales.reshape(n, n_blocks).numpy(), zero_points, bits, block_size,
                       int(k) if k is not None else n_blocks * block_size)


def _chain_value(gm: fx.GraphModule, weight: fx.Node) -> torch.Tensor:
    """Evaluate the constant-only subgraph that computes ``weight``."""
    memo: dict[fx.Node, object] = {}

    def value(node: object) -> object:
        if not isinstance(node, fx.Node):
            return [value(a) for a in node] if isinstance(node, (list, tuple)) else node
        if node not in memo:
            if node.op == "get_attr":
                memo[node] = _tensor(gm, node)
            else:
                args = [value(a) for a in node.args]
                kwargs = {k: value(v) for k, v in node.kwargs.items()}
                memo[node] = node.target(*args, **kwargs)
        return memo[node]

    with torch.no_grad():
        return value(weight)


def find_nbits_sites(gm: fx.GraphModule) -> list[NbitsSite]:
    """Every ``aten.linear`` / ``aten.embedding`` whose weight is a verified block-quantization
    decode chain."""
    found = []
    for node in gm.graph.nodes:
        if not any(_is(node, target) for target in _WEIGHT_ARG):
            continue
        site = _parse(gm, node)
        if site is None:
            continue
        expected = _chain_value(gm, node.args[_WEIGHT_ARG[node.target]]).numpy()
        if expected.shape != (site.n, site.k) or not np.array_equal(site.decode(), expected):
            logger.debug("%s: decode chain not recognised exactly; exported as it is", node.name)
            continue
        found.append(site)
    return found


def _matmul_nbits(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                  zero_points: torch.Tensor | None, k: int, n: int, bits: int,
                  block_size: int) -> torch.Tensor:
    """``x·Ŵᵀ`` as one ``com.microsoft.MatMulNBits`` node (export only: eager gives no values)."""
    inputs = (x, codes, scales) if zero_points is None else (x, codes, scales, zero_points)
    return torch.onnx.ops.symbolic(
        "com.microsoft::MatMulNBits", inputs,
        {"K": k, "N": n, "bits": bits, "block_size": block_size},
        dtype=x.dtype, shape=(*x.shape[:-1], n), version=1)


def _gather_block_quantized(codes: torch.Tensor, ids: torch.Tensor, scales: torch.Tensor,
                            zero_points: torch.Tensor | None, bits: int,
                            block_size: int) -> torch.Tensor:
    """Rows ``ids`` of the dequantized table as one ``com.microsoft.GatherBlockQuantized``
    node, ``[*ids.shape, n_blocks·B]`` (export only)."""
    inputs = (codes, ids, scales) if zero_points is None else (codes, ids, scales, zero_points)
    width = scales.shape[1] * block_size
    return torch.onnx.ops.symbolic(
        "com.microsoft::GatherBlockQuantized", inputs,
        {"bits": bits, "block_size": block_size, "gather_axis": 0, "quantize_axis": 1},
        dtype=scales.dtype, shape=(*ids.shape, width), version=1)


def nbits_export_copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` whose verified block-quantized linears and embeddings are MatMulNBits
    and GatherBlockQuantized nodes, and their count (``gm`` itself when there are none)."""
    sites = find_nbits_sites(gm)
    if not sites:
        return gm, 0
    graph = copy.deepcopy(gm.graph)
    twins = dict(zip(gm.graph.nodes, graph.nodes))
    out = fx.GraphModule(gm, graph)

    def add_buffer(site: NbitsSite, before: fx.Node, role: str, array: np.ndarray) -> fx.Node:
        """A buffer per (codes buffer, op, role): sites sharing codes in the same op share it;
        a tied table and LM head get one layout each (2-D for Gather, 3-D for MatMul)."""
        op = "matmul" if site.node.target is _aten.linear.default else "gather"
        name = f"{site.name.replace('.', '_')}_nbits_{op}_{role}"
        if not hasattr(out, name):
            out.register_buffer(name, torch.from_numpy(np.ascontiguousarray(array)))
        with graph.inserting_before(before):
            return graph.get_attr(name)

    for site in sites:
        node = twins[site.node]
        buffer = functools.partial(add_buffer, site, node)
        packed = site.packed_zero_points()
        zero_points = None if packed is None else buffer("zero_points", packed)
        with graph.inserting_before(node):
            if node.target is _aten.linear.default:
                result = graph.call_function(_matmul_nbits, (
                    node.args[0], buffer("codes", site.codes),
                    buffer("scales", site.scales.reshape(-1)), zero_points, site.k, site.n,
                    site.bits, site.block_size))
                if _arg(node, 2) is not None:
                    result = graph.call_function(_aten.add.Tensor, (result, node.args[2]))
            else:
                result = graph.call_function(_gather_block_quantized, (
                    buffer("codes", site.codes.reshape(site.n, -1)), node.args[1],
                    buffer("scales", site.scales), zero_points, site.bits, site.block_size))
                if site.k != site.codes.shape[1] * site.block_size:
                    result = graph.call_function(_aten.slice.Tensor, (result, -1, 0, site.k))
        result.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(result)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    out.recompile()
    return out, len(sites)

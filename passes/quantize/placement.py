"""Where static quantization goes in an ONNX graph: the layers a runtime fuses, never the
mask/arithmetic paths.

A *layer* is one operator ONNX Runtime turns into integer arithmetic when its inputs come
through ``DequantizeLinear``:

* ``MatMul`` with a constant 2-D weight ``W[K, N]`` (output channels on axis 1);
* ``MatMul(x, Transpose(E))``, ``E`` a constant table (a tied LM head; channels = rows of E);
* ``Gemm`` with a constant ``B`` (output channels on axis 0 when ``transB=1``, else 1);
* ``Conv`` with a constant weight ``W[M, C/g, k…]`` (output channels on axis 0);
* ``Gather`` of a constant table (embeddings; weight-only, the gathered rows are dequantized);
* ``MatMul`` of two activations (attention scores and context), when allowed.

Mask taint: the values computed from integer/bool graph inputs (an attention mask, position
ids) through anything but a lookup index are *tainted*; taint stops at ``Softmax`` (its output
is a probability again), at fused attention (``MultiHeadAttention``: a weighted average of the
values, whatever the mask bias) and at ``Gather`` indices. A layer whose activation is tainted is never
quantized, and neither is an activation whose calibrated range is absurd
(:func:`~._qparams.range_is_absurd`: ±inf, ``|x| ≥ 1e6``, or one side 1e4× the other).
Exclusion patterns (``fnmatch``) match a layer's node name or any of its input value names.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .._rewrite import onnx_const

__all__ = ["Layer", "find_layers", "mask_tainted", "excluded", "tied_table"]

logger = logging.getLogger(__name__)

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
#: Ops after which a tainted value is meaningful again (or whose output is an index/shape).
_TAINT_STOPS = {"Softmax", "LayerNormalization", "Shape", "Size", "MultiHeadAttention",
                "Attention", "GroupQueryAttention"}


@dataclass(frozen=True)
class Layer:
    """One quantizable operator: what to quantize and along which axis."""

    node: ir.Node
    op: str  # "matmul" | "gemm" | "conv" | "embedding" | "attention"
    activations: tuple[int, ...]  # input positions quantized as activations
    weight: int | None  # input position of the constant weight
    axis: int | None  # output-channel axis of the weight (None: per tensor only)

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    def values(self) -> list[ir.Value]:
        return [self.node.inputs[i] for i in self.activations]


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and (value.dtype is None or value.dtype in _FLOATS)


def mask_tainted(graph: ir.Graph) -> set[ir.Value]:
    """Values derived from integer/bool graph inputs other than through lookup indices."""
    tainted = {v for v in graph.inputs if v.dtype is not None and v.dtype not in _FLOATS}
    for node in graph:
        if node.op_type in _TAINT_STOPS:
            continue
        inputs = list(node.inputs)
        if node.op_type in ("Gather", "GatherElements", "GatherND") and inputs:
            inputs = inputs[:1]  # indices select rows; they do not taint the values
        if any(v in tainted for v in inputs if v is not None):
            tainted.update(node.outputs)
    return tainted


def excluded(layer: Layer, patterns: tuple[str, ...]) -> bool:
    """Whether an ``fnmatch`` pattern matches the layer's node name or an input value name."""
    names = [layer.name, *(v.name for v in layer.node.inputs if v is not None and v.name)]
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def _weight_layer(node: ir.Node) -> Layer | None:
    inputs = node.inputs
    op = node.op_type
    if op == "MatMul" and len(inputs) == 2 and _is_float(inputs[0]):
        w = onnx_const(inputs[1])
        if w is not None and w.ndim == 2 and w.dtype.kind == "f":
            return Layer(node, "matmul", (0,), 1, 1)
    if op == "MatMul" and len(inputs) == 2 and _is_float(inputs[0]) and tied_table(inputs[1]):
        return Layer(node, "matmul_t", (0,), 1, 1)  # LM head reading Transpose(E)
    if op == "Gemm" and len(inputs) >= 2 and _is_float(inputs[0]):
        w = onnx_const(inputs[1])
        if w is not None and w.dtype.kind == "f":
            attr = node.attributes.get("transB")
            trans_b = attr is not None and attr.as_int() == 1
            return Layer(node, "gemm", (0,), 1, 0 if trans_b else 1)
    if op == "Conv" and len(inputs) >= 2 and _is_float(inputs[0]):
        w = onnx_const(inputs[1])
        if w is not None and w.dtype.kind == "f":
            return Layer(node, "conv", (0,), 1, 0)
    if op == "Gather" and len(inputs) == 2:
        table = onnx_const(inputs[0])
        axis = node.attributes.get("axis")
        if (table is not None and table.dtype.kind == "f" and table.ndim == 2
                and table.size >= 1024 and (axis is None or axis.as_int() == 0)):
            return Layer(node, "embedding", (), 0, None)
    return None


def tied_table(value: ir.Value | None) -> ir.Value | None:
    """``E`` when ``value = Transpose(E)``, ``E`` a constant float 2-D table (a tied LM head)."""
    node = None if value is None else value.producer()
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    perm = node.attributes.get("perm")
    table = onnx_const(node.inputs[0])
    if table is None or table.dtype.kind != "f" or table.ndim != 2:
        return None
    return node.inputs[0] if perm is None or list(perm.as_ints()) == [1, 0] else None


def find_layers(
    model: ir.Model, *, exclude: tuple[str, ...] = (), attention: bool = True,
    embeddings: bool = True,
) -> list[Layer]:
    """The quantizable layers of ``model``'s main graph in graph order (placement rules)."""
    graph = model.graph
    tainted = mask_tainted(graph)
    layers: list[Layer] = []
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        layer = _weight_layer(node)
        if layer is None and attention and node.op_type == "MatMul" and len(node.inputs) == 2:
            a, b = node.inputs
            if _is_float(a) and _is_float(b) and onnx_const(a) is None and onnx_const(b) is None:
                layer = Layer(node, "attention", (0, 1), None, None)
        if layer is None or (layer.op == "embedding" and not embeddings):
            continue
        if any(v in tainted for v in layer.values()):
            logger.debug("insert-qdq: %s reads the mask path; left in float", layer.name)
            continue
        if excluded(layer, exclude):
            logger.debug("insert-qdq: %s excluded by pattern", layer.name)
            continue
        layers.append(layer)
    return layers


def weight_array(layer: Layer) -> np.ndarray | None:
    """The constant weight of ``layer`` (None for activation × activation layers)."""
    return None if layer.weight is None else onnx_const(layer.node.inputs[layer.weight])

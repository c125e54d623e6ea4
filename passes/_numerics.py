"""IR-free numerics shared by the FX and ONNX sides of the passes.

**Batch-norm folding.** Inference batch norm is a per-channel affine map::

    BN(y)_c = γ_c · (y_c − μ_c) / √(σ²_c + ε) + β_c  =  s_c · y_c + t_c,
    s = γ / √(σ² + ε),   t = β − μ · s.

When ``y = W ⋆ x + b`` is a convolution or a linear layer and output channel ``c`` is the slice
``c`` of ``W`` along one axis (axis 0 for Conv and torch Linear weights, axis 1 for the
``[K, N]`` weight of an ONNX MatMul or ``Gemm(transB=0)``), then::

    BN(y) = (s ⊙ W) ⋆ x + (b · s + t)   i.e.   w' = w · γ/√(σ²+ε),   b' = (b − μ) · γ/√(σ²+ε) + β

with ``b = 0`` for a layer without bias. The functions work on numpy arrays and on torch
tensors alike (only arithmetic and ``reshape``); the math runs in float64 and the results are
cast back to the weight's dtype.

**Constant-folding size rule.** Folding replaces a computation by its result; it must never
blow a model up (``Expand``/``Tile``/``ConstantOfShape`` of a small constant, a dequantized
weight). :func:`fold_allowed` admits a result only if it is at most ``max_bytes`` and either
tiny (≤ :data:`TINY_BYTES`) or at most ``max_growth`` times the bytes of its constant inputs.

**One-node ONNX evaluation.** :class:`OnnxEvaluator` runs one ONNX operator on numpy arrays
with ``onnx.reference.ReferenceEvaluator``. It builds one single-node model per operator
signature (domain, op type, attributes, input dtypes) and reuses it, so folding a chain of
100k similar nodes costs a handful of model builds and one cheap call per node.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator

__all__ = ["TINY_BYTES", "bn_scale_shift", "fold_batchnorm", "fold_allowed", "OnnxEvaluator"]

logger = logging.getLogger(__name__)

#: Results up to this many bytes (shapes, scalars, small index tensors) always fold.
TINY_BYTES = 1024


def _f64(array: Any) -> Any:
    return array.astype(np.float64) if isinstance(array, np.ndarray) else array.double()


def _cast_like(array: Any, reference: Any) -> Any:
    if isinstance(array, np.ndarray):
        return array.astype(reference.dtype)
    return array.to(reference.dtype)


def bn_scale_shift(gamma: Any, beta: Any, mean: Any, var: Any, eps: float) -> tuple[Any, Any]:
    """``s = γ / √(σ² + ε)`` and ``t = β − μ·s`` (float64); ``γ``/``β`` may be ``None``."""
    mean, var = _f64(mean), _f64(var)
    scale = (var + eps) ** -0.5
    if gamma is not None:
        scale = scale * _f64(gamma)
    shift = -mean * scale
    if beta is not None:
        shift = shift + _f64(beta)
    return scale, shift


def fold_batchnorm(
    weight: Any,
    bias: Any,
    gamma: Any,
    beta: Any,
    mean: Any,
    var: Any,
    eps: float,
    *,
    axis: int = 0,
) -> tuple[Any, Any]:
    """Return ``(w', b')`` of a layer with ``weight``/``bias`` followed by a batch norm.

    ``axis`` is the output-channel axis of ``weight``. ``bias`` may be ``None`` (no bias) or
    any shape that broadcasts against the channel vector; ``b'`` then has the broadcast shape.
    Both results have the dtype of ``weight`` (``b'``: of ``bias`` when given).
    """
    scale, shift = bn_scale_shift(gamma, beta, mean, var, eps)
    shape = [1] * len(weight.shape)
    shape[axis] = -1
    new_weight = _f64(weight) * scale.reshape(shape)
    new_bias = shift if bias is None else _f64(bias) * scale + shift
    return _cast_like(new_weight, weight), _cast_like(new_bias, weight if bias is None else bias)


def fold_allowed(out_bytes: int, in_bytes: int, *, max_bytes: int, max_growth: float) -> bool:
    """Whether a folded result of ``out_bytes`` computed from ``in_bytes`` of constants may stay."""
    if out_bytes > max_bytes:
        return False
    return out_bytes <= TINY_BYTES or out_bytes <= max_growth * in_bytes


class OnnxEvaluator:
    """Evaluate single ONNX operators on numpy arrays, caching one evaluator per signature."""

    def __init__(self, opsets: dict[str, int], ir_version: int = 10) -> None:
        self._opsets = dict(opsets)
        self._ir_version = ir_version
        self._cache: dict[tuple, ReferenceEvaluator] = {}

    def __call__(
        self,
        op_type: str,
        domain: str,
        attributes: Sequence[onnx.AttributeProto],
        inputs: Sequence[np.ndarray | None],
        num_outputs: int,
    ) -> list[np.ndarray]:
        """The outputs of ``op_type(*inputs)``; ``None`` marks an omitted optional input."""
        key = (
            domain,
            op_type,
            tuple(a.SerializeToString() for a in attributes),
            tuple(None if x is None else x.dtype.str for x in inputs),
            num_outputs,
        )
        evaluator = self._cache.get(key)
        if evaluator is None:
            evaluator = self._cache[key] = self._build(op_type, domain, attributes, inputs, num_outputs)
        feeds = {f"i{i}": x for i, x in enumerate(inputs) if x is not None}
        return [np.asarray(out) for out in evaluator.run(None, feeds)]

    def _build(self, op_type, domain, attributes, inputs, num_outputs) -> ReferenceEvaluator:
        names = ["" if x is None else f"i{i}" for i, x in enumerate(inputs)]
        node = helper.make_node(op_type, names, [f"o{i}" for i in range(num_outputs)], domain=domain)
        node.attribute.extend(attributes)
        graph = helper.make_graph(
            [node],
            "fold",
            [helper.make_empty_tensor_value_info(name) for name in names if name],
            [helper.make_empty_tensor_value_info(f"o{i}") for i in range(num_outputs)],
        )
        opsets = [helper.make_opsetid(d, v) for d, v in self._opsets.items()]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=self._ir_version)
        logger.debug("building a reference evaluator for %s::%s", domain or "ai.onnx", op_type)
        return ReferenceEvaluator(model)

"""Measured end-to-end sensitivity of each layer, to weight the global budget allocation.

The budget greedy (``_rank``) minimises ``Σ_i w_i·e_i(r_i)`` with ``e_i`` layer ``i``'s relative
squared (output) error. With ``w_i = 1`` every layer counts alike, but a layer whose error the
rest of the network damps (attention queries/keys before a softmax, a projection small
against the residual stream) can take a lower rank than one whose error propagates. This
module measures ``w_i`` to first order: factor layer ``i`` *alone* at a probe rank ``p_i``,
run the graph on the calibration batches, and set

    ``w_i = (Σ‖y_i − y‖² / Σ‖y‖²) / e_i(p_i)``

over every float graph output ``y`` (``y_i``: with layer ``i`` factored). Then
``Σ_i w_i·e_i(r_i)`` is the linearised relative error of the graph's outputs. It costs one
structural copy and one run of the calibration batches per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from graphpress.graph.kind import clone, kind

from .._collect import collect
from .._linears import find_linears

__all__ = ["output_names", "run_outputs", "sensitivities"]

logger = logging.getLogger(__name__)


def output_names(graph) -> list[str]:
    """Names ``collect`` knows the graph's outputs by (ONNX values / FX nodes)."""
    if kind(graph) == "onnx":
        return [v.name for v in graph.graph.outputs]
    output = next(n for n in graph.graph.nodes if n.op == "output")
    return list(dict.fromkeys(n.name for n in tree_leaves(output.args[0])
                              if isinstance(n, fx.Node)))


def run_outputs(graph, batches: Any) -> dict[int, list[np.ndarray]]:
    """Every float output of ``graph`` on every batch (in batch order), keyed by the output's
    position: a factored FX output node gets a new name, its position stays."""
    names = output_names(graph)
    position = {name: index for index, name in enumerate(names)}
    found: dict[int, list[np.ndarray]] = {}

    def consume(name: str, array: np.ndarray) -> None:
        if np.issubdtype(array.dtype, np.floating):
            found.setdefault(position[name], []).append(np.asarray(array, np.float64))

    with torch.inference_mode():
        collect(graph, batches, names, consume)
    return found


def _relative(ref: dict[int, list[np.ndarray]], got: dict[int, list[np.ndarray]]) -> float:
    num = den = 0.0
    for name, arrays in ref.items():
        for r, g in zip(arrays, got.get(name, [])):
            num += float(np.sum((g - r) ** 2))
            den += float(np.sum(r**2))
    return num / max(den, 1e-300)


def sensitivities(graph, batches: Any, exclude: tuple[str, ...], probes: list[tuple[
        int, np.ndarray, np.ndarray, float]], apply: Callable) -> list[float]:
    """``w_i`` for each probe ``(site index in find_linears(graph, exclude), A, B, e_i)``.

    ``apply(copy, site, a, b)`` factors ``site`` of the structural copy ``copy``.
    """
    reference = run_outputs(graph, batches)
    weights = []
    for index, a, b, predicted in probes:
        copy = clone(graph)
        site = find_linears(copy, exclude=exclude)[index]
        apply(copy, site, a, b)
        if kind(copy) == "fx":
            copy.recompile()
        measured = _relative(reference, run_outputs(copy, batches))
        weights.append(measured / max(predicted, 1e-12))
        logger.debug("sensitivity of %s: %.4g", site.name, weights[-1])
    return weights

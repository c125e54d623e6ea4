"""Materialise the pipeline stages a pass annotated: one self-contained graph per stage.

Every operator node carries a stage index (FX ``node.meta[annotation]``, ONNX
``metadata_props[annotation]``, written by ``partition-pipeline``; ``shard-tensor-parallel``
writes ``"graphpress.segment"`` for the same splitter). Indices must be non-decreasing in
graph order; a node without one inherits the index of the node before it.

Liveness decides what crosses a boundary. A value is *defined* in stage ``d`` (graph inputs:
stage 0, which takes them all) and *last used* in stage ``u`` (the largest stage of a node
reading it, ``S`` for a graph output). It crosses boundary ``k`` (into stage ``k``) iff
``d < k ≤ u``: so a skip connection over a stage, a graph input read late (an attention mask
in every layer) and an output produced early are threaded through the stages in between.
Stage ``k > 0`` takes the values crossing boundary ``k`` in graph order; stage ``k`` returns
those crossing ``k + 1``; the last stage returns the graph outputs in order (FX: the
flattened output's node leaves). Constants never cross: every stage that reads one refers to
the same tensor (FX ``get_attr`` re-created on a module sharing the parameters; ONNX
initializers and ``Constant`` nodes kept in each stage's model). Nor do values computed from
constants alone (:func:`graphpress.graph.costs.constant_only`: FX dequantisation chains, an
ONNX ``Transpose`` of a weight): their nodes are copied into every stage that reads them
(the last stage also takes those the graph returns), whatever their own annotation, so a
dequantised weight is recomputed from the shared stored tensors instead of sent with every
microbatch. Only tensors may cross.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import onnx_ir as ir
from torch import fx

from graphpress.graph.costs import ValueInfo
from graphpress.graph.errors import UnsupportedGraphError
from graphpress.graph.kind import kind

__all__ = ["Stage", "split_stages", "STAGE_KEY", "PIPELINE_KEY"]

logger = logging.getLogger(__name__)

#: Node annotation written by ``partition-pipeline`` and read by :func:`split_stages`.
STAGE_KEY = "graphpress.stage"
#: Graph-level JSON plan of ``partition-pipeline`` (FX ``gm.meta``, ONNX ``model.metadata_props``).
PIPELINE_KEY = "graphpress.pipeline"


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a graph taking ``inputs`` and returning ``outputs`` (in order).

    ``graph`` is an ``fx.GraphModule`` whose ``forward(*inputs)`` returns a tuple of tensors,
    or an ``onnx_ir.Model`` whose graph inputs/outputs are named as in the source graph.
    """

    index: int
    graph: fx.GraphModule | ir.Model
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]


def split_stages(graph, *, annotation: str = STAGE_KEY) -> list[Stage]:
    """One :class:`Stage` per stage index in ``graph``'s ``annotation``; ``graph`` is unchanged.

    Raises :class:`UnsupportedGraphError` if no node is annotated, indices decrease along the
    graph, or a non-tensor value would cross a boundary.
    """
    if kind(graph) == "fx":
        from ._split_fx import split_fx

        return split_fx(graph, annotation)
    from ._split_onnx import split_onnx

    return split_onnx(graph, annotation)


def stage_indices(items: Sequence[tuple[str, object]], annotation: str) -> list[int]:
    """Stage of each ``(name, raw annotation or None)`` in graph order (inheriting, checked)."""
    stages, current, seen = [], 0, False
    for name, raw in items:
        if raw is not None:
            try:
                index = int(raw)
            except (TypeError, ValueError):
                raise UnsupportedGraphError(
                    f"node {name!r} has {annotation}={raw!r}, not a stage index; re-run the "
                    "partitioning pass") from None
            if index < current:
                raise UnsupportedGraphError(
                    f"node {name!r} is in stage {index} after a node of stage {current}: stages "
                    "must be contiguous in graph order; re-run partition-pipeline")
            current, seen = index, True
        stages.append(current)
    if not seen:
        raise UnsupportedGraphError(
            f"no node carries the {annotation!r} annotation; run partition-pipeline first "
            "(e.g. optimize(graph, ['partition-pipeline:stages=2'])) or pass the annotation "
            "name the partitioning pass wrote")
    return stages


def crossings(
    order: Sequence[Hashable], defined: Mapping[Hashable, int], last_use: Mapping[Hashable, int],
    stages: int,
) -> list[list[Hashable]]:
    """``live[k]``: the values crossing boundary ``k`` (``d < k ≤ u``), in ``order``; ``live[0]``
    is empty (stage 0 takes the graph inputs)."""
    live: list[list[Hashable]] = [[] for _ in range(stages)]
    for value in order:
        for k in range(defined[value] + 1, min(last_use.get(value, -1), stages - 1) + 1):
            live[k].append(value)
    return live


def non_tensor_error(name: str, boundary: int, what: str) -> UnsupportedGraphError:
    return UnsupportedGraphError(
        f"value {name!r} ({what}) would cross into stage {boundary}, but only tensors may cross "
        "a stage boundary; re-run partition-pipeline (it only cuts where tensors alone are "
        "live) or move the cut so that the value is produced and used in one stage")

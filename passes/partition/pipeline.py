"""partition-pipeline: split a graph into contiguous pipeline stages (annotation only).

The graph's cost table (:func:`graphpress.graph.costs.node_costs`) gives per-node costs and the
bytes live across each cut (``_pipeline_costs``; constant-only chains are re-created in every
stage that reads them, so they are planned with their readers and never cross a boundary);
``_stage_plan`` finds the split into
``stages`` contiguous stages whose most expensive stage is as cheap as possible (proven
optimal), and among those the one sending the fewest bytes across boundaries, never cutting
where a non-tensor value is live. The pass only annotates; ``graphpress.export.split_stages``
materialises the stages. The computation is unchanged, so ``modified`` reports whether the
annotations changed: running the pass again with the same options is a no-op
(``modified=False``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import onnx_ir as ir
from torch import fx

from graphpress.export.stages import PIPELINE_KEY as PLAN_KEY
from graphpress.export.stages import STAGE_KEY
from graphpress.graph.costs import node_costs
from graphpress.graph.kind import Graph, kind
from graphpress.graph.memory import kv_cache_by_node

from ..base import Pass, PassResult, PassSpecError, PostconditionError, PreconditionError
from ..registry import register
from ._pipeline_costs import pipeline_costs, stage_rows
from ._stage_plan import allowed_cuts, mixed_costs, plan_stages

__all__ = ["PartitionPipeline", "STAGE_KEY", "PLAN_KEY"]

logger = logging.getLogger(__name__)

_NOT_COMPUTE = ("placeholder", "get_attr", "output")


@register
@dataclass(frozen=True)
class PartitionPipeline(Pass):
    """Annotate contiguous pipeline stages that minimise the largest stage, then the traffic.

    **Rules**
      1. Node costs: ``cost=flops``; ``memory``: what a stage keeps resident, the bytes of the
         constants a node reads first (a shared or tied weight once) plus, for causal
         attention, its KV-cache share ``2·kv_heads·head_dim·bytes·batch·seq`` (batch and seq
         from the token input's static shape or ``dims``); activations are transient and only
         reported (``activation_peak`` per stage); ``mixed``
         (``mix·flops/Σflops + (1−mix)·memory/Σmemory``).
      2. Constant-only nodes (computed from constants alone: dequantisation chains, a
         ``Transpose`` of a weight) are not placed: their FLOPs and constants count for their
         first reader, and ``split_stages`` re-creates them in every stage that reads them.
      3. A cut is allowed only where every live value is a tensor; its size is the bytes of
         the values live across it (skips, late-used inputs and early outputs included;
         constant-only values never).
      4. The split minimises the largest stage cost exactly, then maximises the smallest (no
         stage left nearly empty when one heavy node fixes the optimum); among splits within
         ``slack`` of both it minimises the total boundary bytes.
      5. Every operator node gets its stage index (FX ``node.meta["graphpress.stage"]``; ONNX
         ``metadata_props``; ``Constant`` nodes take the stage of the node before them,
         constant-only nodes that of the next placed node); the plan is JSON in FX
         ``gm.meta["graphpress.pipeline"]`` / ONNX ``model.metadata_props["graphpress.pipeline"]``.

    ``dims`` binds symbolic dimensions (``dims=batch=2|seq=128``). **Requires** ``stages - 1``
    allowed cuts. **Ensures** every operator node carries a stage index, non-decreasing in
    graph order; the computation is unchanged.
    """

    name: ClassVar[str] = "partition-pipeline"
    stages: int = 2
    cost: Literal["flops", "memory", "mixed"] = "flops"
    slack: float = 0.0
    mix: float = 0.5
    dims: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise PassSpecError(f"partition-pipeline: stages={self.stages} must be ≥ 1 "
                                "(e.g. partition-pipeline:stages=4)")
        if self.slack < 0:
            raise PassSpecError(f"partition-pipeline: slack={self.slack} must be ≥ 0 (a fraction "
                                "of the optimal largest stage, e.g. slack=0.05)")
        if not 0.0 <= self.mix <= 1.0:
            raise PassSpecError(f"partition-pipeline: mix={self.mix} must be in [0, 1] (the "
                                "weight of FLOPs in cost=mixed)")
        self.dim_values()

    def dim_values(self) -> dict[str, int]:
        """``dims`` as a mapping (``("batch=2", "seq=128")`` → ``{"batch": 2, "seq": 128}``)."""
        found = {}
        for item in self.dims:
            key, sep, raw = str(item).partition("=")
            try:
                found[key.strip()] = int(raw)
            except ValueError:
                sep = ""
            if not sep or not key.strip():
                raise PassSpecError(f"partition-pipeline: dims item {item!r} must be name=int, "
                                    "e.g. dims=batch=2|seq=128")
        return found

    def run_fx(self, gm: fx.GraphModule) -> PassResult:
        return self._run(gm)

    def run_onnx(self, model: ir.Model) -> PassResult:
        return self._run(model)

    def _run(self, graph: Graph) -> PassResult:
        dims = self.dim_values() or None
        costs = pipeline_costs(node_costs(graph, dims=dims), kv_cache_by_node(graph, dims=dims))
        if self.stages - 1 > allowed_cuts(costs.boundary):
            raise PreconditionError(
                f"partition-pipeline: {self.stages} stages need {self.stages - 1} cuts, but this "
                f"graph of {len(costs.order)} placed operator nodes has only "
                f"{allowed_cuts(costs.boundary)} places where only tensors are live; use "
                f"stages={allowed_cuts(costs.boundary) + 1} or fewer")
        per_node = {"flops": costs.flops, "memory": costs.memory}.get(self.cost)
        if per_node is None:
            per_node = mixed_costs(costs.flops, costs.memory, self.mix)
        plan = plan_stages(per_node, costs.boundary, self.stages, slack=self.slack)
        names = [node.name for node in costs.table.nodes]
        stages = _every_node(plan.stage_of(len(costs.order)), costs.order, len(names))
        summary = json.dumps({
            "stages": plan.stages, "cost": self.cost, "stage_costs": list(plan.stage_costs),
            "boundary_bytes": list(plan.boundary_bytes), "optimum": plan.optimum,
            "lower_bound": plan.lower_bound, "floor": plan.floor,
            "cuts": [names[costs.order[j]] for j in plan.cuts],
        })
        if kind(graph) == "fx":
            modified = _annotate_fx(graph, dict(zip(names, stages)), summary)
        else:
            modified = _annotate_onnx(graph, stages, summary)
        stats = {
            "stages": plan.stages, "max_stage_cost": plan.max_cost, "optimum": plan.optimum,
            "imbalance": plan.imbalance, "lower_bound": plan.lower_bound,
            "boundary_bytes_total": plan.boundary_total,
        }
        rows = stage_rows(costs, plan.cuts, plan.stage_costs)
        logger.debug("partition-pipeline: %s", summary)
        return PassResult(graph, modified, stats, tuple(rows))

    def ensures(self, graph: Graph) -> None:
        if kind(graph) == "fx":
            marks = [(n.name, n.meta.get(STAGE_KEY))
                     for n in graph.graph.nodes if n.op not in _NOT_COMPUTE]
        else:
            marks = [(n.name, n.metadata_props.get(STAGE_KEY)) for n in graph.graph]
        previous = 0
        for name, mark in marks:
            if mark is None or int(mark) < previous:
                raise PostconditionError(f"partition-pipeline left node {name!r} with stage "
                                         f"{mark!r} after stage {previous}")
            previous = int(mark)


def _every_node(placed: list[int], order: tuple[int, ...], count: int) -> list[int]:
    """Rule 5: the stage of every table node; a constant-only node takes the stage of the next
    placed node (the last stage when none follows)."""
    stages, last = [-1] * count, placed[-1] if placed else 0
    for stage, index in zip(placed, order):
        stages[index] = stage
    for index in range(count - 1, -1, -1):
        if stages[index] < 0:
            stages[index] = last
        last = stages[index]
    return stages


def _annotate_fx(gm: fx.GraphModule, stage_of: dict[str, int], summary: str) -> bool:
    """Rule 5 on FX; True if any annotation changed."""
    changed, current = gm.meta.get(PLAN_KEY) != summary, 0
    for node in gm.graph.nodes:
        if node.op in _NOT_COMPUTE:
            continue
        current = stage_of.get(node.name, current)  # a node outside the table: the one before
        changed |= node.meta.get(STAGE_KEY) != current
        node.meta[STAGE_KEY] = current
    gm.meta[PLAN_KEY] = summary
    return changed


def _annotate_onnx(model: ir.Model, stages: list[int], summary: str) -> bool:
    """Rule 5 on ONNX (``stages``: one per table node, i.e. per non-``Constant`` node in order);
    True if any annotation changed."""
    changed, current, row = model.metadata_props.get(PLAN_KEY) != summary, 0, 0
    for node in model.graph:
        if not (node.op_type == "Constant" and node.domain in ("", "ai.onnx")):
            current, row = stages[row], row + 1
        changed |= node.metadata_props.get(STAGE_KEY) != str(current)
        node.metadata_props[STAGE_KEY] = str(current)
    model.metadata_props[PLAN_KEY] = summary
    return changed

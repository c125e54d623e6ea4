"""shard-sequence-parallel: run the per-token regions between tensor-parallel collectives on
sequence shards (Megatron sequence parallelism), as annotations.

Under tensor parallelism the norms, dropouts and residual adds between a row-parallel output
and the next column-parallel input run on the full, replicated activations on every rank.
Split along the token axis instead, each rank normalises ``1/W`` of the tokens and holds
``1/W`` of those activations: the all-reduce becomes a **reduce-scatter** (the same bytes
on the wire: an all-reduce *is* reduce-scatter + all-gather) and an **all-gather** moves to
where the next column-parallel linear needs the whole sequence. Regions are found by
:mod:`._sp_regions`; the numbers are unchanged (each token's computation is the same).

The pass annotates ``graphpress.collective`` = ``reduce_scatter`` on the entry points and
``all_gather`` on the producers of exit values (with ``graphpress.collective_dim``),
``scatter`` on outside producers whose token-carrying values enter a region (a local split),
and writes the plan ``graphpress.sequence_parallel``. ``tensor_parallel_plan`` then gives the
norm (and dropout) modules ``sequence`` and switches the layouts of the others to sequence
sharding, when every region fits PyTorch's styles (``torch`` in the plan: no scatter entries,
every exit feeds column-parallel inputs, every tensor-parallel module borders a region).
``shard()`` materialises the regions in FX shards (:mod:`._sp_shard_fx`); ONNX shards keep
the tensor-parallel all-reduces (the same numbers, without the activation saving).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from graphpress.export.shards import COLLECTIVE_DIM_KEY, COLLECTIVE_KEY, SP_PLAN_KEY
from graphpress.graph.errors import PostconditionError

from .._rewrite import require_canonical
from ..base import Pass, PassResult
from ..registry import register
from ._sp_regions import find_regions
from ._sp_view import sp_view
from ._tp_annotate import get_note, node_items, read_plan, require_plan, set_note, write_plan
from ._tp_graph import GraphReader

__all__ = ["ShardSequenceParallel"]

logger = logging.getLogger(__name__)

_DROPOUTS = {"aten.dropout", "Dropout"}


@register
@dataclass(frozen=True)
class ShardSequenceParallel(Pass):
    """Mark the per-token regions of a tensor-parallel graph as sequence-parallel.

    **Rules**
      1. A region grows from each all-reduce point of ``shard-tensor-parallel`` over
         per-token nodes (element-wise ops, casts, dropout, norms and keep-dim statistics over
         the hidden axis), forward and backward (residual adds join consecutive blocks).
      2. Its entry points become ``reduce_scatter`` along the token axis (``rank − 2``);
         producers of values leaving it become ``all_gather``; outside values entering it
         with a token axis become ``scatter`` (a local split).
      3. A region without per-token nodes, whose point output leaves it at once, with mixed
         ranks or a sequence length not divisible by the world size keeps its all-reduces.
      4. The plan (``graphpress.sequence_parallel``) lists the regions, their collectives,
         the norm/dropout modules and whether PyTorch's styles express it (``torch``).

    **Requires** a graph annotated by ``shard-tensor-parallel``. **Ensures** only
    annotations changed; every entry of a sequence-parallel region has a reduce-scatter.
    """

    name: ClassVar[str] = "shard-sequence-parallel"

    def requires(self, graph) -> None:
        require_canonical(graph)
        require_plan(graph, self.name)

    def run_fx(self, gm) -> PassResult:
        return self._run(gm)

    def run_onnx(self, model) -> PassResult:
        return self._run(model)

    def _run(self, graph) -> PassResult:
        plan = require_plan(graph, self.name)
        world, roles = plan["world_size"], plan["roles"]
        reader = GraphReader(graph)
        view = sp_view(graph, reader)
        points = set(plan["all_reduces"])
        tp_nodes = {n for n, r in roles.items() if r != "replicated"}
        regions = find_regions(view, points, tp_nodes, world)
        nodes = dict(node_items(graph))
        done = [r for r in regions if r.ok]
        for region in done:  # Rule 2
            for point in region.entries:
                set_note(nodes[point], COLLECTIVE_KEY, "reduce_scatter")
                set_note(nodes[point], COLLECTIVE_DIM_KEY, region.dim)
            for value in (*region.exits, *region.scatters):
                producer = view.producer.get(value)
                if producer in nodes:
                    kind = "all_gather" if value in region.exits else "scatter"
                    set_note(nodes[producer], COLLECTIVE_KEY, kind)
                    set_note(nodes[producer], COLLECTIVE_DIM_KEY, region.dim)
        norm_modules = sorted({view.nodes[n].module for r in done for n in r.nodes
                               if (view.nodes[n].norm or view.nodes[n].op in _DROPOUTS)
                               and view.nodes[n].module})
        torch_ok, why = _torch_expressible(regions, view, roles)
        sp = {"regions": [{"nodes": r.nodes, "entries": r.entries, "exits": sorted(r.exits),
                           "scatters": r.scatters, "dim": r.dim, "reason": r.reason}
                          for r in regions],
              "reduce_scatters": [p for r in done for p in r.entries],
              "all_gathers": sorted({view.producer.get(v, v) for r in done for v in r.exits}),
              "scatters": [v for r in done for v in r.scatters],
              "norm_modules": norm_modules, "sequence_dim": _dim(done), "torch": torch_ok,
              "torch_reason": why}
        write_plan(graph, SP_PLAN_KEY, sp)  # Rule 4
        stats = {"regions": len(regions), "regions_sequence_parallel": len(done),
                 "reduce_scatters": len(sp["reduce_scatters"]),
                 "all_gathers": len(sp["all_gathers"]), "scatters": len(sp["scatters"]),
                 "sequence_modules": len(norm_modules), "torch_plan": int(torch_ok)}
        for region in regions:
            if region.reason:
                logger.debug("region at %s keeps all-reduces: %s", region.entries, region.reason)
        return PassResult(graph, bool(done), stats)

    def ensures(self, graph) -> None:
        nodes = dict(node_items(graph))
        for name in (read_plan(graph, SP_PLAN_KEY) or {}).get("reduce_scatters", []):
            if get_note(nodes[name], COLLECTIVE_KEY) != "reduce_scatter":
                raise PostconditionError(f"{self.name}: {name!r} lost its reduce_scatter")


def _dim(regions) -> int | None:
    dims = {r.dim for r in regions}
    return dims.pop() if len(dims) == 1 else None


def _torch_expressible(regions, view, roles: dict) -> tuple[bool, str]:
    """Whether ``parallelize_module`` styles express the split (see the module docstring)."""
    if not regions or any(not r.ok for r in regions):
        return False, "some region keeps its all-reduces"
    if _dim(regions) is None:
        return False, "regions disagree on the token axis"
    if any(r.scatters for r in regions):
        return False, "a value without a collective enters a region (it needs a local split)"
    entries = {p for r in regions for p in r.entries}
    exit_values = {v for r in regions for v in r.exits}
    for r in regions:
        for readers in r.exits.values():
            if any(roles.get(u) not in ("column", "vocab_column") for u in readers):
                return False, "a region ends elsewhere than at a column-parallel linear"
    for node, role in roles.items():
        if role in ("row", "vocab_row") and node not in entries:
            return False, f"row-parallel {node} does not start a region"
        if role in ("column", "vocab_column") and not set(view.nodes[node].ins) & exit_values:
            return False, f"column-parallel {node} does not read a region's exit"
    return True, ""

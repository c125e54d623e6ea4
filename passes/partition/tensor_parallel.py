"""shard-tensor-parallel: Megatron tensor parallelism found on the graph, as annotations.

The pairs come from the coupled channel groups (:mod:`._tp_groups`): the producers of an FFN
or attention group are column-parallel, its consumers row-parallel, and each consumer's output
is a partial sum that ONE all-reduce completes. A transformer layer has two such groups
(attention heads, FFN neurons), hence exactly two all-reduces per layer in forward. The
vocabulary embedding (masked lookup of the local rows, then an all-reduce) and the LM head
(column-parallel, then an all-gather of the logits) are vocab-parallel (:mod:`._tp_vocab`).

Quantized graphs shard the same way: the channel groups see through Q/DQ weights,
``DynamicQuantizeMatMul``, ``MatMulNBits`` and the FX quantization ops, so scales and zero
points are sliced with their channels, block-quantized row-parallel weights split only at block
boundaries, and the run-time activation range of dynamic quantization is combined over the
ranks (``ranges`` in the plan), which keeps every rank's arithmetic that of the unsharded graph.

Per rank, a sharded tensor holds ``1/W`` of its elements; everything else is replicated. The
pass only annotates; :func:`graphpress.passes.partition.shard.shard` materialises rank ``r``,
and :func:`tensor_parallel_plan` / :func:`to_torch_plan` give the same split to PyTorch's
``parallelize_module``.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from graphpress.export.shards import (
    COLLECTIVE_DIM_KEY,
    COLLECTIVE_KEY,
    PLAN_KEY,
    SHARD_KEY,
    SP_PLAN_KEY,
    TP_KEY,
)
from graphpress.graph.analysis import fx_tensor_attrs, onnx_constants
from graphpress.graph.errors import PassSpecError, PostconditionError, PreconditionError
from graphpress.graph.kind import kind

from .._rewrite import require_canonical
from ..base import Pass, PassResult
from ..registry import register
from ._tp_annotate import (
    clear_notes,
    drop_plan,
    get_note,
    node_items,
    read_plan,
    set_note,
    write_plan,
)
from ._tp_graph import GraphReader
from ._tp_groups import plan_groups
from ._tp_torch import tensor_parallel_plan, to_torch_plan
from ._tp_vocab import find_vocab

__all__ = ["ShardTensorParallel", "tensor_parallel_plan", "to_torch_plan", "check_world_size"]

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def check_world_size(world_size: object, who: str) -> int:
    """``world_size`` if it is a positive integer, else :class:`PassSpecError`."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise PassSpecError(f"{who}: world_size={world_size!r} must be a positive integer (the "
                            "number of tensor-parallel ranks, e.g. world_size=2)")
    return world_size


@register
@dataclass(frozen=True)
class ShardTensorParallel(Pass):
    """Annotate a Megatron tensor-parallel split over ``world_size`` ranks.

    **Rules**
      1. Every FFN and attention channel group whose producers and consumers are linear
         layers is a pair: producers ``column``, consumers ``row`` (``graphpress.tp``), and
         each consumer's output needs an ``all_reduce`` (``graphpress.collective``).
         Grouped-query attention splits whole kv heads with their query heads.
      2. A group whose unit count (neurons, heads, kv heads) does not divide by
         ``world_size``, or that a collective-free split cannot express, stays
         ``replicated``; the plan records why.
      3. With ``vocab``: the vocabulary embedding is ``vocab_row`` (masked lookup of the
         local rows + ``all_reduce``) and an LM head producing a graph output with ``V``
         channels (or the tied weight) is ``vocab_column`` (+ ``all_gather`` along the last
         axis), when ``V`` divides by ``world_size`` (float tables and heads only).
      5. Quantized layers pair like float ones (``channel_groups`` sees through Q/DQ,
         ``DynamicQuantizeMatMul``, ``MatMulNBits`` and the FX quantization ops); a sharded
         group's run-time min/max nodes (dynamic activation quantization, ``"range"`` uses)
         are listed in ``ranges`` and combined over the ranks (min/max) when materialised.
      4. The graph-level plan (``graphpress.tensor_parallel``, JSON) lists the groups, the
         vocab sites, the collective points, the all-reduces per layer (layer = the module
         path up to its first index, ``encoder.layer.0``) and the parameter split.

    **Requires** an aten-dialect FX graph or ONNX, not already a materialised shard.
    **Ensures** nothing but annotations changed; every row node carries its all-reduce.
    """

    name: ClassVar[str] = "shard-tensor-parallel"
    world_size: int = 2
    vocab: bool = True

    def __post_init__(self) -> None:
        check_world_size(self.world_size, self.name)

    def requires(self, graph) -> None:
        require_canonical(graph)
        if read_plan(graph, SHARD_KEY) is not None:
            raise PreconditionError(f"{self.name}: this graph is already one rank's shard; "
                                    "annotate the unsharded graph")

    def run_fx(self, gm) -> PassResult:
        return self._run(gm)

    def run_onnx(self, model) -> PassResult:
        return self._run(model)

    def _run(self, graph) -> PassResult:
        reader = GraphReader(graph)
        groups = plan_groups(graph, self.world_size, reader)
        sharded = [g for g in groups if g.sharded]
        taken = {n for g in sharded for n in (*g.columns, *g.rows)}
        vocab = find_vocab(reader, self.world_size, taken) if self.vocab else []
        if not groups and not vocab:
            return PassResult(graph, False, {"groups_sharded": 0, "groups_replicated": 0,
                                             "all_reduces": 0})
        clear_notes(graph)
        nodes = dict(node_items(graph))
        roles: dict[str, tuple[str, str]] = {}
        for g in groups:  # Rule 2 first: sharded roles below overwrite replicated ones
            if not g.sharded:
                roles.update((n, ("replicated", g.id)) for n in (*g.columns, *g.rows))
        for g in sharded:  # Rule 1
            roles.update((n, ("column", g.id)) for n in g.columns)
            roles.update((n, ("row", g.id)) for n in g.rows)
        for site in vocab:  # Rule 3
            roles[site.node] = (site.role if site.sharded else "replicated", site.node)
        ranges = {u.node: reader.range_of(u.node) for g in sharded for u in g.uses
                  if u.role == "range"}  # Rule 5
        reduces = [n for g in sharded for n in g.rows]
        reduces += [s.node for s in vocab if s.sharded and s.role == "vocab_row"]
        gathers = [s.node for s in vocab if s.sharded and s.role == "vocab_column"]
        for name, (role, group) in roles.items():
            set_note(nodes[name], TP_KEY, {"role": role, "group": group})
        for name in reduces:
            set_note(nodes[name], COLLECTIVE_KEY, "all_reduce")
        for name in gathers:
            set_note(nodes[name], COLLECTIVE_KEY, "all_gather")
            set_note(nodes[name], COLLECTIVE_DIM_KEY, -1)
        modules = {n: reader.module_of(n, _weight_of(reader, n)) for n in roles}
        per_layer = Counter(_layer(modules.get(n) or reader.upstream_module(n)) for n in reduces)
        per_layer.pop("", None)  # model-level collectives (the embedding's) are no layer's
        params = _parameters(graph, groups, vocab, self.world_size, reader)
        stats = {"groups_sharded": len(sharded), "groups_replicated": len(groups) - len(sharded),
                 "vocab_sharded": sum(s.sharded for s in vocab), "all_reduces": len(reduces),
                 "all_gathers": len(gathers), "range_syncs": len(ranges),
                 "layers": len(per_layer),
                 "all_reduces_per_layer": max(per_layer.values(), default=0), **params}
        plan = {"world_size": self.world_size, "groups": [g.to_json() for g in groups],
                "vocab": [s.to_json() for s in vocab], "all_reduces": reduces,
                "all_gathers": [[n, -1] for n in gathers],
                "ranges": [list(item) for item in ranges.items()],
                "modules": modules,
                "roles": {n: r for n, (r, _) in roles.items()},
                "all_reduces_per_layer": dict(per_layer), "stats": stats}
        write_plan(graph, PLAN_KEY, plan)  # Rule 4
        drop_plan(graph, SP_PLAN_KEY)  # a sequence-parallel plan of an earlier split is stale
        rows = tuple({"layer": g.id, "kind": g.kind, "units": g.units, "sharded": g.sharded,
                      "params": g.params} for g in groups)
        return PassResult(graph, True, stats, layers=rows)

    def ensures(self, graph) -> None:
        plan = read_plan(graph, PLAN_KEY)
        nodes = dict(node_items(graph))
        for name in plan["all_reduces"]:
            if get_note(nodes[name], COLLECTIVE_KEY) != "all_reduce":
                raise PostconditionError(f"{self.name}: row-parallel node {name!r} lost its "
                                         "all_reduce annotation")


def _weight_of(reader: GraphReader, node: str) -> str:
    site, layer = reader.linears.get(node), reader.layers.get(node)
    return site.name if site is not None else (layer.tensor if layer is not None else "")


def _layer(module: str | None) -> str:
    match = _LAYER.match(module or "")
    return match.group(1) if match else ""


def _parameters(graph, groups, vocab, world: int, reader: GraphReader) -> dict[str, float]:
    """Elements and bytes in total and per rank: a tensor any sharded use slices holds
    ``1/W`` of itself on each rank (row-parallel biases count as replicated; the scales and
    zero points of block-quantized codes go with them)."""
    split = {u.tensor for g in groups if g.sharded for u in g.uses
             if u.tensor and u.role in ("out", "in", "act")}
    split.update(part for g in groups if g.sharded for n in (*g.columns, *g.rows)
                 for part in reader.packed_parts(n))
    split |= {s.tensor for s in vocab if s.sharded}
    tensors: dict[int, tuple[int, int, bool]] = {}  # id -> (elements, bytes, sharded)
    if kind(graph) == "fx":
        for name, t in fx_tensor_attrs(graph).items():  # tied weights once, by identity
            old = tensors.get(id(t), (0, 0, False))[2]
            tensors[id(t)] = (t.numel(), t.numel() * t.element_size(), old or name in split)
    else:
        for name, t in onnx_constants(graph).items():
            tensors[id(t)] = (t.size, t.nbytes, name in split)
    total = sum(n for n, _, _ in tensors.values())
    total_bytes = sum(b for _, b, _ in tensors.values())
    per_rank = sum(n // world if cut else n for n, _, cut in tensors.values())
    per_rank_bytes = sum(b // world if cut else b for _, b, cut in tensors.values())
    return {"params_total": total, "params_per_rank": per_rank, "bytes_total": total_bytes,
            "bytes_per_rank": per_rank_bytes}

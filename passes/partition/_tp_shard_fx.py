"""Materialise rank ``r`` of an FX graph annotated by ``shard-tensor-parallel``.

On a structural copy (weights shared): every sharded group is sliced to the rank's units by
the pruning shrinker (weights, biases, reshape entries); row-parallel biases stay on rank 0
only (``linear(x, W, b)`` → ``linear(x, W)``, ``addmm(b, x, W)`` → ``mm(x, W)`` elsewhere), so
the all-reduced sum counts them once. The vocabulary embedding looks up the rank's rows:
``ids`` outside ``[v0, v1)`` read row 0 and their rows are zeroed, so the all-reduce adds
exactly one real row per token. The LM head computes the rank's logits; an all-gather along the
last axis gives the full vocabulary.

A dynamic-quantization range node of a sharded group (``aten.min``/``aten.max`` of the local
channels, plan ``ranges``) is combined over the ranks (one ``max`` all-reduce of
``[−min, max]`` for a min/max pair of one tensor), so every rank quantizes with the range of
the whole tensor, as the unsharded graph does.

Collectives are PyTorch's functional ones (:mod:`._fx_collectives`) on the process group NAMED
``group`` (``ProcessGroup.group_name``): the shard is an ordinary ``nn.Module`` that runs
under ``torch.distributed`` and can be cut into pipeline stages (new nodes copy the
``graphpress.stage`` of the node they follow). With a ``shard-sequence-parallel`` plan the
sequence-parallel regions are materialised too (:mod:`._sp_shard_fx`).
"""

from __future__ import annotations

import logging

import torch
from torch import fx

from graphpress.export.shards import SEGMENT_KEY
from graphpress.graph.fx import add_tensor, get_tensor, mark

from ..prune._shrink_fx import FxShrinker
from ._fx_collectives import PASS, all_reduce, along, call
from ._sp_shard_fx import sequence_parallel_fx
from ._tp_groups import TpGroup
from ._tp_slices import rank_slices, vocab_rows
from ._tp_vocab import VocabSite

__all__ = ["shard_fx"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_c10d = torch.ops._c10d_functional


def shard_fx(gm: fx.GraphModule, plan: dict, rank: int, group: str,
             sequence: dict | None = None) -> fx.GraphModule:
    """Rank ``rank``'s sharded module (``gm`` itself is modified: pass a copy); with the
    ``shard-sequence-parallel`` plan ``sequence``, its regions run on token slices."""
    world = plan["world_size"]
    nodes = {n.name: n for n in gm.graph.nodes}
    shrinker = FxShrinker(gm, PASS, tag="tp")
    for data in plan["groups"]:
        group_ = TpGroup.from_json(data)
        if group_.sharded:
            for sub, keep in rank_slices(group_, rank, world):
                shrinker.shrink(sub, keep)
    reduce_after = {name: nodes[name] for name in plan["all_reduces"]}
    gather_after = {}
    sliced: dict[tuple[str, int], fx.Node] = {}
    for site in map(VocabSite.from_json, plan["vocab"]):
        if not site.sharded:
            continue
        rows = vocab_rows(site.vocab, rank, world)
        if site.role == "vocab_row":
            reduce_after[site.node] = _masked_lookup(gm, nodes[site.node], rows, sliced)
        else:
            gather_after[site.node] = _local_logits(gm, nodes[site.node], rows, sliced)
    _combine_ranges(gm.graph, [(nodes[name], op) for name, op in plan.get("ranges", ())], group)
    for node in gm.graph.nodes:  # replaced and never-read constants go (if unused)
        if node.op == "get_attr":
            shrinker.stale[node] = None
    if rank != 0:
        for data in plan["groups"]:
            for name in data["rows"] if data["sharded"] else ():
                _drop_bias(nodes[name])
    if sequence is not None:  # reduce-scatters replace the all-reduces they cover
        for name in sequence_parallel_fx(gm, sequence, reduce_after, rank, world, group):
            reduce_after.pop(name)
    for node in reduce_after.values():
        all_reduce(gm.graph, node, group)
    for node in gather_after.values():  # the vocabulary (last) axis of the logits
        along(gm.graph, node, "all_gather", node.meta["val"].dim() - 1, world, group)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            node.meta[SEGMENT_KEY] = 0
    shrinker.finish()  # drops replaced constants, recompiles, recomputes meta["val"]
    return gm


def _slice_rows(gm: fx.GraphModule, weight: fx.Node, rows: tuple[int, int], axis: int,
                sliced: dict) -> fx.Node:
    """A ``get_attr`` of ``weight``'s rows ``[start, stop)`` along ``axis`` (made once)."""
    key = (weight.target, axis)
    if key not in sliced:
        tensor = get_tensor(gm, weight)
        part = tensor.detach().narrow(axis, rows[0], rows[1] - rows[0]).clone()
        with gm.graph.inserting_before(weight):
            sliced[key] = mark(gm.graph.get_attr(add_tensor(gm, f"{weight.target}.tp", part)), PASS)
    return sliced[key]


def _masked_lookup(gm, node: fx.Node, rows: tuple[int, int], sliced: dict) -> fx.Node:
    graph, (weight, ids) = gm.graph, node.args[:2]
    local_weight = _slice_rows(gm, weight, rows, 0, sliced)
    with graph.inserting_before(node):
        below = call(graph, _aten.lt.Scalar, ids, rows[0], like=node)
        above = call(graph, _aten.ge.Scalar, ids, rows[1], like=node)
        outside = call(graph, _aten.logical_or.default, below, above, like=node)
        local = call(graph, _aten.sub.Tensor, ids, rows[0], like=node)
        safe = call(graph, _aten.masked_fill.Scalar, local, outside, 0, like=node)
    node.args = (local_weight, safe, *node.args[2:])
    with graph.inserting_after(node):
        mask = call(graph, _aten.unsqueeze.default, outside, -1, like=node)
    with graph.inserting_after(mask):
        zeroed = call(graph, _aten.masked_fill.Scalar, node, mask, 0.0, like=node)
    node.replace_all_uses_with(zeroed, delete_user_cb=lambda user: user is not zeroed)
    return zeroed


def _local_logits(gm, node: fx.Node, rows: tuple[int, int], sliced: dict) -> fx.Node:
    """Slice the LM head's weight (and bias) to the rank's vocabulary columns."""
    args = list(node.args)
    index, axis = {_aten.linear.default: (1, 0), _aten.addmm.default: (2, 1),
                   _aten.mm.default: (1, 1), _aten.matmul.default: (1, 1)}[node.target]
    weight = args[index]
    if weight.op != "get_attr":  # a transpose of the stored weight
        inner = weight.args[0]
        new = _slice_rows(gm, inner, rows, 1 - axis, sliced)
        with gm.graph.inserting_before(node):
            args[index] = call(gm.graph, weight.target, new, *weight.args[1:], like=node)
    else:
        args[index] = _slice_rows(gm, weight, rows, axis, sliced)
    bias_index = 2 if node.target is _aten.linear.default else 0
    if node.target in (_aten.linear.default, _aten.addmm.default) and len(args) > bias_index \
            and isinstance(args[bias_index], fx.Node):
        args[bias_index] = _slice_rows(gm, args[bias_index], rows, 0, sliced)
    node.args = tuple(args)
    return node


def _combine_ranges(graph: fx.Graph, ranges: list[tuple[fx.Node, str]], group: str) -> None:
    """Each range node (the min or max of the local channels) becomes the min/max over the
    ranks; a min and a max of the same tensor share one ``max`` all-reduce of ``[−min, max]``."""
    by_input: dict[fx.Node, dict[str, fx.Node]] = {}
    for node, op in ranges:
        by_input.setdefault(node.args[0], {})[op] = node
    order = {node: i for i, node in enumerate(graph.nodes)}
    for pair in by_input.values():
        readers = {node: list(node.users) for node in pair.values()}  # before any new node
        last = max(pair.values(), key=order.get)
        if len(pair) == 1:
            (op, node), = pair.items()
            new = {node: _all_reduce(graph, node, op, group, last)}
        else:
            lo, hi = pair["min"], pair["max"]
            first = min(lo, hi, key=order.get)
            last = hi if first is lo else lo
            first.append(last)  # both read one input: adjacent, before every reader
            with graph.inserting_after(last):
                neg = call(graph, _aten.neg.default, lo, like=last)
            with graph.inserting_after(neg):
                both = call(graph, _aten.stack.default, [neg, hi], like=last)
            done = _all_reduce(graph, both, "max", group, last)
            with graph.inserting_after(done):
                low = call(graph, _aten.select.int, done, 0, 0, like=last)
            with graph.inserting_after(low):
                high = call(graph, _aten.select.int, done, 0, 1, like=last)
            with graph.inserting_after(high):
                new = {lo: call(graph, _aten.neg.default, low, like=last), hi: high}
        for node, users in readers.items():
            for user in users:
                user.replace_input_with(node, new[node])


def _all_reduce(graph: fx.Graph, value: fx.Node, op: str, group: str, like: fx.Node) -> fx.Node:
    with graph.inserting_after(value):
        reduced = call(graph, _c10d.all_reduce.default, value, op, group, like=like)
    with graph.inserting_after(reduced):
        return call(graph, _c10d.wait_tensor.default, reduced, like=like)


def _drop_bias(node: fx.Node) -> None:
    if node.target is _aten.linear.default and len(node.args) > 2:
        node.args = node.args[:2]
    elif node.target is _aten.addmm.default:
        node.target, node.args = _aten.mm.default, node.args[1:3]
        node.kwargs = {}

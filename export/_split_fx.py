"""FX side of :func:`graphpress.export.split_stages`: one ``fx.GraphModule`` per stage.

Each stage is a fresh ``fx.Graph``: a placeholder per incoming value (named as the source
value), the stage's nodes copied with ``Graph.node_copy`` (their ``meta`` included), a
``get_attr`` re-created for every constant or submodule the stage reads, and an output tuple.
``fx.GraphModule(source, graph)`` binds the very objects those ``get_attr``/``call_module``
targets name on the source module, so the weights are shared, not copied. Constant-only nodes
(:func:`graphpress.graph.costs.constant_only`: dequantisation chains) ignore their annotation:
each stage copies the ones its nodes (or, in the last stage, the graph outputs) read.
"""

from __future__ import annotations

import logging

import torch
from torch import fx
from torch.utils import _pytree as pytree

from graphpress.graph._costs_fx import fx_values
from graphpress.graph.analysis import op_name
from graphpress.graph.costs import ValueInfo, constant_only
from graphpress.graph.fx import get_tensor

from .stages import Stage, crossings, non_tensor_error, stage_indices

__all__ = ["split_fx", "fx_value_info"]

logger = logging.getLogger(__name__)

_NOT_COMPUTE = ("placeholder", "get_attr", "output")


def fx_value_info(node: fx.Node, fallback: object = None) -> ValueInfo:
    """Name, concrete shape, dtype and bytes of ``node``'s example value (``meta["val"]``, else
    ``fallback``: the value shape propagation found for a node a pass added without one).

    A node without either is taken for a tensor of unknown shape (bytes 0).
    """
    value = node.meta.get("val", fallback)
    if value is None and "val" not in node.meta:
        return ValueInfo(node.name, None, None, 0, True)
    if not isinstance(value, torch.Tensor):
        return ValueInfo(node.name, None, None, 0, False)
    dtype = str(value.dtype).removeprefix("torch.")
    if not all(isinstance(d, int) for d in value.shape):
        return ValueInfo(node.name, None, dtype, 0, True)
    shape = tuple(int(d) for d in value.shape)
    return ValueInfo(node.name, shape, dtype, value.numel() * value.element_size(), True)


def split_fx(gm: fx.GraphModule, annotation: str) -> list[Stage]:
    nodes = list(gm.graph.nodes)
    chains = _constant_only(gm, nodes)
    compute = [n for n in nodes if n.op not in _NOT_COMPUTE and n not in chains]
    indices = stage_indices([(n.name, n.meta.get(annotation)) for n in compute], annotation)
    stage_of = dict(zip(compute, indices))
    count = max(indices, default=0) + 1
    inputs = [n for n in nodes if n.op == "placeholder"]
    outputs = _output_nodes(gm)
    defined = {**{n: 0 for n in inputs}, **stage_of}
    last_use: dict[fx.Node, int] = {}
    for node in compute:
        for source in node.all_input_nodes:
            if source in defined:
                last_use[source] = max(last_use.get(source, -1), stage_of[node])
    for node in outputs:
        if node in defined:
            last_use[node] = count  # needed after the last stage
    live = crossings([*inputs, *compute], defined, last_use, count)
    copies = _chain_stages(nodes, chains, stage_of, outputs, count)
    crossing = {*inputs, *outputs, *(v for k in live for v in k)}
    # nodes a pass added without meta["val"] (dequantisation chains): propagated on a copy
    vals = fx_values(gm) if any("val" not in n.meta for n in crossing) else {}
    infos = {n: fx_value_info(n, vals.get(n.name)) for n in crossing}
    for k in range(1, count):
        for node in live[k]:
            if not infos[node].is_tensor:
                raise non_tensor_error(node.name, k, type(node.meta.get("val")).__name__)
    stages = []
    for k in range(count):
        takes = inputs if k == 0 else live[k]
        gives = outputs if k == count - 1 else live[k + 1]
        members = [n for n in nodes if stage_of.get(n) == k or k in copies.get(n, ())]
        module = _stage_module(gm, k, takes, members, gives, vals)
        stages.append(Stage(k, module, tuple(infos[n] for n in takes),
                            tuple(infos[n] for n in gives)))
    logger.debug("split %s into %d FX stages", type(gm).__name__, count)
    return stages


def _constant_only(gm: fx.GraphModule, nodes: list[fx.Node]) -> set[fx.Node]:
    """Operator nodes computed from tensor constants (``get_attr``) alone (``constant_only``)."""
    def read(arg: fx.Node) -> object:
        return None if get_tensor(gm, arg) is not None else arg

    return constant_only((n, op_name(n), [read(a) for a in n.all_input_nodes])
                         for n in nodes if n.op not in _NOT_COMPUTE)


def _chain_stages(nodes: list[fx.Node], chains: set[fx.Node], stage_of: dict[fx.Node, int],
                  outputs: list[fx.Node], count: int) -> dict[fx.Node, set[int]]:
    """The stages each constant-only node is copied into: those of its readers (in reverse
    graph order, so a chain feeding a chain follows it), the last one for a graph output."""
    copies: dict[fx.Node, set[int]] = {n: set() for n in chains}
    for node in outputs:
        if node in copies:
            copies[node].add(count - 1)
    for node in reversed(nodes):
        where = copies[node] if node in copies else {stage_of[node]} if node in stage_of else ()
        for source in node.all_input_nodes:
            if source in copies:
                copies[source].update(where)
    return copies


def _output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph output's node leaves, flattened in order."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves = pytree.tree_leaves(out.args[0] if len(out.args) == 1 else out.args)
    return [leaf for leaf in leaves if isinstance(leaf, fx.Node)]


def _stage_module(
    gm: fx.GraphModule, index: int, takes: list[fx.Node], members: list[fx.Node],
    gives: list[fx.Node], vals: dict[str, object],
) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in takes:
        placeholder = graph.placeholder(node.name)
        placeholder.meta = dict(node.meta)
        if "val" not in node.meta and vals.get(node.name) is not None:
            placeholder.meta["val"] = vals[node.name]  # the stage can be costed on its own
        env[node] = placeholder

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op != "get_attr":
                raise AssertionError(f"{node.name} reaches stage {index} without crossing into it")
            env[node] = graph.get_attr(node.target)
            env[node].meta = dict(node.meta)
        return env[node]

    for node in members:
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(lookup(node) for node in gives))
    module = fx.GraphModule(gm, graph, class_name=f"Stage{index}")
    module.meta = {key: value for key, value in getattr(gm, "meta", {}).items()}
    module.meta["graphpress.stage.index"] = index
    return module

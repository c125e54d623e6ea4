"""FX adapter of the cost model: a :class:`CostTable` from an aten-level GraphModule.

Shapes and dtypes come from ``node.meta["val"]`` (the fake tensors ``torch.export`` records).
Nodes a pass added without one (quantized weight chains, for example) get theirs from
``FakeTensorProp`` run on a structural copy, so the caller's graph is never touched. An
output aliases an input when their fake tensors share storage (views, ``expand``, a no-op
``to``; a ``reshape`` that must copy does not), which mirrors eager PyTorch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

from . import _flops as F
from ._dims import DimBinder, Unbound
from .analysis import op_name
from .costs import CostTable, NodeCost, ValueInfo, unbound_error
from .kind import clone

__all__ = ["fx_costs", "fx_values"]

logger = logging.getLogger(__name__)

_SKIP = ("placeholder", "get_attr", "output")


def fx_costs(gm: fx.GraphModule, dims: Mapping[str, int] | None) -> CostTable:
    binder = DimBinder(dims)
    vals = fx_values(gm)
    canonical, constant_bytes = _constants(gm)
    _check_inputs(gm, vals, binder)
    infos: dict[str, ValueInfo] = {}
    inputs = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):  # get_attr: weight shapes for the rules
            infos[node.name] = _info(node.name, vals.get(node.name), binder)
        if node.op == "placeholder":
            inputs.append(infos[node.name])
    nodes, aliases, workspace = [], {}, {}
    for node in gm.graph.nodes:
        if node.op in _SKIP or (node.op == "call_module" and node.target == "_guards_fn"):
            continue
        info = infos[node.name] = _info(node.name, vals.get(node.name), binder)
        reads, consts = [], []
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                if arg.target in canonical and canonical[arg.target] not in consts:
                    consts.append(canonical[arg.target])
            elif arg.name not in reads:
                reads.append(arg.name)
        base = _alias(node, vals, canonical)
        if base is not None:
            aliases[node.name] = base
        extra = _workspace(node, info, vals)
        if extra:
            workspace[node.name] = extra
        nodes.append(NodeCost(
            name=node.name, op=op_name(node), flops=_flops(node, info, infos),
            inputs=tuple(reads), outputs=(info,), constants=tuple(consts),
        ))
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outputs = tuple(dict.fromkeys(
        n.name for n in tree_leaves(output.args[0]) if isinstance(n, fx.Node)
    ))
    return CostTable(tuple(nodes), tuple(inputs), outputs, constant_bytes, aliases, workspace)


def fx_values(gm: fx.GraphModule) -> dict[str, object]:
    """``meta["val"]`` by node name, recomputed on a copy when some operator node lacks one."""
    vals = {n.name: n.meta.get("val") for n in gm.graph.nodes}
    for node in gm.graph.nodes:  # a weight a pass added: its real tensor has the facts
        if node.op == "get_attr" and vals[node.name] is None:
            vals[node.name] = _attribute(gm, node.target)
    missing = [
        n for n in gm.graph.nodes
        if n.op == "call_function" and "val" not in n.meta
    ]
    if not missing:
        return vals
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    copy = clone(gm)
    placeholders = [n.meta.get("val") for n in copy.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(placeholders)
    try:
        if mode is None or any(v is None for v in placeholders):
            raise ValueError("the placeholders carry no fake values")
        with mode:
            FakeTensorProp(copy, mode=mode).propagate_dont_convert_inputs(*placeholders)
    except Exception as exc:  # noqa: BLE001 - any failure leaves those shapes unknown
        logger.debug("FakeTensorProp failed (%s): %d nodes without shapes", exc, len(missing))
        return vals
    return {n.name: n.meta.get("val") for n in copy.graph.nodes}


def _constants(gm: fx.GraphModule) -> tuple[dict[str, str], dict[str, int]]:
    """get_attr target -> canonical name (first target read, per tensor) and bytes per tensor."""
    by_tensor: dict[int, list[fx.Node]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = _attribute(gm, node.target)
        if isinstance(value, torch.Tensor):
            by_tensor.setdefault(id(value), []).append(node)
            tensors[id(value)] = value
    canonical, sizes = {}, {}
    for key, nodes in by_tensor.items():
        name = next((n.target for n in nodes if n.users), nodes[0].target)
        for n in nodes:
            canonical[n.target] = name
        sizes[name] = tensors[key].numel() * tensors[key].element_size()
    return canonical, sizes


def _attribute(gm: fx.GraphModule, target: str) -> object:
    value: object = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _check_inputs(gm: fx.GraphModule, vals: dict[str, object], binder: DimBinder) -> None:
    missing: set[str] = set()
    for node in gm.graph.nodes:
        val = vals.get(node.name)
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            for dim in val.shape:
                try:
                    binder.fx_dim(dim)
                except Unbound as exc:
                    missing |= exc.names
    if missing:
        raise unbound_error(missing, "FX graph's input")


def _info(name: str, val: object, binder: DimBinder) -> ValueInfo:
    if isinstance(val, torch.Tensor):
        try:
            shape = binder.fx_shape(val.shape)
        except Unbound:
            return ValueInfo(name, None, str(val.dtype).removeprefix("torch."), 0, True)
        return ValueInfo(name, shape, str(val.dtype).removeprefix("torch."),
                         math.prod(shape) * val.element_size(), True)
    if isinstance(val, (tuple, list)):
        total = sum(_info(name, v, binder).bytes for v in tree_leaves(val)
                    if isinstance(v, torch.Tensor))
        return ValueInfo(name, None, None, total, False)
    return ValueInfo(name, None, None, 0, False)


def _storages(val: object) -> set[StorageWeakRef]:
    found = set()
    for leaf in tree_leaves(val) if isinstance(val, (tuple, list)) else [val]:
        if isinstance(leaf, torch.Tensor):
            try:
                found.add(StorageWeakRef(leaf.untyped_storage()))
            except (RuntimeError, NotImplementedError):  # sparse or exotic tensors
                pass
    return found


def _alias(node: fx.Node, vals: dict[str, object], canonical: dict[str, str]) -> str | None:
    """The input (or constant) whose storage ``node``'s output shares, if any."""
    mine = _storages(vals.get(node.name))
    if not mine:
        return None
    for arg in node.all_input_nodes:
        if mine & _storages(vals.get(arg.name)):
            if arg.op == "get_attr":
                return canonical.get(arg.target, arg.target)
            return arg.name
    return None


def _workspace(node: fx.Node, info: ValueInfo, vals: dict[str, object]) -> int:
    """Eager temporaries of the decomposed quantization ops (``_flops.fx_workspace``)."""
    op = op_name(node)
    if op not in F.FX_WORKSPACE or info.shape is None:
        return 0

    def dtype(index: int) -> str | None:
        arg = node.args[index] if len(node.args) > index else None
        val = vals.get(arg.name) if isinstance(arg, fx.Node) else None
        return str(val.dtype).removeprefix("torch.") if isinstance(val, torch.Tensor) else None

    return F.fx_workspace(op, F.numel(info.shape), info.bytes, dtype(0), dtype(2))


def _shape(arg: object, infos: dict[str, ValueInfo]) -> tuple[int, ...] | None:
    return infos[arg.name].shape if isinstance(arg, fx.Node) and arg.name in infos else None


def _out_numel(node: fx.Node, info: ValueInfo, infos: dict[str, ValueInfo]) -> int:
    if info.shape is not None:
        return F.numel(info.shape)
    if not info.is_tensor and info.bytes:  # a tuple output: its first tensor
        val = node.meta.get("val")
        first = next((v for v in tree_leaves(val) if isinstance(v, torch.Tensor)), None)
        if first is not None and all(isinstance(d, int) for d in first.shape):
            return math.prod(first.shape)
    return 0


def _flops(node: fx.Node, info: ValueInfo, infos: dict[str, ValueInfo]) -> int:
    """FLOPs of one FX node (rules in ``costs.py``)."""
    op, args = op_name(node), node.args
    if op in F.FX_ZERO or node.op != "call_function":
        return 0
    out = _out_numel(node, info, infos)
    if op in F.FX_MATMUL:
        a = _shape(args[F.FX_MATMUL[op]], infos) if len(args) > F.FX_MATMUL[op] else None
        return 2 * out * a[-1] if a else 0
    if op in F.FX_CONV or op in F.FX_TRANSPOSED_CONV:
        weight = _shape(args[1], infos) if len(args) > 1 else None
        transposed = op in F.FX_TRANSPOSED_CONV or (len(args) > 6 and args[6] is True)
        if transposed:
            return F.conv_flops(F.numel(_shape(args[0], infos)), weight)
        return F.conv_flops(out, weight)
    if op in F.FX_ATTENTION:
        q, k, v = (_shape(a, infos) for a in args[:3])
        return F.attention_flops(q, k, v[-1] if v else None) if q and k else 0
    if op in F.FX_NORM:
        return F.NORM_FLOPS_PER_ELEMENT * out
    if op in F.FX_REDUCE:
        return F.numel(_shape(args[0], infos)) if args else out
    if op in F.FX_POOL:
        kernel = args[F.FX_POOL[op]] if len(args) > F.FX_POOL[op] else 1
        spatial = int(op[-2]) if op[-2].isdigit() else 2
        size = math.prod(kernel) if isinstance(kernel, (list, tuple)) else kernel**spatial
        return out * size
    return out if info.is_tensor or info.bytes else 0

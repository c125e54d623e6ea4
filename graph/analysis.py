"""Read-only analyses of a graph: sizes, op histograms and a networkx view.

``measure(g)`` counts nodes, parameters and bytes; it is what the pass report and
``summary`` show. Parameters are the elements of the constant tensors the graph holds (FX:
tensors named by ``get_attr`` nodes; ONNX: initializers and ``Constant`` node values), each
counted once even when several nodes share it. Bytes are their storage bytes, so a packed
int4 tensor counts half a byte per element. ``to_networkx(g)`` is a read-only DiGraph whose
nodes are the graph's operator nodes (and inputs, outputs and constants), for IR-free
analyses shared by the FX and ONNX sides of a pass.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import onnx_ir as ir
import torch
from torch import fx

from .errors import VerificationError
from .kind import Graph, kind

__all__ = ["Measure", "measure", "op_name", "dtype_name", "fx_tensor_attrs", "onnx_constants", "to_networkx"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measure:
    """Size facts of one graph."""

    nodes: int
    params: int
    bytes: int
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)


def op_name(node: fx.Node | ir.Node) -> str:
    """A short, stable operator name: ``aten.linear``, ``getitem`` or ``MatMul``/``com.microsoft::X``."""
    if isinstance(node, ir.Node):
        return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return f"{target.namespace}.{target._schema.name.split('::')[-1]}"
        return getattr(target, "__name__", str(target))
    if node.op in ("call_module", "call_method"):
        return f"{node.op}:{node.target}"
    return node.op


def fx_tensor_attrs(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Tensors named by ``get_attr`` nodes, by target (the graph's weights and buffers)."""
    found: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in found:
            value = _get_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                found[node.target] = value
    return found


def _get_attr(module: torch.nn.Module, target: str) -> object:
    value: object = module
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def onnx_constants(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    """Constant tensors of the main graph and its subgraphs, by name."""
    found: dict[str, ir.TensorProtocol] = {}
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            if value.const_value is not None:
                found[name] = value.const_value
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                attr = node.attributes.get("value")
                if attr is not None and attr.type == ir.AttributeType.TENSOR:
                    found[node.outputs[0].name or f"constant{len(found)}"] = attr.value
    return found


def measure(graph: Graph) -> Measure:
    """Count nodes, parameters and bytes (by dtype) and build the op histogram."""
    by_dtype: Counter[str] = Counter()
    params = 0
    if kind(graph) == "fx":
        ops = Counter(
            op_name(n)
            for n in graph.graph.nodes
            if n.op == "call_function" or (n.op == "call_module" and n.target != "_guards_fn")
        )
        nodes = sum(ops.values())
        seen: set[int] = set()
        for tensor in fx_tensor_attrs(graph).values():
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            params += tensor.numel()
            by_dtype[str(tensor.dtype).removeprefix("torch.")] += tensor.numel() * tensor.element_size()
    else:
        ops = Counter(op_name(n) for g in graph.graphs() for n in g)
        nodes = sum(ops.values())
        for tensor in onnx_constants(graph).values():
            count = tensor.size
            params += count
            by_dtype[dtype_name(tensor.dtype)] += tensor.nbytes
    return Measure(
        nodes=nodes,
        params=params,
        bytes=sum(by_dtype.values()),
        bytes_by_dtype=dict(sorted(by_dtype.items())),
        ops=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
    )


def dtype_name(dtype: ir.DataType) -> str:
    """The numpy-style name of an ONNX dtype (``float32``, ``int8``, ``int4``), as torch uses."""
    if dtype == ir.DataType.STRING:
        return "string"
    try:
        return dtype.numpy().name
    except (TypeError, ValueError):
        return dtype.name.lower()


def to_networkx(graph: Graph) -> nx.DiGraph:
    """A read-only DiGraph view: one node per operator/input/output/constant, edges = data flow.

    Node attributes: ``op`` (see :func:`op_name`), ``kind`` (``"op"``, ``"input"``,
    ``"output"``, ``"const"``). Node keys are FX node names or ONNX node/value names.
    """
    view = nx.DiGraph()
    if kind(graph) == "fx":
        for node in graph.graph.nodes:
            role = {"placeholder": "input", "output": "output", "get_attr": "const"}.get(
                node.op, "op"
            )
            view.add_node(node.name, op=op_name(node), kind=role)
            for producer in node.all_input_nodes:
                view.add_edge(producer.name, node.name)
        return nx.freeze(view)
    g = graph.graph
    keys: dict[int, str] = {}
    for value in g.inputs:
        view.add_node(f"input:{value.name}", op="input", kind="input")
    for name in g.initializers:
        view.add_node(f"const:{name}", op="initializer", kind="const")
    for index, node in enumerate(g):
        keys[id(node)] = f"node:{node.name or f'{node.op_type}_{index}'}"
        view.add_node(keys[id(node)], op=op_name(node), kind="op")

    def source(value: ir.Value) -> str:
        producer = value.producer()
        if producer is not None:
            if id(producer) not in keys:
                raise VerificationError(
                    f"value {value.name!r} is produced by a node that is not in the graph; "
                    "run graphpress.graph.verify to locate the broken edge"
                )
            return keys[id(producer)]
        return f"const:{value.name}" if value.is_initializer() else f"input:{value.name}"

    for node in g:
        for value in node.inputs:
            if value is not None:
                view.add_edge(source(value), keys[id(node)])
    for value in g.outputs:
        view.add_node(f"output:{value.name}", op="output", kind="output")
        view.add_edge(source(value), f"output:{value.name}")
    return nx.freeze(view)

"""One text entry per node of an FX or ONNX graph: the shared basis of ``format`` and ``diff``.

An entry has a stable key (FX: the node name; ONNX: the node name, else
``op_type(output names)``, made unique with ``#2``, ``#3``... in graph order), the line
``outputs = op(inputs) {attrs}``, a signature that ``diff`` compares (op, inputs,
attributes; for constants also dtype and shape) and the provenance mark ``graphpress.pass``.
Constants appear by name, dtype and shape, never by value, and nothing depends on memory
addresses or dict order, so equal graphs give equal entries. ONNX subgraphs (``If``/``Loop``
bodies) follow their node under a header line (not a node: ``diff`` skips it), indented.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir
import torch
from torch import fx

from .analysis import _get_attr, dtype_name, op_name

__all__ = [
    "PROVENANCE",
    "Entry",
    "line",
    "fx_entries",
    "onnx_entries",
    "onnx_constants",
    "onnx_type",
]

PROVENANCE = "graphpress.pass"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class Entry:
    """One node (or ONNX initializer) as text, with what ``diff`` compares."""

    key: str
    op: str
    text: str
    signature: tuple
    outputs: tuple[str, ...]
    provenance: str | None
    depth: int = 0
    is_node: bool = True  # False for the header line of an ONNX subgraph


def line(entry: Entry) -> str:
    mark = f"  # by {entry.provenance}" if entry.provenance else ""
    return "  " * entry.depth + entry.text + mark


# FX ------------------------------------------------------------------------------------


def _type_of(value: object) -> str:
    if isinstance(value, torch.Tensor):
        dims = ",".join(str(d) for d in value.shape)
        return f"{str(value.dtype).removeprefix('torch.')}[{dims}]"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_type_of(v) for v in value) + ")"
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(value)
    return "" if value is None else type(value).__name__


def _arg(value: object) -> str:
    if isinstance(value, fx.Node):
        return f"%{value.name}"
    if isinstance(value, tuple):
        inner = ", ".join(_arg(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(_arg(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_arg(v)}" for k, v in sorted(value.items(), key=str)) + "}"
    if isinstance(value, torch.Tensor):
        return f"tensor({_type_of(value)})"
    if isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
        return str(value)
    return _ADDRESS.sub("", repr(value))


def fx_entries(gm: fx.GraphModule) -> list[Entry]:
    entries = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "get_attr":
            tensor = _get_attr(gm, node.target)
            val = tensor if isinstance(tensor, torch.Tensor) else val
            body, sig = f"get_attr[{node.target}]", ("get_attr", node.target, _type_of(val))
        elif node.op == "output":
            body, sig = f"return {_arg(node.args[0])}", ("output", _arg(node.args[0]))
        elif node.op == "placeholder":
            body, sig = "input", ("input", node.target)
        else:
            args = ", ".join(_arg(a) for a in node.args)
            attrs = ", ".join(f"{k}={_arg(v)}" for k, v in sorted(node.kwargs.items()))
            body = f"{op_name(node)}({args})" + (f" {{{attrs}}}" if attrs else "")
            sig = (op_name(node), str(node.target), args, attrs)
        typ = _type_of(val)
        text = body if node.op == "output" else f"%{node.name} = {body}" + (f" : {typ}" if typ else "")
        entries.append(
            Entry(node.name, op_name(node), text, sig, (node.name,), node.meta.get(PROVENANCE))
        )
    return entries


# ONNX ------------------------------------------------------------------------------------


def _onnx_dtype(dtype: ir.DataType | None) -> str:
    return "?" if dtype is None else dtype_name(dtype)


def onnx_type(value: ir.Value) -> str:
    tensor = value.const_value
    dtype = value.dtype or (tensor.dtype if tensor is not None else None)
    shape = value.shape if value.shape is not None else (tensor.shape if tensor is not None else None)
    dims = "?" if shape is None else ",".join(str(d) for d in shape)
    return f"{_onnx_dtype(dtype)}[{dims}]"


def _onnx_attr(attr: ir.Attr) -> str:
    if attr.is_ref():
        return f"@{attr.ref_attr_name}"
    t, value, types = attr.type, attr.value, ir.AttributeType
    if t in (types.TENSOR, types.SPARSE_TENSOR):
        dims = ",".join(str(d) for d in value.shape)
        return f"tensor({value.name + ': ' if value.name else ''}{_onnx_dtype(value.dtype)}[{dims}])"
    if t in (types.TENSORS, types.GRAPHS):
        return "[" + ", ".join(f"{t.name.lower()[:-1]}({v.name or ''})" for v in value) + "]"
    if t == types.GRAPH:
        return f"graph({value.name}: {len(value)} nodes)"
    if t in (types.FLOAT, types.FLOATS):
        return f"{value:.7g}" if t == types.FLOAT else "[" + ", ".join(f"{v:.7g}" for v in value) + "]"
    if t in (types.INTS, types.STRINGS):
        return repr(list(value))
    return _ADDRESS.sub("", repr(value) if isinstance(value, (int, str)) else str(value))


def onnx_constants(graph: ir.Graph) -> list[Entry]:
    return [
        Entry(name, "initializer", f"const {name} : {onnx_type(v)}", (onnx_type(v),), (name,),
               v.metadata_props.get(PROVENANCE))
        for name, v in sorted(graph.initializers.items())
    ]


def onnx_entries(graph: ir.Graph, depth: int = 0, taken: Counter | None = None) -> list[Entry]:
    taken = Counter() if taken is None else taken
    entries = []
    for node in graph:
        outputs = tuple(v.name or "" for v in node.outputs)
        op = op_name(node)
        key = node.name or f"{op}({', '.join(outputs)})"
        taken[key] += 1
        key = key if taken[key] == 1 else f"{key}#{taken[key]}"
        inputs = ", ".join("None" if v is None else v.name or "?" for v in node.inputs)
        attrs = ", ".join(f"{k}={_onnx_attr(a)}" for k, a in sorted(node.attributes.items()))
        body = f"{', '.join(outputs)} = {op}({inputs})" + (f" {{{attrs}}}" if attrs else "")
        text = f"{node.name}: {body}" if node.name else body
        sig = (op, inputs, outputs, attrs)
        entries.append(Entry(key, op, text, sig, outputs, node.metadata_props.get(PROVENANCE), depth))
        for name, attr in sorted(node.attributes.items()):
            if attr.is_ref() or attr.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                continue
            for sub in attr.value if attr.type == ir.AttributeType.GRAPHS else [attr.value]:
                head = f"{name} of {node.name or op}: graph {sub.name}"
                entries.append(Entry(f"{key}.{name}", "graph", head, (), (), None, depth + 1, False))
                entries += onnx_entries(sub, depth + 2, taken)
    return entries


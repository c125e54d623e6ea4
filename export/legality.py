"""Which ops of an ONNX model ONNX Runtime's CPU provider cannot run.

Building a session stops at the first node without a kernel, so after a failed CPU session
each distinct (domain, op, input types) signature is probed with a one-node model whose inputs
carry the node's types; the ops whose probe fails with ``NOT_IMPLEMENTED`` (no kernel for these
types) or "not a registered function/op" (unknown op) are reported. Untyped inputs are probed
as float, which only tells whether the op is known at all. ORT's kernel registry
(``get_all_opkernel_def``) would answer directly, but it crashes the process when the GPU
libraries of ``onnxruntime-gpu`` are missing.
"""

from __future__ import annotations

import logging
import os
import re

import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphpress.graph.errors import ExportError
from graphpress.graph.io import load

from .ort import CPU, _first_line, session

__all__ = ["ort_legal"]

logger = logging.getLogger(__name__)

_MISSING = re.compile(r"implementation for (\w+)\((\d+)\) node with name '([^']*)'")


def ort_legal(model: ir.Model | str | os.PathLike | bytes) -> list[str]:
    """Ops of ``model`` with no CPU kernel in ORT, as sorted ``"domain::Op"`` (``[]``: runs).

    ``model`` may also be a path or bytes (loaded with :func:`graphpress.graph.load`). Raises
    :class:`ExportError` if the model fails to load in ORT for another reason (invalid model).
    """
    if not isinstance(model, ir.Model):
        model = load(model)
    try:
        session(model, "cpu")
        return []
    except ExportError as exc:
        first = str(exc)
    missing: set[str] = set()
    seen: set[tuple] = set()
    for graph in model.graphs():
        for node in graph:
            if (node.domain, node.op_type, node.overload) in model.functions:
                continue
            types = tuple(str(v.type) if v is not None else "" for v in node.inputs)
            key = (node.domain, node.op_type, types)
            if key not in seen and _probeable(node):
                seen.add(key)
                if not _kernel_exists(model, node):
                    missing.add(_op_id(node.domain, node.op_type))
    found = _MISSING.search(first)
    if not missing and found:  # e.g. an op of an expanded function body
        names = {n.name: n for g in model.graphs() for n in g}
        node = names.get(found.group(3))
        missing.add(_op_id(node.domain if node else "", found.group(1)))
    if not missing:
        raise ExportError(f"{first.split('; run ')[0]}; the model is invalid, not just illegal")
    return sorted(missing)


def _op_id(domain: str, op_type: str) -> str:
    return f"{domain or 'ai.onnx'}::{op_type}"


def _probeable(node: ir.Node) -> bool:
    tensors = all(
        v is None or v.type is None or isinstance(v.type, ir.TensorType) for v in node.inputs
    )
    graphs = any(
        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for a in node.attributes.values()
    )
    return tensors and not graphs


def _kernel_exists(model: ir.Model, node: ir.Node) -> bool:
    """Build a one-node model with ``node``'s input types; False if ORT has no kernel.

    Untyped inputs are probed as float, which only tells whether the op is known at all.
    """
    proto = ir.serde.serialize_node(node)
    inputs, guessed = [], False
    for i, value in enumerate(node.inputs):
        if value is None:
            continue
        proto.input[i] = f"in{i}"
        guessed |= value.dtype is None
        dtype = onnx.TensorProto.FLOAT if value.dtype is None else value.dtype.value
        dims = (
            None
            if value.shape is None
            else [d if isinstance(d, int) else None for d in value.shape]
        )
        inputs.append(onnx.helper.make_tensor_value_info(f"in{i}", dtype, dims))
    outputs = [onnx.ValueInfoProto(name=f"out{i}") for i, out in enumerate(proto.output) if out]
    for i, out in enumerate(proto.output):
        proto.output[i] = f"out{i}" if out else ""
    graph = onnx.helper.make_graph([proto], "probe", inputs, outputs)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    probe = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    try:
        ort.InferenceSession(probe.SerializeToString(), providers=[CPU])
    except Exception as exc:  # ORT raises its own pybind types
        logger.debug("probe of %s failed: %s", node.op_type, _first_line(exc))
        unknown_op = "not a registered" in str(exc)
        return not unknown_op and (guessed or "NOT_IMPLEMENTED" not in str(exc))
    return True

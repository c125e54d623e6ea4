"""Structural verification of a graph between passes.

FX: ``Graph.lint()`` (topological order, dangling uses, targets that exist) plus a check that
every ``get_attr`` resolves to a tensor or module on the GraphModule and that the code
regenerates. ONNX: every node input is defined before use (graph input, initializer or an
earlier node's output, also across subgraph scopes), value names are unique, graph outputs
are defined, and ``onnx.checker`` accepts the serialised model (external data is not read).
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
from torch import fx

from .analysis import _get_attr
from .errors import VerificationError
from .kind import Graph, kind

__all__ = ["verify"]

logger = logging.getLogger(__name__)


def verify(graph: Graph, *, checker: bool = True) -> None:
    """Raise :class:`VerificationError` if ``graph`` is structurally invalid."""
    if kind(graph) == "fx":
        _verify_fx(graph)
    else:
        _verify_onnx(graph, checker=checker)


def _verify_fx(gm: fx.GraphModule) -> None:
    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises RuntimeError / AssertionError
        raise VerificationError(f"FX graph is invalid: {exc}") from None
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module") and _get_attr(gm, node.target) is None:
            raise VerificationError(
                f"FX node {node.name!r} refers to missing attribute {node.target!r}; a pass "
                "removed a weight that is still used"
            )
    try:
        gm.recompile()
    except Exception as exc:
        raise VerificationError(f"FX graph does not generate code: {exc}") from None


def _verify_onnx(model: ir.Model, *, checker: bool) -> None:
    _verify_scope(model.graph, outer=set())
    if checker and _weight_bytes(model) > _CHECKER_LIMIT:
        logger.debug("skipping onnx.checker: weights exceed protobuf's 2 GB in memory")
    elif checker:
        try:
            onnx.checker.check_model(_without_external_data(ir.serde.serialize_model(model)))
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0]
            raise VerificationError(f"ONNX checker rejects the graph: {first}") from None


_CHECKER_LIMIT = 1_500_000_000


def _without_external_data(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Turn main-graph initializers kept in external files into typed graph inputs.

    The checker resolves external-data locations against the current directory (a proto has
    no folder), so a model loaded lazily from elsewhere would fail; its data files were
    already checked by ``graph.load``. As inputs the tensors keep their type and shape, which
    is all the structural check needs.
    """
    graph = proto.graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return proto
    names = {t.name for t in external}
    kept = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    declared = {i.name for i in graph.input}
    graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in external
        if t.name not in declared
    )
    return proto


def _weight_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes
        for g in model.graphs()
        for v in g.initializers.values()
        if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor)
    )


def _verify_scope(graph: ir.Graph, outer: set[int]) -> None:
    defined = set(outer)
    names: set[str] = set()

    def define(value: ir.Value) -> None:
        if value.name:
            if value.name in names:
                raise VerificationError(
                    f"ONNX value name {value.name!r} is defined twice in graph {graph.name!r}"
                )
            names.add(value.name)
        defined.add(id(value))

    for value in graph.inputs:
        define(value)
    for value in graph.initializers.values():
        if id(value) not in defined:
            define(value)
    for node in graph:
        for value in node.inputs:
            if value is not None and id(value) not in defined:
                raise VerificationError(
                    f"ONNX node {node.name!r} ({node.op_type}) uses {value.name!r} before it is "
                    "defined; the graph is not in topological order or a producer was removed"
                )
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                _verify_scope(attr.value, defined)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    _verify_scope(sub, defined)
        for value in node.outputs:
            define(value)
    for value in graph.outputs:
        if id(value) not in defined:
            raise VerificationError(f"ONNX graph output {value.name!r} is never produced")

"""fold-constants: evaluate constant subexpressions once and keep their results as weights.

One forward sweep in topological order. A node whose inputs are all constants (FX:
``get_attr`` tensors and Python literals; ONNX: initializers that are not graph inputs,
``Constant`` outputs, results folded earlier in the sweep) is evaluated (FX: the ATen op itself;
ONNX: ``onnx.reference`` on a cached one-node model, ``_numerics.OnnxEvaluator``) and its result
is a constant for the nodes after it. Only results still needed by a node that does not fold,
or by a graph output, become new weights; an intermediate ONNX array is dropped as soon as its
last consumer has been visited, so time and memory stay linear in the graph.
``_numerics.fold_allowed`` keeps folding from growing the model (``Expand`` of a constant,
a dequantized weight).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import torch
from torch import fx

from graphpress.graph.errors import PassSpecError
from graphpress.graph.fx import add_tensor, get_tensor, mark
from graphpress.graph.onnx import add_initializer

from .._numerics import OnnxEvaluator, fold_allowed
from .._rewrite import (
    drop_unused_constants,
    onnx_const,
    remove_dead_fx,
    remove_node_onnx,
    require_canonical,
    subgraphs,
    value_names,
)
from ..base import Pass, PassResult
from ..registry import register

__all__ = ["FoldConstants"]

logger = logging.getLogger(__name__)

#: ONNX ops never folded: random, training-dependent, or quantization structure ORT must see.
_ONNX_KEEP = frozenset({
    "Constant", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
    "Multinomial", "Bernoulli", "Dropout", "QuantizeLinear", "DequantizeLinear",
    "DynamicQuantizeLinear", "If", "Loop", "Scan",
})


def _fx_foldable(node: fx.Node) -> bool:
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and not node.is_impure() and not target._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in target.tags
            and target.namespace not in ("quantized_decomposed", "quantized")
            and "quantize" not in target.__name__)


def _mutated_closure(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose result may be written in place later (``z = zeros(); z.add_(x)``) and
    everything they are computed from: folding one would turn a fresh per-call tensor into a
    weight that the in-place op then changes for every later call."""
    stack: list[fx.Node] = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        for index, arg in enumerate(target._schema.arguments if target._schema.is_mutable else ()):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = node.args[index] if index < len(node.args) else node.kwargs.get(arg.name)
                fx.node.map_arg(value, stack.append)
    closure: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node not in closure:
            closure.add(node)
            stack.extend(node.all_input_nodes)
    return closure


@register
@dataclass(frozen=True)
class FoldConstants(Pass):
    """Replace computations on constants by their precomputed result.

    **Rules**
      1. A node whose inputs are all constants is evaluated and becomes a constant for later
         nodes; chains fold in one sweep. FX: pure ATen ops (not random, mutating or
         (de)quantize ops). ONNX: default-domain ops except random ops, ``Dropout``,
         (De)QuantizeLinear, ``Constant`` and ops with subgraphs; nodes inside subgraphs fold
         too.
      2. A result is kept only if ``fold_allowed``: at most ``max_bytes``, and tiny (≤ 1 KiB)
         or at most ``max_growth`` × the bytes of its constant inputs. Otherwise the node
         stays (and so do nodes that depend on it).
      3. Results used by a node that stays become new weights named
         ``<value>.fold.value`` (FX attribute ``<node>_fold_value``); an ONNX graph output
         keeps its name. Folded nodes and constants left unused are removed.
      4. A node whose evaluation fails, or returns a non-tensor or (ONNX) a dtype other than
         the declared one, is left alone.
      5. FX: a node whose result is later written in place (an argument of a mutating op, or
         computed into one) stays, so every call still starts from a fresh tensor; so does a
         node whose result the graph returns (the caller could modify a weight).

    **Requires** an FX graph in the aten dialect. **Ensures** the graph's interface is unchanged.
    """

    name: ClassVar[str] = "fold-constants"
    max_bytes: int = 1 << 26
    max_growth: float = 1.0

    def __post_init__(self) -> None:
        if self.max_bytes < 0 or self.max_growth < 0:
            raise PassSpecError(
                f"fold-constants: max_bytes={self.max_bytes} and max_growth={self.max_growth} "
                "must be >= 0 (e.g. fold-constants:max_bytes=1048576,max_growth=1.0)"
            )

    def requires(self, graph) -> None:
        require_canonical(graph)

    def _allowed(self, out_bytes: int, in_bytes: int) -> bool:
        return fold_allowed(out_bytes, in_bytes, max_bytes=self.max_bytes, max_growth=self.max_growth)

    def run_fx(self, gm: fx.GraphModule) -> PassResult:
        values: dict[fx.Node, torch.Tensor] = {}
        folded: list[fx.Node] = []
        written = _mutated_closure(gm)  # Rule 5
        for node in gm.graph.nodes:
            tensor = get_tensor(gm, node)
            if tensor is not None:
                values[node] = tensor
            inputs = node.all_input_nodes
            if not _fx_foldable(node) or node in written or any(n not in values for n in inputs):
                continue
            if any(user.op == "output" for user in node.users):
                continue  # Rule 5: the caller must not get a weight it could modify
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
            try:
                with torch.no_grad():
                    out = node.target(*args, **kwargs)
            except Exception as exc:  # Rule 4
                logger.debug("fold-constants: %s failed: %s", node.name, exc)
                continue
            if not isinstance(out, torch.Tensor) or not self._allowed(  # Rules 2, 4
                out.nbytes, sum(values[n].nbytes for n in inputs)
            ):
                continue
            if any(_shares_storage(out, values[n]) for n in inputs):
                out = out.clone()  # a view of a weight must not alias it
            values[node] = out.detach()
            folded.append(node)
        done = set(folded)
        for node in folded:  # Rule 3
            if all(user in done for user in node.users):
                continue
            attr = add_tensor(gm, f"{node.name}.fold.value", values[node])
            with gm.graph.inserting_before(node):
                const = mark(gm.graph.get_attr(attr), self.name)
            if "val" in node.meta:
                const.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(const)
        candidates = list(dict.fromkeys(n for f in folded for n in (*f.all_input_nodes, f)))
        removed, attrs = remove_dead_fx(gm, candidates)
        if folded:
            gm.recompile()
        stats = {"nodes_folded": len(folded), "nodes_removed": removed, "attributes_removed": attrs}
        return PassResult(gm, bool(folded), stats)

    def run_onnx(self, model: ir.Model) -> PassResult:
        folder = _OnnxFolder(self, model)
        folder.sweep(model.graph)
        for value in list(folder.arrays):  # Rule 3: graph outputs
            if value.is_graph_output():
                folder.materialize(value)
        for node in reversed(folder.folded):
            if not any(v.uses() or v.is_graph_output() for v in node.outputs):
                remove_node_onnx(node)
        constants = drop_unused_constants(folder.sources)
        stats = {"nodes_folded": len(folder.folded), "initializers_added": folder.added,
                 "constants_removed": constants}
        return PassResult(model, bool(folder.folded), stats)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return True


class _OnnxFolder:
    """Per-run state of FoldConstants on one ONNX model (one forward sweep)."""

    def __init__(self, pass_: FoldConstants, model: ir.Model) -> None:
        self.pass_ = pass_
        self.evaluate = OnnxEvaluator(dict(model.opset_imports))
        self.arrays: dict[ir.Value, np.ndarray] = {}  # folded values that are not weights yet
        self.pending: dict[ir.Value, int] = {}  # uses not visited yet
        self.done: dict[ir.Value, ir.Value] = {}  # folded value -> its new initializer
        self.folded: list[ir.Node] = []
        self.sources: dict[ir.Value, None] = {}
        self.added = 0
        self.taken = value_names(model)

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        array = self.arrays.get(value)
        return array if array is not None else onnx_const(value)

    def sweep(self, graph: ir.Graph) -> None:
        for node in graph:
            inner = subgraphs(node)
            for sub in inner:
                self.sweep(sub)
            folded = not inner and self._fold(node)
            for value in node.inputs:
                if value not in self.pending:
                    continue
                self.pending[value] -= 1
                if not folded:
                    self.materialize(value)
                elif self.pending[value] == 0 and not value.is_graph_output():
                    del self.arrays[value], self.pending[value]

    def _fold(self, node: ir.Node) -> bool:
        if node.domain not in ("", "ai.onnx") or node.op_type in _ONNX_KEEP or not node.outputs:
            return False
        if any(attr.is_ref() for attr in node.attributes.values()):
            return False
        inputs = [None if v is None else self.const(v) for v in node.inputs]
        if any(x is None and v is not None for x, v in zip(inputs, node.inputs)):
            return False
        attrs = [ir.serde.serialize_attribute(a) for a in node.attributes.values()]
        try:
            outs = self.evaluate(node.op_type, node.domain, attrs, inputs, len(node.outputs))
        except Exception as exc:  # Rule 4
            logger.debug("fold-constants: %s (%s) failed: %s", node.name, node.op_type, exc)
            return False
        outs = [np.asarray(o) if isinstance(o, np.generic) else o for o in outs]
        for out, value in zip(outs, node.outputs):
            if not isinstance(out, np.ndarray) or out.dtype.kind in "OSU":
                return False
            if value.dtype is not None and ir.DataType.from_numpy(out.dtype) != value.dtype:
                return False
        in_bytes = sum(x.nbytes for x in inputs if x is not None)
        if not self.pass_._allowed(sum(o.nbytes for o in outs), in_bytes):  # Rule 2
            return False
        for out, value in zip(outs, node.outputs):
            self.arrays[value] = out
            self.pending[value] = len(value.uses())
        self.sources.update((v, None) for v in node.inputs if v is not None and v not in self.arrays)
        self.folded.append(node)
        return True

    def materialize(self, value: ir.Value) -> ir.Value:
        """Turn a folded ``value`` into an initializer of its graph and redirect its uses."""
        if value in self.done:
            return self.done[value]
        graph, array = value.producer().graph, self.arrays.pop(value)
        self.pending.pop(value, None)
        name = f"{value.name}.fold.value"
        if value.is_graph_output():  # Rule 3: keep the output's name
            name, value.name = value.name, None
            self.taken.discard(name)
        init = add_initializer(graph, name, array, self.pass_.name, self.taken)
        value.replace_all_uses_with(init, replace_graph_outputs=True)
        self.done[value] = init
        self.added += 1
        return init

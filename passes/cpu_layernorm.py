"""avoid-skip-layernorm: keep ONNX Runtime's CPU provider on its fast LayerNormalization kernel.

ONNX Runtime fuses a residual ``Add`` feeding ``LayerNormalization`` into its contrib op
``SkipLayerNormalization``. On the CPU execution provider (ORT 1.31, 2 threads) that fused
kernel is the slower choice: on ``[16, 128, 384]`` float32 (all-MiniLM-L6-v2 at b16×128) it
takes 3.0 ms where ``Sum`` + ``LayerNormalization`` take 1.2 ms, and 0.20 ms vs 0.05 ms at b1
(``tests/passes/test_cpu_layernorm.py`` checks exactness; the quantization benchmark's
"avoid-skip-layernorm" rows measure it on the whole model). In MiniLM's int8
graphs the twelve fused calls are about a fifth of the run time.

The rewrite writes that ``Add`` as ``Sum``: for two inputs ``Sum(a, b) = a + b`` elementwise
with the same multidirectional broadcasting, bit for bit, and ORT's fusion matches ``Add``
only. Use it for CPU deployment; on CUDA the fused kernel is the fast one, so leave it out of
GPU pipelines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from graphpress.graph.onnx import mark, unique_name

from ._rewrite import onnx_const, value_names
from .base import Pass, PassResult
from .registry import register

__all__ = ["AvoidSkipLayerNorm"]

logger = logging.getLogger(__name__)


@register
@dataclass(frozen=True)
class AvoidSkipLayerNorm(Pass):
    """Write residual ``Add → LayerNormalization`` as ``Sum`` so ORT's CPU fusion skips it.

    **Rules**
      1. ONNX ``Add(a, b)`` whose output feeds a ``LayerNormalization`` (as its input ``X``),
         with neither ``a`` nor ``b`` a constant (a residual sum, not a bias), becomes
         ``Sum(a, b)`` with the same output value.

    **Requires** an ONNX graph. **Ensures** the graph interface is unchanged; outputs are
    bitwise equal (``Sum`` of two inputs is ``Add``).
    """

    name: ClassVar[str] = "avoid-skip-layernorm"
    supports: ClassVar[frozenset[str]] = frozenset({"onnx"})

    def run_onnx(self, model: ir.Model) -> PassResult:
        graph, taken, rewritten = model.graph, value_names(model), 0
        for node in list(graph):
            if not _residual_add_before_layernorm(node):
                continue
            out = node.outputs[0]
            name = out.name or unique_name(graph, "residual_sum", taken)
            out.name = None  # the Sum's output takes over the name
            result = ir.Value(name=name, type=out.type, shape=out.shape)
            new = ir.node("Sum", list(node.inputs), outputs=[result],
                          name=unique_name(graph, f"{name}.cpu_ln.sum", taken))
            graph.insert_before(node, mark(new, self.name))
            out.replace_all_uses_with(result, replace_graph_outputs=True)
            for index in range(len(node.inputs)):
                node.replace_input_with(index, None)
            graph.remove(node)
            rewritten += 1
        return PassResult(model, rewritten > 0, {"adds_rewritten": rewritten})


def _residual_add_before_layernorm(node: ir.Node) -> bool:
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    if any(v is None or onnx_const(v) is not None for v in node.inputs):
        return False
    return any(use.node.op_type == "LayerNormalization" and use.idx == 0
               and use.node.domain in ("", "ai.onnx") for use in node.outputs[0].uses())

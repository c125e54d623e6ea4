"""A copy of a GraphModule that also returns chosen intermediate values.

Aten GraphModules have no submodule hooks for their ``call_function`` nodes, so intermediates
are collected by a graph transformation: :func:`tap` clones the graph (tensors shared, the
caller's module untouched) and rewrites its output node to ``(original_output, [v₁, …, vₖ])``.
For ``torch.export`` graphs (pytree code generation) the original flat outputs are returned
as they are and unflattened again with the original output spec, so the caller gets the
model's own output structure (e.g. a ``ModelOutput``) next to the tapped tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import fx
from torch.fx.graph import _PyTreeCodeGen
from torch.utils import _pytree as pytree

from graphpress.graph.errors import PreconditionError
from graphpress.graph.kind import clone

from ._data import call

__all__ = ["Tapped", "tap"]

logger = logging.getLogger(__name__)


class Tapped:
    """Calls a tapped module: ``tapped(*args, **kwargs) -> (output, [tensors])``."""

    def __init__(self, module: fx.GraphModule, out_spec: Any) -> None:
        self.module, self.out_spec = module, out_spec

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, list[Any]]:
        output, values = call(self.module, args, kwargs)
        if self.out_spec is not None:
            output = pytree.tree_unflatten(list(output), self.out_spec)
        return output, list(values)


def tap(gm: fx.GraphModule, names: Sequence[str]) -> Tapped:
    """A copy of ``gm`` that returns the values of the nodes ``names`` beside its output.

    Parameters and buffers are shared with ``gm`` (so training them trains ``gm``'s too).
    """
    copy = clone(gm)
    nodes = {node.name: node for node in copy.graph.nodes}
    missing = [name for name in names if name not in nodes]
    if missing:
        raise PreconditionError(f"distill: no node named {missing[0]!r} in the graph; name "
                                "feature pairs by fx.Node.name (print(gm.graph) lists them)")
    output = next(node for node in reversed(copy.graph.nodes) if node.op == "output")
    codegen = copy.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    out_spec = None
    if isinstance(codegen, _PyTreeCodeGen) and info is not None and info.out_spec is not None:
        out_spec = info.out_spec
        copy.graph._codegen = _PyTreeCodeGen(info._replace(out_spec=None))
    output.args = ((output.args[0], [nodes[name] for name in names]),)
    copy.recompile()
    return Tapped(copy, out_spec)

"""First-order Taylor statistics on FX graphs: ``Σ|a·∂L/∂a|`` per channel of chosen values.

The graph runs in an ``fx.Interpreter`` with autograd on; each chosen node's result ``a`` is
replaced by ``a + z`` with a zero leaf ``z`` that requires a gradient (so gradients still flow
through ``a`` to earlier chosen nodes), the loss is computed from the outputs and
``torch.autograd.grad`` returns ``∂L/∂z = ∂L/∂a`` for those leaves only (no ``.grad`` is
written on the model's parameters, which the caller shares). The default loss is ``½‖y‖²`` summed over the
outputs: label-free, its first-order change is the change of the output energy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import fx

from graphpress.graph.errors import PreconditionError

from .._collect import as_batches

__all__ = ["taylor_fx"]

logger = logging.getLogger(__name__)


class _Leaves(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, targets: set[str]) -> None:
        super().__init__(gm)
        self.targets, self.leaves = targets, {}

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node.name in self.targets and isinstance(value, torch.Tensor):
            zero = torch.zeros_like(value, requires_grad=True)
            self.leaves[node.name] = (value.detach(), zero)
            value = value + zero
        return value


def _default_loss(outputs: Any, batch: Any) -> torch.Tensor:
    flat = [o for o in torch.utils._pytree.tree_leaves(outputs) if isinstance(o, torch.Tensor)
            and o.is_floating_point()]
    return sum(0.5 * o.float().pow(2).sum() for o in flat)


def taylor_fx(gm: fx.GraphModule, batches: Any, stats: Mapping[str, Any],
              loss: Callable[[Any, Any], Any] | None = None) -> None:
    """Feed ``stats[name].update_taylor(a, ∂L/∂a)`` for every named node over ``batches``."""
    loss = loss or _default_loss
    known = {n.name for n in gm.graph.nodes}
    missing = sorted(set(stats) - known)
    if missing:
        raise PreconditionError(f"the FX graph has no nodes named {missing[:10]}")
    runner = _Leaves(gm, set(stats))
    in_spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "in_spec", None)
    for batch in as_batches(batches):
        args, kwargs = ((), dict(batch)) if isinstance(batch, Mapping) else (tuple(batch), {})
        args = tuple(torch.as_tensor(a) if isinstance(a, np.ndarray) else a for a in args)
        kwargs = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
                  for k, v in kwargs.items()}
        flat = (fx._pytree.tree_flatten_spec((args, kwargs), in_spec) if in_spec is not None
                else [*args, *kwargs.values()])
        runner.leaves = {}
        with torch.enable_grad():
            outputs = runner.run(*flat)
            value = loss(outputs, batch)
            names = [n for n in stats if n in runner.leaves]
            grads = torch.autograd.grad(value, [runner.leaves[n][1] for n in names],
                                        allow_unused=True)
        for name, grad in zip(names, grads):
            leaf = runner.leaves[name][0].float()
            stats[name].update_taylor(leaf.numpy(), np.zeros(leaf.shape, np.float32)
                                      if grad is None else grad.detach().float().numpy())

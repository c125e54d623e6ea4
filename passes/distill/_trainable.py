"""A trainable copy of a student GraphModule; the caller's graph and tensors stay untouched.

A captured aten graph reads its weights through ``get_attr`` nodes: parameters of the original
model, buffers (running statistics, rotary frequencies, position ids) and the new constants
passes registered as buffers (low-rank factors, sparse or pruned weights, folded weights).
:func:`trainable_copy` structurally copies the graph (:func:`graphpress.graph.clone`: fresh
module containers) and rebinds, in the copy only, every constant that should train to a fresh
``nn.Parameter`` holding a copy of its values. Tensors that do not train stay shared.

**Rules** (first match wins, per constant):
  1. Not a floating-point tensor (integer codes, position ids, boolean masks): frozen.
  2. Matched by a ``freeze`` pattern (fnmatch on the attribute name): frozen.
  3. Created by a quantization pass (``QUANTIZATION_PASSES``: scales, zero points, codes):
     frozen; training them is quantization-aware training's job.
  4. Read as the running mean/variance of a batch norm: frozen (statistics, not weights).
  5. An ``nn.Parameter`` of the captured model, or a constant a pass created (provenance
     ``node.meta["graphpress.pass"]``): trainable.
  6. Any other buffer (rotary frequencies, masks kept as floats): frozen.

A trainable constant created by ``sparsify`` (provenance, or a ``sparse`` tag in its name:
``<weight>.sparse`` sliced later by pruning is ``<weight>_sparse_prune``) keeps its zeros: its
keep-mask ``w ≠ 0`` is recorded and re-applied after every optimiser step (and to the
gradient before it).
:meth:`TrainableStudent.finish` returns yet another copy whose trained constants are stored
as they were (parameters stay parameters, buffers become buffers again), detached from the
optimiser.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from graphpress.graph.fx import PROVENANCE, get_tensor
from graphpress.graph.kind import clone

__all__ = ["TrainableStudent", "trainable_copy", "QUANTIZATION_PASSES", "SPARSE_PASSES"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
#: Passes whose constants (codes, scales, zero points) only quantization-aware training trains.
QUANTIZATION_PASSES = frozenset({"insert-qdq", "quantize-weights", "quantize-ternary",
                                 "quantize-dynamic"})
#: Passes whose zeros are part of the compression and must survive training.
SPARSE_PASSES = frozenset({"sparsify"})
_STATISTICS = {  # batch-norm ops -> argument positions of running mean and variance
    _aten._native_batch_norm_legit_no_training.default: (3, 4),
    _aten._native_batch_norm_legit.default: (3, 4),
    _aten.native_batch_norm.default: (3, 4),
    _aten.batch_norm.default: (3, 4),
}


@dataclass
class TrainableStudent:
    """The training copy: ``module`` reads ``params`` (attribute name → parameter)."""

    module: fx.GraphModule
    params: dict[str, nn.Parameter]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    was_parameter: dict[str, bool] = field(default_factory=dict)
    frozen: dict[str, str] = field(default_factory=dict)  # attribute -> reason (Rules 1-4, 6)

    def mask_gradients(self) -> None:
        """Zero the gradient of every pruned-away (zero) weight of a sparsified constant."""
        for name, keep in self.masks.items():
            grad = self.params[name].grad
            if grad is not None:
                grad.mul_(keep)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Put the zeros of sparsified constants back (after an optimiser step)."""
        for name, keep in self.masks.items():
            self.params[name].mul_(keep)

    def finish(self) -> fx.GraphModule:
        """A new GraphModule holding the trained values, stored as the student stored them."""
        result = clone(self.module)
        values: dict[tuple[int, bool], torch.Tensor] = {}  # tied constants stay tied
        for name, param in self.params.items():
            kept_as_parameter = self.was_parameter[name]
            value = values.get((id(param), kept_as_parameter))
            if value is None:
                value = param.detach().clone()
                if kept_as_parameter:
                    value = nn.Parameter(value, requires_grad=True)
                values[(id(param), kept_as_parameter)] = value
            _rebind(result, name, value)
        return result

    def unique_parameters(self) -> list[nn.Parameter]:
        """The parameters to optimise, each once, in attribute-name order."""
        return list({id(p): p for p in self.params.values()}.values())


def trainable_copy(gm: fx.GraphModule, *, freeze: Sequence[str] = ()) -> TrainableStudent:
    """Copy ``gm`` with its trainable constants (Rules 1-6) as fresh ``nn.Parameter``s."""
    module = clone(gm)
    params: dict[str, nn.Parameter] = {}
    made: dict[int, nn.Parameter] = {}  # tied constants (one tensor, several names) stay tied
    student = TrainableStudent(module, params)
    for node in module.graph.nodes:
        tensor = get_tensor(module, node) if node.op == "get_attr" else None
        if tensor is None or node.target in params or node.target in student.frozen:
            continue
        reason = _frozen_reason(node, tensor, freeze)
        if reason is not None:
            student.frozen[node.target] = reason
            continue
        param = made.get(id(tensor))
        if param is None:
            param = made[id(tensor)] = nn.Parameter(tensor.detach().clone(), requires_grad=True)
        _rebind(module, node.target, param)
        params[node.target] = param
        student.was_parameter[node.target] = isinstance(tensor, nn.Parameter)
        if _sparsified(node) and bool((tensor == 0).any()):
            student.masks[node.target] = (tensor != 0).to(tensor.dtype)
    student.params = dict(sorted(params.items()))
    logger.debug("trainable student: %d constants train, %d frozen, %d keep their zeros",
                 len(params), len(student.frozen), len(student.masks))
    return student


def _sparsified(node: fx.Node) -> bool:
    if node.meta.get(PROVENANCE) in SPARSE_PASSES:
        return True
    return "sparse" in re.split(r"[._]", str(node.target))


def _frozen_reason(node: fx.Node, tensor: torch.Tensor, freeze: Sequence[str]) -> str | None:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return "not floating point"  # Rule 1
    if any(fnmatch.fnmatchcase(node.target, pattern) for pattern in freeze):
        return "freeze pattern"  # Rule 2
    origin = node.meta.get(PROVENANCE)
    if origin in QUANTIZATION_PASSES:
        return f"created by {origin}"  # Rule 3
    for user in node.users:
        positions = _STATISTICS.get(user.target, ())
        if any(i < len(user.args) and user.args[i] is node for i in positions):
            return "batch-norm statistic"  # Rule 4
    if isinstance(tensor, nn.Parameter) or origin is not None:
        return None  # Rule 5
    return "buffer"  # Rule 6


def _rebind(module: nn.Module, target: str, value: torch.Tensor) -> None:
    """Bind ``value`` at dotted ``target`` as a parameter or buffer (replacing either)."""
    path, _, name = target.rpartition(".")
    owner = module.get_submodule(path) if path else module
    owner._parameters.pop(name, None)
    owner._buffers.pop(name, None)
    if name in owner.__dict__:
        delattr(owner, name)
    if isinstance(value, nn.Parameter):
        owner.register_parameter(name, value)
    else:
        owner.register_buffer(name, value)

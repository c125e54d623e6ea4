"""Teacher ↔ student feature pairs from pass provenance, and the projections between them.

**Automatic pairing** (``features="auto"``) matches the output of every *rewritten* layer of
the student with the output of the same layer in the teacher:

  1. A layer is a product node (``aten.linear``/``addmm``/``mm``/``matmul``, convolutions)
     and is named by its module path, the innermost entry of ``node.meta["nn_module_stack"]``
     that ``torch.export`` records (passes copy it onto the nodes they create).
  2. A student layer is rewritten when the product node was created by a pass (provenance
     ``node.meta["graphpress.pass"]``: the two thin products of ``factor-low-rank``) or a
     constant operand other than its data input (the weight, through its transpose or decode
     chain) was made by a compression pass (``_PASS_MARKS``: a ``sparsify``/``prune-channels``
     weight, a ``quantize-weights``/``insert-qdq`` dequantised weight, a folded one).
     Products of two activations (attention scores) never count.
  3. Per module path the *last* product is the layer output (a factored pair's second
     product); it pairs with the teacher's last product of the same path.
  4. Layers whose output is a graph output are left out: the response loss covers them.
  5. A layer whose weights absorbed a batch norm (``fold-batchnorm``: provenance or the
     ``bnfold`` name tag) pairs with the teacher's batch-norm output after that layer, which
     is what the folded layer computes; without one right after it, it is not paired.
  6. Shapes are compared on the first batch: equal → compared directly; different only along
     the channel axis (last axis, axis 1 for convolutions: a pruned layer) → a learned linear
     projection ``student width → teacher width``, initialised by ridge regression on that
     batch and trained jointly, dropped after training; otherwise the pair is skipped
     (logged) — or refused, for pairs the caller named.

Explicit pairs are ``(teacher_node, student_node)`` names or ``fx.Node`` objects.
"""

from __future__ import annotations

import logging
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from graphpress.graph.errors import PreconditionError
from graphpress.graph.fx import PROVENANCE

__all__ = ["FeaturePair", "auto_pairs", "explicit_pairs", "Projections", "module_path"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_DATA_INPUT = {_aten.linear.default: 0, _aten.mm.default: 0, _aten.matmul.default: 0,
               _aten.addmm.default: 1}
_NORMS = {_aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default,
          _aten._native_batch_norm_legit.default, _aten.native_batch_norm.default}
_FOLD_MARKS = {"fold-batchnorm", "bnfold"}  # provenance, name tag
_PASS_MARKS = {"factor-low-rank", "sparsify", "prune-channels", "fold-pruned", "insert-qdq",
               "quantize-weights", "quantize-ternary", "quantize-dynamic", "prepare-qat", *_FOLD_MARKS}
_CONVS = {_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default,
          _aten.convolution.default, _aten.conv1d.padding, _aten.conv2d.padding,
          _aten.conv3d.padding}


@dataclass(frozen=True)
class FeaturePair:
    """One paired intermediate: node names in each graph, the layer, the channel axis."""

    teacher: str
    student: str
    layer: str = ""
    axis: int = -1


def module_path(node: fx.Node) -> str | None:
    """The innermost module path ``torch.export`` recorded for ``node`` (Rule 1)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    entry = list(stack.values())[-1]
    return entry[0] if isinstance(entry, (tuple, list)) and entry else None


def _is_product(node: fx.Node) -> bool:
    return node.op == "call_function" and (node.target in _DATA_INPUT or node.target in _CONVS)


def _constants(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes computed from constants only (weights, their transposes, decode chains)."""
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and node.all_input_nodes
                                     and all(arg in found for arg in node.all_input_nodes)):
            found.add(node)
    return found


def _operand_marks(node: fx.Node, constants: set[fx.Node]) -> set[str]:
    """Pass names and name tags of the constant operands of a product (not its data input)."""
    data = node.args[_DATA_INPUT.get(node.target, 0)] if node.args else None
    stack = [arg for arg in node.all_input_nodes if arg is not data and arg in constants]
    marks: set[str] = set()
    while stack:
        arg = stack.pop()
        if arg.meta.get(PROVENANCE):
            marks.add(arg.meta[PROVENANCE])
        if arg.op == "get_attr":
            marks.update(re.split(r"[._]", str(arg.target)))
        stack.extend(arg.all_input_nodes)
    return marks


def _norm_after(node: fx.Node) -> fx.Node | None:
    """The batch-norm output that is ``node``'s only use, if it is one (Rule 5)."""
    users = list(node.users)
    if len(users) != 1 or users[0].target not in _NORMS:
        return None
    norm = users[0]
    if norm.target is _aten.batch_norm.default:
        return norm
    firsts = [u for u in norm.users if u.target is operator.getitem and u.args[1] == 0]
    return firsts[0] if len(firsts) == 1 else None


def _feeds_output(node: fx.Node) -> bool:
    return any(user.op == "output" for user in node.users)


def _layer_outputs(gm: fx.GraphModule, only_rewritten: bool) -> dict[str, tuple[fx.Node, bool]]:
    """Module path -> (last product node, whether its weights absorbed a batch norm)."""
    constants = _constants(gm)
    found: dict[str, tuple[fx.Node, bool]] = {}
    for node in gm.graph.nodes:
        if not _is_product(node):
            continue
        marks = _operand_marks(node, constants)
        if only_rewritten and not (node.meta.get(PROVENANCE) or marks & _PASS_MARKS):
            continue  # Rule 2
        path = module_path(node)
        if path is not None:  # Rule 3: the last product of the path wins
            found[path] = (node, bool(marks & _FOLD_MARKS))
    return found


def auto_pairs(teacher: fx.GraphModule, student: fx.GraphModule) -> list[FeaturePair]:
    """Rules 1-5: pairs of (teacher, student) layer outputs, in the student's graph order."""
    teachers = _layer_outputs(teacher, only_rewritten=False)
    pairs = []
    for path, (node, folded) in _layer_outputs(student, only_rewritten=True).items():
        original = teachers.get(path, (None, False))[0]
        if original is not None and folded:
            original = _norm_after(original)
        if original is None or _feeds_output(node) or _feeds_output(original):
            continue  # Rule 4 (or no counterpart)
        pairs.append(FeaturePair(original.name, node.name, path, 1 if node.target in _CONVS
                                 else -1))
    logger.debug("auto feature pairs: %s", [p.layer for p in pairs])
    return pairs


def explicit_pairs(teacher: fx.GraphModule, student: fx.GraphModule,
                   pairs: Sequence[tuple[object, object]]) -> list[FeaturePair]:
    """The caller's ``(teacher_node, student_node)`` pairs, checked against both graphs."""
    t_nodes = {n.name: n for n in teacher.graph.nodes}
    s_nodes = {n.name: n for n in student.graph.nodes}
    result = []
    for t, s in pairs:
        t_name, s_name = getattr(t, "name", t), getattr(s, "name", s)
        for name, nodes, which in ((t_name, t_nodes, "teacher"), (s_name, s_nodes, "student")):
            if name not in nodes:
                raise PreconditionError(f"distill: the {which} graph has no node {name!r}; "
                                        "name feature pairs by fx.Node.name")
        node = s_nodes[s_name]
        result.append(FeaturePair(t_name, s_name, module_path(node) or s_name,
                                  1 if node.target in _CONVS else -1))
    return result


class Projections(nn.Module):
    """One map per pair: identity where shapes match, ``nn.Linear`` where widths differ."""

    def __init__(self, pairs: Sequence[FeaturePair], students: Sequence[torch.Tensor],
                 teachers: Sequence[torch.Tensor], *, strict: bool) -> None:
        super().__init__()
        self.pairs: list[FeaturePair] = []  # the pairs kept, and their positions in ``pairs``
        self.indices: list[int] = []
        self.maps = nn.ModuleList()
        for index, (pair, s, t) in enumerate(zip(pairs, students, teachers)):  # Rule 6
            if s.shape == t.shape:
                self.pairs.append(pair)
                self.indices.append(index)
                self.maps.append(nn.Identity())
                continue
            axis = pair.axis % max(s.dim(), 1)
            same_elsewhere = s.dim() == t.dim() and all(
                a == b for i, (a, b) in enumerate(zip(s.shape, t.shape)) if i != axis)
            if not same_elsewhere:
                message = (f"feature pair {pair.teacher!r}↔{pair.student!r} has shapes "
                           f"{tuple(t.shape)} vs {tuple(s.shape)}, which differ beyond the "
                           f"channel axis {pair.axis}")
                if strict:
                    raise PreconditionError(f"distill: {message}; pair other nodes")
                logger.info("skipping %s", message)
                continue
            self.pairs.append(pair)
            self.indices.append(index)
            self.maps.append(_ridge_projection(s.movedim(axis, -1), t.movedim(axis, -1)))

    def forward(self, index: int, value: torch.Tensor) -> torch.Tensor:
        """Map the student value of kept pair ``index`` to the teacher's shape."""
        projection = self.maps[index]
        if isinstance(projection, nn.Identity):
            return value
        axis = self.pairs[index].axis
        return projection(value.movedim(axis, -1)).movedim(-1, axis)


def _ridge_projection(s: torch.Tensor, t: torch.Tensor, ridge: float = 1e-3) -> nn.Linear:
    """``nn.Linear`` ``P`` minimising ``‖s·Pᵀ − t‖² + λ‖P‖²`` on one batch (no bias)."""
    x = s.detach().reshape(-1, s.shape[-1]).double()
    y = t.detach().reshape(-1, t.shape[-1]).double()
    gram = x.T @ x
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram + lam * eye, x.T @ y)
    layer = nn.Linear(x.shape[1], y.shape[1], bias=False, dtype=s.dtype, device=s.device)
    with torch.no_grad():
        layer.weight.copy_(solution.T.to(s.dtype))
    return layer

"""fold-pruned: remove channels, neurons and heads that are already zero, exactly.

Masks (``torch.nn.utils.prune``, magnitude pruning that zeroes whole rows) leave the model as
big and as slow as before. For every prunable coupled group (``graph.channels``) a unit goes
when one of these holds, and the graph then computes the same function with smaller tensors:

* **dead input**: the unit's slices of every consumer weight (``"in"`` uses) are zero, so
  nothing downstream reads it;
* **constant output**: the unit's slices of every producer weight (``"out"`` uses with ≥ 2
  dims) are zero, so its pre-activation is the bias ``b`` and after the element-wise path the
  consumers read a constant ``k = act(b)`` (read off one synthetic run and checked to be
  constant over every position). Each consumer ``y = W·x + c`` gets ``c' = c + Σ k_u·W[:, u]``
  (``_fold_bias``) before the unit goes; a padded convolution gets one input channel of ones
  with the summed kernel instead (``_fold_map``). A head counts when its value projection is zero:
  softmax rows sum to 1, so the head outputs its value bias. A zero query or key does not
  count (uniform attention still averages the values).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from torch import fx

from graphpress.graph.analysis import measure, op_name

from .._rewrite import drop_unused_constants, remove_dead_fx, require_canonical
from ..base import Pass, PassResult
from ..registry import register
from ._fold_bias import apply_bias_deltas, contribution, fx_consumer, onnx_consumer
from ._fold_map import add_ones_channel_fx, add_ones_channel_onnx
from ._shrink_fx import FxShrinker
from ._shrink_onnx import OnnxShrinker
from ._structure import CROSS_CHANNEL, attention_role, example_values, materialize_fx, zero_units

__all__ = ["FoldPruned"]

logger = logging.getLogger(__name__)


@register
@dataclass(frozen=True)
class FoldPruned(Pass):
    """Remove channels, neurons and heads that are structurally zero, without changing outputs.

    **Rules**
      0. FX: a weight computed from constants only (``weight_orig * weight_mask`` of
         ``torch.nn.utils.prune``) first becomes one constant ``<weight>.foldpruned``.
      1. Groups: the prunable ``channel_groups(graph)`` with at least one consumer weight and no
         channel-mixing norm (LayerNorm, GroupNorm, RMSNorm) among their uses.
      2. Dead input: a unit whose slices of all consumer weights are zero is removed.
      3. Constant output: a unit whose slices of all producer weights (for heads: of the value
         projection) are zero carries a constant ``k`` into its consumers; ``Σ k·W[:, unit]`` is
         added to each consumer's bias (a new bias, or a new ``Add`` after an ONNX ``MatMul``)
         and the unit is removed, where the reading is constant over all positions. A padded
         convolution sees ``k`` only inside the image: one input channel of ones with the
         kernel ``Σ k·W[:, unit]`` replaces them instead (``_fold_map``), exact at any size.
      4. A group keeps at least one unit (the first constant one, which is then not folded).
      5. Every use of a group is sliced into new constants (``_shrink_fx``/``_shrink_onnx``).

    **Requires** an aten-dialect FX graph or ONNX. **Ensures** the graph interface is unchanged;
    outputs equal the input graph's within float rounding.
    """

    name: ClassVar[str] = "fold-pruned"

    def requires(self, graph) -> None:
        require_canonical(graph)

    def run_fx(self, gm: fx.GraphModule) -> PassResult:
        materialized = materialize_fx(gm, self.name)  # Rule 0
        result = self._run(gm, FxShrinker(gm, self.name))
        stats = {**result.stats, "weights_materialized": materialized}
        return PassResult(gm, result.modified or materialized > 0, stats, result.layers)

    def run_onnx(self, model: ir.Model) -> PassResult:
        return self._run(model, OnnxShrinker(model, self.name))

    def _run(self, graph, shrinker) -> PassResult:
        from graphpress.graph.channels import channel_groups

        start = time.perf_counter()
        params_before = measure(graph).params
        plans = []  # (group, dead, constant, consumers)
        for group in channel_groups(graph):
            plan = self._plan(shrinker, group) if group.prunable else None
            if plan is not None:
                plans.append(plan)
        wanted = sorted({c[1] for p in plans if p[2].any() for c in p[3] if c[1] is not None})
        values = example_values(graph, wanted) if wanted else {}
        deltas: dict[object, tuple] = {}  # consumer -> (use, out axis, bias increment)
        maps: dict[object, np.ndarray] = {}  # padded convolution -> ones-channel kernel
        rows, removed = [], 0
        for group, dead, constant, consumers in plans:
            ok = dead | self._foldable(shrinker, group, constant & ~dead, consumers, values)
            if ok.all():  # Rule 4: keep one unit (a constant one if any: then it needs no fold)
                ok[int(np.argmin(dead)) if not dead.all() else 0] = False
            fold = ok & ~dead
            if not ok.any():
                continue
            for use, target, axis, weight in consumers if fold.any() else ():  # Rule 3
                out_axis, padded = self._consumer(shrinker, use)
                chans = np.concatenate([use.offset + u * group.unit + np.arange(group.unit)
                                        for u in np.flatnonzero(fold)])
                k = self._constants(values[target], axis, chans)
                padded = padded and bool(np.any(k != 0))  # zeros need nothing
                node = shrinker.node(use.node)
                change = contribution(weight, use.axis % weight.ndim, out_axis, chans, k,
                                      spatial=padded)
                if padded:
                    maps[node] = maps.get(node, 0) + change
                else:
                    deltas[node] = (use, out_axis, deltas[node][2] + change if node in deltas
                                    else change)
            keep = np.flatnonzero(~ok)
            plans_row = {"layer": group.name, "kind": group.kind, "size": group.size,
                         "kept": len(keep) * group.unit, "dead": int((ok & dead).sum()),
                         "folded": int(fold.sum())}
            rows.append((group, keep, plans_row))
            removed += int(ok.sum())
        for node, kernel in maps.items():
            if isinstance(node, fx.Node):
                old, new = add_ones_channel_fx(graph, node, kernel, self.name)
                shrinker.origin[new] = shrinker.origin.get(old, old.target)
                remove_dead_fx(graph, [old])
            else:
                old, new = add_ones_channel_onnx(graph, node, kernel, self.name, shrinker.taken)
                new.meta["prune.origin"] = old.meta.get("prune.origin", old.name)
                drop_unused_constants([old])
        for group, keep, _ in rows:  # Rule 5
            shrinker.shrink(group, keep)
        apply_bias_deltas(graph, shrinker, deltas, self.name)  # sliced like their consumers
        if rows:
            shrinker.finish()
        stats = {"groups_pruned": len(rows), "units_removed": removed,
                 "biases_folded": len(deltas),
                 "maps_folded": len(maps), "params_before": params_before,
                 "params_after": measure(graph).params, "seconds": time.perf_counter() - start}
        return PassResult(graph, bool(rows), stats, layers=tuple(r for _, _, r in rows))

    def _consumer(self, shrinker, use):
        node = shrinker.node(use.node)
        return fx_consumer(node) if isinstance(node, fx.Node) else onnx_consumer(node)

    def _plan(self, shrinker, group):
        """Rules 1-3 on the weights: (group, dead units, zero-producer units, consumers)."""
        units = group.size // group.unit
        if any(u.role == "stat" or op_name(shrinker.node(u.node)) in CROSS_CHANNEL
               for u in group.uses):
            return None
        dead, constant = np.ones(units, bool), np.ones(units, bool)
        consumers, producers = [], 0
        for use in group.uses:
            if use.role not in ("in", "out"):
                continue
            array = shrinker.array(use)
            if array is None or array.ndim < (2 if use.role == "in" else 1):
                if use.role == "in":
                    return None  # a consumer we cannot read: nothing is provably dead
                continue
            zeros = zero_units(array, use.axis % array.ndim, use.offset, units, group.unit)
            if use.role == "in":
                dead &= zeros
                target = shrinker.consumer_input(use)
                consumers.append((use, *(target or (None, None)), array))
            elif array.ndim >= 2 and (group.kind != "heads" or attention_role(
                    shrinker.node(use.node)) in ("v", None)):
                constant &= zeros  # heads: the value projection decides (Rule 3)
                producers += 1
        if not consumers:
            return None
        return group, dead, constant & (producers > 0), consumers

    def _foldable(self, shrinker, group, candidates, consumers, values) -> np.ndarray:
        """Rule 3: which candidate units read as constants that every consumer can absorb."""
        ok = candidates.copy()
        for use, target, axis, _weight in consumers if candidates.any() else ():
            info = self._consumer(shrinker, use)
            for u in np.flatnonzero(ok):
                chans = use.offset + u * group.unit + np.arange(group.unit)
                k = None if info is None or target not in values else self._constants(
                    values[target], axis, chans)
                if k is None:
                    ok[u] = False
        return ok

    def _constants(self, array: np.ndarray, axis: int, chans: np.ndarray) -> np.ndarray | None:
        """The constant value of each channel of ``array`` along ``axis``, or ``None``."""
        x = np.moveaxis(np.asarray(array, np.float64), axis, 0)[chans].reshape(len(chans), -1)
        k = x.mean(axis=1)
        spread = np.abs(x - k[:, None]).max(axis=1) if x.shape[1] else np.zeros(len(chans))
        if not np.all(np.isfinite(x)) or np.any(spread > 1e-5 * np.maximum(np.abs(k), 1.0)):
            return None
        return k

"""Solve the channel relations into groups (see :mod:`.channels` for the model).

1. Union-find over spaces. A constant read by several nodes is not a relation: each use
   names its reading node, and slicing rebinds that node's input (exporters deduplicate equal
   constants, e.g. all-ones norm weights, across unrelated layers).
2. Fixpoint: parts of one whole at the same range are the same space (concat then split);
   overlapping ranges block the whole. Factorisations of one flat space are refined to their
   common boundaries (``[2,2,2]`` and ``[2,4]`` give ``4 = 2 ⊗ 2``); sizes that do not refine
   block the flat space.
3. Uses and blocks of a whole are pushed into its parts (offsets add up).
4. A group is keyed by a space ``G`` that is not composite: ``G`` itself (unit 1) plus every
   flat space whose expansion into leaves leads with ``G`` (unit = the rest of the flat
   space; attention heads) or holds it further in (only ``"shape"`` uses may sit there: a
   reshape entry that counts ``G`` scales with it).
5. Each use keeps its own unit (the channels one unit of ``G`` spans in it: ``D`` for a head,
   ``n_rep·D`` for the query heads sharing one kv head). A group lists its hard *blockers*
   (nothing may be sliced) apart from the reasons that only stop pruning: uses that disagree
   on the unit (grouped-query attention) and the soft reasons of :mod:`._channel_rules`.
"""

from __future__ import annotations

import math
from collections import defaultdict

from ._channel_rules import Relations

__all__ = ["assemble"]


class _UF:
    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, s):
        root = s
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while s != root:
            self.parent[s], s = root, self.parent.get(s, s)
        return root

    def union(self, a, b) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[rb] = ra
        return True


def _solve(r: Relations, uf: _UF, blocks: list) -> tuple[dict, dict]:
    """Fixpoint over segments and factors; returns (parts per whole, factors per flat)."""
    facs = list(r.facs)
    while True:
        changed = False
        by_whole: dict = defaultdict(dict)
        for whole, part, start in r.segs:
            key = (start, r.sizes[part])
            seen = by_whole[uf.find(whole)].setdefault(key, part)
            changed |= uf.union(seen, part)
        by_flat: dict = defaultdict(list)
        for flat, parts in facs:
            shape = [(uf.find(p), r.sizes[p]) for p in parts if r.sizes.get(p, 0) > 1]
            if shape not in by_flat[uf.find(flat)]:
                by_flat[uf.find(flat)].append(shape)
        facs = []
        for flat, shapes in by_flat.items():
            if len(shapes) == 1:
                facs.append((flat, [p for p, _ in shapes[0]]))
                continue
            refined = _refine(r, uf, flat, shapes, facs, blocks)
            changed |= refined
        if not changed:
            break
    parts = defaultdict(list)
    for whole, ranges in by_whole.items():
        spans = sorted((start, size, uf.find(p)) for (start, size), p in ranges.items())
        for (s0, n0, _), (s1, _, _) in zip(spans, spans[1:]):
            if s1 < s0 + n0:
                blocks.append((whole, "concat/split/slice ranges overlap"))
        if sum(n for _, n, _ in spans) == r.sizes.get(whole):  # else the whole stays a group
            parts[whole] = [(p, start) for start, _, p in spans]
    return parts, {uf.find(f): [uf.find(p) for p in ps] for f, ps in facs}


def _refine(r: Relations, uf: _UF, flat, shapes, facs, blocks) -> bool:
    """Refine several factorisations of ``flat`` into one over their common strides."""
    total = r.sizes.get(flat) or math.prod(n for _, n in shapes[0])
    cuts = {1, total}
    for shape in shapes:
        stride = total
        for _, n in shape:
            stride //= n
            cuts.add(stride)
    cuts = sorted(cuts, reverse=True)
    if any(a % b for a, b in zip(cuts, cuts[1:])):
        blocks.append((flat, "reshapes split this axis in incompatible ways"))
        facs.append((flat, [p for p, _ in shapes[0]]))
        return False
    leaves = [r.pseudo("refine", flat, hi, size=hi // lo) for hi, lo in zip(cuts, cuts[1:])]
    facs.append((flat, leaves))
    changed = False
    for shape in shapes:
        hi = total
        for part, n in shape:
            inside = [leaf for leaf, (a, b) in zip(leaves, zip(cuts, cuts[1:]))
                      if a <= hi and b >= hi // n]
            if len(inside) == 1:
                changed |= uf.union(part, inside[0])
            else:
                facs.append((part, inside))
            hi //= n
    return changed or len(shapes) > 1


def assemble(view, r: Relations) -> list[tuple]:
    """Groups as ``(name, kind, size, unit, uses, prunable, reason, units, blockers)`` tuples;
    a use is ``(node, tensor, axis, role, offset, unit)``."""
    uf = _UF()
    for a, b in r.unions:
        uf.union(a, b)
    blocks = list(r.blocks)
    parts, facs = _solve(r, uf, blocks)
    own_uses, own_blocks = defaultdict(list), defaultdict(list)
    for u in r.uses:
        own_uses[uf.find(u[0])].append(u[1:])
    for s, reason in blocks:
        own_blocks[uf.find(s)].append(reason)
    own_soft = defaultdict(list)
    for s, reason in r.soft:
        own_soft[uf.find(s)].append(reason)
    residual = {uf.find(s) for s in r.residual}
    wholes = defaultdict(list)
    for whole, ps in parts.items():
        for p, start in ps:
            wholes[p].append((whole, start))
    return _groups(r, uf, parts, facs, wholes, own_uses, (own_blocks, own_soft), residual)


_COUNTED = ("shape", "stat", "range")  # markers and entries: no slice, no unit, no stride


def _groups(r, uf, parts, facs, wholes, own_uses, own, residual) -> list[tuple]:
    own_blocks, own_soft = own
    memo: dict = {}

    def effective(s, stack=()):
        """Uses, blocks and soft reasons of ``s`` and of every whole it is a part of (offsets
        added)."""
        if s in memo:
            return memo[s]
        uses, reasons, soft = list(own_uses[s]), list(own_blocks[s]), list(own_soft[s])
        for whole, start in wholes[s]:
            if whole in stack:
                continue
            wu, wb, ws = effective(whole, (*stack, s))
            reasons += wb
            soft += ws
            for node, tensor, axis, role, offset, typ in wu:
                if role == "shape":  # an entry counting the whole cannot scale with one part
                    reasons.append(f"a reshape entry of {node} counts the concatenated channels")
                else:
                    uses.append((node, tensor, axis, role, offset + start, typ))
        memo[s] = (uses, reasons, soft)
        return memo[s]

    def expand(s, stack=()):
        if s not in facs or s in stack:
            return [s]
        return [leaf for p in facs[s] for leaf in expand(p, (*stack, s))]

    members = defaultdict(list)
    for flat in facs:
        for pos, leaf in enumerate(expand(flat)):
            members[leaf].append((flat, pos))
    for whole, ps in parts.items():
        if whole in members:  # parts of a head axis: units would not line up
            for p, _ in ps:
                own_blocks[p].append("part of a concatenated axis that is reshaped")
    composite = set(facs) | {w for w, ps in parts.items() if ps}
    keys = [s for s in {*own_uses, *wholes, *members} if s not in composite]
    order = r.view.order
    found = []
    for g in keys:
        items = [(g, 1, 0)] + [(f, r.sizes[f] // r.sizes[g] if f in r.sizes else 0, p)
                               for f, p in members[g]]  # 0: a flat axis of symbolic size
        uses, reasons, soft, units = [], [], [], {}
        for s, unit, pos in items:
            eu, eb, es = effective(s)
            reasons += eb
            soft += es
            for node, tensor, axis, role, offset, typ in eu:
                counted = role in _COUNTED
                if not counted and (pos > 0 or not unit):
                    reasons.append(f"{node} reads these channels strided inside a larger axis")
                    continue
                if not counted:
                    units.setdefault(unit, node)
                uses.append((order.get(node, len(order)), node, tensor, axis, role, offset, typ,
                             0 if counted else unit))
        outs = sorted(u for u in uses if u[4] == "out")
        if not outs:
            continue
        unit = outs[0][7]
        producers = {u[6] for u in outs}
        split = any(n > 1 for n in units) and "conv" not in producers
        blockers = tuple(dict.fromkeys(reasons))
        if len(units) > 1:
            reasons.append(_unit_reason(units, split))
        reasons += soft
        if split and not any(u[7] == 1 for u in outs):
            kind = "heads"
        elif g in residual:
            kind = "residual"
        elif "conv" in producers:
            kind = "conv"
        elif producers == {"linear"} and any(u[4] == "in" and u[6] == "linear" for u in uses):
            kind = "ffn"
        else:
            kind = "linear"
        reason = "; ".join(dict.fromkeys(reasons))
        listed: dict = {}
        for u in sorted(uses, key=lambda u: u[:6]):
            listed.setdefault(u[1:6], u[1:6] + (u[7],))
        size = r.sizes[g] * unit  # the first producer's channel count
        found.append((outs[0][0], outs[0][1], kind, size, unit if len(units) < 2 else 1,
                      tuple(listed.values()), not reasons, reason, r.sizes[g], blockers))
    found.sort(key=lambda f: (f[0], f[1], f[3]))
    groups, taken = [], set()
    for _, node, kind, size, unit, listed, prunable, reason, count, blockers in found:
        name = f"{node}:{'heads' if kind == 'heads' else 'out'}"
        base, k = name, 1
        while name in taken:
            name, k = f"{base}#{k}", k + 1
        taken.add(name)
        groups.append((name, kind, size, unit, listed, prunable, reason, count, blockers))
    return groups


def _unit_reason(units: dict, heads: bool) -> str:
    sizes = sorted(units)
    big, small = sizes[-1], sizes[0]
    if heads and small > 1 and big % small == 0:
        return (f"{units[big]} reads {big} channels per unit where {units[small]} reads {small} "
                f"(grouped-query attention: {big // small} query heads share each kv head); "
                "one group unit cannot express both")
    return (f"{units[big]} reads {big} consecutive channels per unit where {units[small]} reads "
            f"{small} (a reshape splits the channel axis, e.g. GroupNorm or a flatten); one group "
            "unit cannot express both")

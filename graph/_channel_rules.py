"""Channel rules, written once over the normalised view: how each op relates channel spaces.

A space is ``(value key, axis)``. Every op either maps each axis of its inputs to an axis of
its outputs (union), places a part in a whole (segment), splits/merges axes (factor), records
the constants it reads along a space (uses), or blocks the spaces it cannot map (an op
without a rule, a reduction or indexing over the axis, a graph input/output). Spaces of size 1
are broadcast and never related. Outputs computed only from constants are blocked on every
axis along which the op does not read a constant itself (an embedding table is a producer).

Some facts stop pruning but not a split of the channels (*soft* reasons, kept apart from the
blocks): a use of quantized weights (pruning scores float weights; prune before quantizing) and
a ``"range"`` use, the min/max that dynamic activation quantization takes over a whole tensor at
run time (a split must combine the ranks' ranges; removing channels changes it).
"""

from __future__ import annotations

from ._channel_view import Const, Op, View

__all__ = ["Relations", "apply_rules"]

Space = tuple


class Relations:
    """Raw relations between spaces, before any union-find is solved."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.sizes: dict[Space, int] = {}
        self.unions: list[tuple[Space, Space]] = []
        self.uses: list[tuple] = []  # (space, node, tensor, axis, role, offset, op type)
        self.blocks: list[tuple[Space, str]] = []
        self.soft: list[tuple[Space, str]] = []  # reasons that stop pruning, not splitting
        self.segs: list[tuple[Space, Space, int]] = []  # (whole, part, start)
        self.facs: list[tuple[Space, list[Space]]] = []  # flat = f0 ⊗ f1 ⊗ ... (row-major)
        self.residual: set[Space] = set()
        self.order = {op.name: k for k, op in enumerate(view.ops)}
        self.producer = {key: op for op in view.ops for key in op.outs}

    # spaces -------------------------------------------------------------------------------
    def space(self, key, axis: int) -> Space | None:
        if not isinstance(key, str):
            return None
        shape = self.view.shapes.get(key)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        s = (key, axis % len(shape))
        if isinstance(shape[s[1]], int):
            self.sizes[s] = shape[s[1]]
        return s

    def spaces(self, key) -> list[Space] | None:
        rank = self.view.rank(key) if isinstance(key, str) else None
        return None if rank is None else [self.space(key, k) for k in range(rank)]

    def size(self, s: Space | None) -> int | None:
        return None if s is None else self.sizes.get(s)

    def pseudo(self, *name, size: int) -> Space:
        s = ("#", *name)
        self.sizes[s] = size
        return s

    # relations ----------------------------------------------------------------------------
    def union(self, a: Space | None, b: Space | None) -> bool:
        """Relate two spaces of equal static size; a size-1 side is a broadcast. A side of
        unknown or different size cannot be related: both are blocked (a coupling that cannot
        be checked must not be dropped silently)."""
        sa, sb = self.size(a), self.size(b)
        if sa is not None and sa == sb and sa > 1:
            self.unions.append((a, b))
            return True
        if sa == 1 or sb == 1 or (sa is None and sb is None):
            return False
        for s in (a, b):
            self.block(s, "coupled with an axis of unknown or different size")
        return False

    def use(self, s: Space | None, c: Const, axis: int, role: str, op: Op, kind: str = "") -> None:
        size = self.size(s)
        if size is not None and size > 1 and c.shape[axis] == size:
            kind = kind or op.type
            self.uses.append((s, c.reader, c.tensor, c.stored_axis(axis), role, 0, kind))
            axis %= len(c.shape)
            for comp in c.companions:  # per-channel scales/zero points of quantized codes
                if comp.axis == axis:
                    self.uses.append((s, comp.reader, comp.tensor, comp.stored, role, 0, kind))
            if c.storage:
                self.soft.append((s, f"{c.reader} reads quantized weights {c.tensor!r} "
                                     "(prune before quantizing)"))

    def range_use(self, key, op: Op) -> None:
        """``op`` takes the min/max over every element of ``key`` at run time (the range of
        dynamic activation quantization): a ``"range"`` marker on each of its axes."""
        for axis, s in enumerate(self.spaces(key) or ()):
            if (self.size(s) or 0) > 1:
                self.uses.append((s, op.name, "", axis, "range", 0, op.type))
                self.soft.append((s, f"{op.name} takes the min/max over these channels at run "
                                     "time (dynamic quantization)"))

    def shape_use(self, s: Space | None, entry, op: Op) -> None:
        size = self.size(s)
        if s is None or size == 1:
            return
        if size is None:  # a symbolic axis: only a run-time read can tie it to another
            if entry.follow is not None:
                self.union(self.space(*entry.follow), s)
            return
        if entry.follow is not None:  # read at run time from an axis it must then equal
            self.union(self.space(*entry.follow), s)
        elif entry.value is None:
            self.block(s, f"a reshape/expand target entry of {op.name} is computed at run time")
        elif entry.value > 0:
            self.uses.append((s, entry.reader, entry.tensor, entry.pos, "shape", 0, op.type))

    def block(self, s: Space | None, reason: str) -> None:
        if s is not None and (self.size(s) or 2) > 1:
            self.blocks.append((s, reason))

    def block_all(self, keys, reason: str) -> None:
        for key in keys:
            for s in self.spaces(key) or ():
                self.block(s, reason)


# rules ------------------------------------------------------------------------------------
def _unary(r: Relations, op: Op) -> None:
    if not op.ins or not isinstance(op.ins[0], str):
        return  # a constant operand: the output is computed from constants (blocked below)
    src = r.spaces(op.ins[0])
    for out in op.outs:
        dst = r.spaces(out)
        if src is None or dst is None or len(src) != len(dst):
            r.block_all([out, op.ins[0]], f"{op.source} {op.name}: rank changes")
            continue
        for a, b in zip(src, dst):
            r.union(a, b)


def _broadcast(r: Relations, op: Op, operands, out: str, *, add: bool = False) -> None:
    dst = r.spaces(out)
    if dst is None:
        r.block_all([x for x in operands if isinstance(x, str)], f"shape of {out} unknown")
        return
    rank = len(dst)
    tied: dict[int, int] = {}
    for x in operands:
        if isinstance(x, Const):
            bias = _bias_of(r, op, operands)
            for i in range(len(x.shape)):
                j = i + rank - len(x.shape)
                if j >= 0:
                    r.use(dst[j], x, i, "out" if bias else "act", op, bias)
        elif isinstance(x, str):
            src = r.spaces(x)
            if src is None:
                r.block_all([out], f"shape of {x} unknown")
                continue
            for i, s in enumerate(src):
                j = i + rank - len(src)
                if j >= 0 and r.union(s, dst[j]):
                    tied[j] = tied.get(j, 0) + 1
    if add:
        r.residual.update(dst[j] for j, n in tied.items() if n > 1)


def _bias_of(r: Relations, op: Op, operands) -> str:
    """``"linear"``/``"conv"`` when ``op`` adds a constant bias to that producer's output."""
    keys = [x for x in operands if isinstance(x, str)]
    if op.source not in ("Add", "aten.add") or len(keys) != 1:
        return ""
    producer = r.producer.get(keys[0])
    return producer.type if producer is not None and producer.type in ("linear", "conv") else ""


def _binary(r: Relations, op: Op) -> None:
    if op.outs:
        _broadcast(r, op, op.ins, op.outs[0], add=op.attrs.get("add", False))


def _linear(r: Relations, op: Op) -> None:
    x, w, b = op.ins
    src, dst = r.spaces(x), r.spaces(op.outs[0])
    if not isinstance(w, Const):  # a computed weight (weight norm): nothing to slice
        r.block_all([k for k in (x, w, b, op.outs[0]) if isinstance(k, str)],
                    f"{op.source} {op.name}: the weight is not a constant")
        return
    if src is None or dst is None or len(src) != len(dst) or w.shape[1] != r.size(src[-1]):
        r.block_all([x, op.outs[0]], f"{op.source} {op.name}: shapes not understood")
        return
    for a, c in zip(src[:-1], dst[:-1]):
        r.union(a, c)
    r.use(dst[-1], w, 0, "out", op)
    r.use(src[-1], w, 1, "in", op)
    if op.attrs.get("range"):  # DynamicQuantizeMatMul quantizes x by its run-time range
        r.range_use(x, op)
    if isinstance(b, Const):
        r.use(dst[-1], b, len(b.shape) - 1, "out", op)
    elif isinstance(b, str):
        _broadcast(r, op, [b], op.outs[0])


def _matmul(r: Relations, op: Op) -> None:
    a, b = r.spaces(op.ins[0]), r.spaces(op.ins[1])
    out = r.spaces(op.outs[0])
    if a is None or b is None or out is None or min(len(a), len(b), len(out)) < 2:
        r.block_all([*op.ins, *op.outs], f"{op.source} {op.name}: shapes not understood")
        return
    r.union(a[-1], b[-2])
    r.union(a[-2], out[-2])
    r.union(b[-1], out[-1])
    for side in (a, b):
        for i, s in enumerate(side[:-2]):
            j = i + len(out) - len(side)
            if j >= 0:
                r.union(s, out[j])


def _sdpa(r: Relations, op: Op) -> None:
    q, k, v = (r.spaces(x) for x in op.ins[:3])
    out = r.spaces(op.outs[0]) if op.outs else None
    if None in (q, k, v, out) or len({len(q), len(k), len(v), len(out)}) != 1 or len(q) < 3:
        r.block_all([*op.ins[:3], *op.outs], f"{op.source} {op.name}: shapes not understood")
        return
    r.union(q[-1], k[-1])
    r.union(k[-2], v[-2])
    r.union(q[-2], out[-2])
    r.union(v[-1], out[-1])
    for i in range(len(q) - 2):
        r.union(q[i], out[i])
        r.union(k[i], v[i])
        if not r.union(q[i], k[i]) and (r.size(q[i]) or 0) > (r.size(k[i]) or 0) > 1:
            rep = r.size(q[i]) // r.size(k[i])  # GQA: query head h reads kv head h // rep
            r.facs.append((q[i], [k[i], r.pseudo("rep", op.name, i, size=rep)]))
    mask = r.spaces(op.ins[3]) if len(op.ins) > 3 else None
    if mask:
        target = [*q[:-2], q[-2], k[-2]]
        for i, s in enumerate(mask):
            r.union(s, target[i + len(target) - len(mask)])


RULES = {"unary": _unary, "binary": _binary, "linear": _linear, "matmul": _matmul, "sdpa": _sdpa}


def apply_rules(view: View) -> Relations:
    """Relate the channel spaces of ``view`` (see the module docstring)."""
    from ._channel_ops import MORE_RULES
    from ._channel_shapes import SHAPE_RULES, complete_shape

    r = Relations(view)
    rules = {**RULES, **SHAPE_RULES, **MORE_RULES}
    derived: set[str] = set()
    for op in view.ops:
        complete_shape(r, op)
        before = len(r.uses)
        rules.get(op.type, _other)(r, op)
        aux = [k for k in op.attrs.get("aux", ()) if isinstance(k, str)]
        r.block_all(aux, f"a shape/bounds vector read by {op.source} {op.name}")  # not channels
        tensors = [x for x in op.ins if x is not None]
        if tensors and all(isinstance(x, Const) or x in derived for x in tensors):
            derived.update(op.outs)  # computed from constants only: block what is not read
            read = {u[0] for u in r.uses[before:]}
            for out in op.outs:
                for s in r.spaces(out) or ():
                    if s not in read:
                        r.block(s, f"computed from constants by {op.source} {op.name}")
    r.block_all(view.inputs, "comes from a graph input")
    for key in view.outputs:
        r.block_all([key], f"reaches graph output {key!r}")
    return r


def _other(r: Relations, op: Op) -> None:
    if op.type in ("shape", "ignore"):
        return
    r.block_all([x for x in op.ins if isinstance(x, str)] + op.outs,
                f"no channel rule for {op.source} ({op.name})")

"""Channel rules for concat/split/slice/indexing, norms, convolutions, pooling, reductions and
softmax (the element-wise, linear, attention and reshape rules are in :mod:`._channel_rules`).

Concat and split place parts at offsets of a whole (split sizes are ``"shape"`` uses of the
parts); a slice that is not the full range blocks the whole (its constant bounds would have
to move with every pruned channel before it). Indexing, reductions and softmax over an axis
block it, except a ``keepdim`` mean: the statistic of a norm (RMSNorm), which keeps shapes
consistent like LayerNorm does, and a whole-tensor min/max (a ``"range"`` op: dynamic
quantization's run-time range), which marks every axis with a ``"range"`` use instead.
"""

from __future__ import annotations

from ._channel_rules import Relations
from ._channel_view import Const, Op

__all__ = ["MORE_RULES"]


def _keep_others(r: Relations, src, dst, axis: int, shift: int = 0) -> None:
    """Union every axis but ``axis`` of ``src`` with ``dst`` (``shift`` axes inserted there)."""
    for i, s in enumerate(src):
        if i < axis:
            r.union(s, dst[i])
        elif i > axis and i - 1 + shift < len(dst):
            r.union(s, dst[i - 1 + shift])


def _concat(r: Relations, op: Op) -> None:
    dst = r.spaces(op.outs[0])
    if dst is None:
        r.block_all([x for x in op.ins if isinstance(x, str)], f"shape of {op.outs[0]} unknown")
        return
    axis, offset = op.attrs["axis"] % len(dst), 0
    for k, x in enumerate(op.ins):
        if isinstance(x, Const):
            size = x.shape[axis]
            for i in range(len(x.shape)):
                if i != axis:
                    r.use(dst[i], x, i, "act", op)
            if size > 0:  # a constant part is no producer (ONNX shape vectors are concats)
                r.segs.append((dst[axis], r.pseudo("concat", op.name, k, size=size), offset))
        else:
            src = r.spaces(x)
            size = r.size(src[axis]) if src is not None and len(src) == len(dst) else None
            if size is None:
                r.block_all([x, op.outs[0]], f"{op.source} {op.name}: shapes not understood")
                return
            for i, s in enumerate(src):
                if i != axis:
                    r.union(s, dst[i])
            if size > 1:
                r.segs.append((dst[axis], src[axis], offset))
        offset += size


def _split(r: Relations, op: Op) -> None:
    src = r.spaces(op.ins[0])
    if src is None:
        r.block_all(op.outs, f"shape of {op.ins[0]} unknown")
        return
    axis, offset = op.attrs["axis"] % len(src), 0
    sizes = op.attrs.get("sizes")
    if sizes is None and len(op.outs) > 1:
        r.block(src[axis], f"{op.source} {op.name} splits into equal parts (or by sizes in an "
                "attribute): the sizes cannot follow a pruned part")
    for k, out in enumerate(op.outs):
        dst = r.spaces(out)
        if dst is None or len(dst) != len(src):
            r.block(src[axis], f"{op.source} {op.name}: shapes not understood")
            continue
        for i, s in enumerate(src):
            if i != axis:
                r.union(s, dst[i])
        size = r.size(dst[axis]) or 0
        if size > 1:
            r.segs.append((src[axis], dst[axis], offset))
            if sizes is not None and k < len(sizes):
                r.shape_use(dst[axis], sizes[k], op)
        offset += size


def _slice(r: Relations, op: Op) -> None:
    src, dst = r.spaces(op.ins[0]), r.spaces(op.outs[0])
    if src is None or dst is None or len(src) != len(dst):
        r.block_all([op.ins[0], *op.outs], f"{op.source} {op.name}: shapes not understood")
        return
    axis = op.attrs["axis"] % len(src)
    _keep_others(r, src, dst, axis, shift=1)
    size = r.size(src[axis])
    start, end, step = op.attrs["start"], op.attrs["end"], op.attrs["step"]
    if size is None or step != 1 or start is None:
        r.block(src[axis], f"{op.source} {op.name}: slice not understood")
        r.block(dst[axis], f"{op.source} {op.name}: slice not understood")
        return
    start = max(0, start + size if start < 0 else start)
    end = size if end is None else min(size, end + size if end < 0 else end)
    if start == 0 and end >= size:
        r.union(src[axis], dst[axis])
        return
    r.segs.append((src[axis], dst[axis], start))
    r.block(src[axis], f"sliced at constant offsets by {op.source} {op.name}")


def _select(r: Relations, op: Op) -> None:
    src = r.spaces(op.ins[0])
    if src is None:
        r.block_all(op.outs, f"shape of {op.ins[0]} unknown")
        return
    axis = op.attrs["axis"] % len(src)
    r.block(src[axis], f"indexed along the channel axis by {op.source} {op.name}")
    for out in op.outs:
        dst = r.spaces(out)
        if dst is not None and len(dst) == len(src) - 1:
            _keep_others(r, src, dst, axis)
        else:
            r.block_all([out], f"{op.source} {op.name}: shapes not understood")


def _gather(r: Relations, op: Op) -> None:
    data, index = op.ins[0], op.ins[1]
    dst = r.spaces(op.outs[0])
    irank = r.view.rank(index) if isinstance(index, str) else (
        len(index.shape) if isinstance(index, Const) else None)
    if dst is None or irank is None:
        r.block_all([data, *op.outs], f"{op.source} {op.name}: shapes not understood")
        return
    axis = op.attrs.get("axis", 0)
    if isinstance(data, Const):
        axis %= len(data.shape)
        for i in range(len(data.shape)):
            if i != axis:
                r.use(dst[i if i < axis else i - 1 + irank], data, i, "out", op)
    else:
        src = r.spaces(data)
        if src is None:
            r.block_all(op.outs, f"shape of {data} unknown")
            return
        axis %= len(src)
        r.block(src[axis], f"indexed along the channel axis by {op.source} {op.name}")
        _keep_others(r, src, dst, axis, shift=irank)
    for i, s in enumerate(r.spaces(index) or ()):
        r.union(s, dst[axis + i])


def _embedding(r: Relations, op: Op) -> None:
    op.attrs["axis"] = 0
    _gather(r, op)


def _stat(r: Relations, s, op: Op, axis: int) -> None:
    """Mark ``s`` as counted by a statistic (a keep-dim mean/var, a weightless norm): removing
    a channel, even a zero one, changes the divisor (role ``"stat"``, no tensor)."""
    if (r.size(s) or 0) > 1:
        r.uses.append((s, op.name, "", axis, "stat", 0, op.type))


def _norm(r: Relations, op: Op, axes: list[int], stat: bool = False) -> None:
    x, params = op.ins[0], op.ins[1:]
    src, dst = r.spaces(x), r.spaces(op.outs[0]) if op.outs else None
    if src is None or dst is None or len(src) != len(dst):
        r.block_all([x, *op.outs[:1]], f"{op.source} {op.name}: shapes not understood")
        return
    for a, b in zip(src, dst):
        r.union(a, b)
    if stat and not any(isinstance(p, Const) for p in params):
        for axis in axes:
            _stat(r, dst[axis], op, axis % len(dst))
    for p in params:
        if isinstance(p, Const) and len(p.shape) == len(axes):
            for k, axis in enumerate(axes):
                r.use(dst[axis], p, k, "norm", op)
        elif isinstance(p, str):
            r.block_all([p], f"{op.source} {op.name}: parameters are not constants")
            for axis in axes:
                r.block(dst[axis], f"{op.source} {op.name}: parameters are not constants")


def _layernorm(r: Relations, op: Op) -> None:
    _norm(r, op, op.attrs["axes"], stat=True)
    dst = r.spaces(op.outs[0]) if op.outs else None
    for axis, entry in zip(op.attrs["axes"], op.attrs.get("shape") or ()):
        if dst is not None and -len(dst) <= axis < len(dst):
            r.shape_use(dst[axis], entry, op)


def _batchnorm(r: Relations, op: Op) -> None:
    _norm(r, op, [1])


def _groupnorm(r: Relations, op: Op) -> None:
    _norm(r, op, [1])
    dst = r.spaces(op.outs[0]) if op.outs else None
    if dst:
        r.block(dst[1], f"{op.source} {op.name}: channels must be pruned by whole groups")


def _conv(r: Relations, op: Op) -> None:
    x, w, b = op.ins
    src, dst = r.spaces(x), r.spaces(op.outs[0])
    if src is None or dst is None or not isinstance(w, Const) or len(src) < 2:
        r.block_all([x, op.outs[0]], f"{op.source} {op.name}: shapes not understood")
        return
    r.union(src[0], dst[0])
    groups, transposed = op.attrs["groups"], op.attrs["transposed"]
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    if groups == 1:
        r.use(dst[1], w, out_axis, "out", op)
        r.use(src[1], w, in_axis, "in", op)
    elif groups == r.size(src[1]) == r.size(dst[1]) and w.shape[in_axis] == 1:
        r.union(src[1], dst[1])  # depthwise: channel c reads only channel c
        r.use(dst[1], w, out_axis, "out", op)
        r.block(dst[1], f"depthwise convolution {op.name}: its group count (an attribute, "
                "not a tensor) must change with the channels")
    else:
        for s in (src[1], dst[1]):
            r.block(s, f"grouped convolution {op.name} (groups={groups})")
    if isinstance(b, Const):
        r.use(dst[1], b, 0, "out", op)
    elif isinstance(b, str):  # a computed bias must follow the output channels
        for s in r.spaces(b) or [None]:
            r.union(s, dst[1])


def _pool(r: Relations, op: Op) -> None:
    src = r.spaces(op.ins[0])
    for out in op.outs:
        dst = r.spaces(out)
        if src is None or dst is None or len(src) < 2 or len(dst) < 2:
            r.block_all([out], f"{op.source} {op.name}: shapes not understood")
            continue
        r.union(src[0], dst[0])
        r.union(src[1], dst[1])


def _reduce(r: Relations, op: Op) -> None:
    src, dst = r.spaces(op.ins[0]), r.spaces(op.outs[0])
    if src is None or dst is None:
        r.block_all([op.ins[0], op.outs[0]], f"{op.source} {op.name}: shapes not understood")
        return
    axes = op.attrs["axes"]
    reduced = set(range(len(src))) if axes is None else {a % len(src) for a in axes}
    keep, mean = op.attrs["keepdim"], op.attrs["mean"]
    j = 0
    for i, s in enumerate(src):
        if i in reduced:
            if not (keep and mean):
                r.block(s, f"reduced by {op.source} {op.name}")
            else:
                _stat(r, s, op, i)
            j += 1 if keep else 0
            continue
        if j < len(dst):
            r.union(s, dst[j])
        j += 1


def _range(r: Relations, op: Op) -> None:
    """A full min/max reduction to a scalar (FX ``aten.min(x)``, ONNX ``ReduceMin`` over all
    axes): every axis of the input gets a ``"range"`` marker instead of a block."""
    if op.ins and isinstance(op.ins[0], str):
        r.range_use(op.ins[0], op)


def _softmax(r: Relations, op: Op) -> None:
    src = r.spaces(op.ins[0])
    _norm(r, Op(op.name, op.type, op.ins[:1], op.outs[:1], {}, op.source), [])
    if src:
        r.block(src[op.attrs["axis"] % len(src)], f"normalised over by {op.source} {op.name}")


MORE_RULES = {"concat": _concat, "split": _split, "slice": _slice, "select": _select,
              "gather": _gather, "embedding": _embedding, "layernorm": _layernorm,
              "batchnorm": _batchnorm, "groupnorm": _groupnorm, "conv": _conv, "pool": _pool,
              "reduce": _reduce, "range": _range, "softmax": _softmax}

"""Channel rules for reshapes, expands and transposes (see :mod:`._channel_rules`).

A reshape is aligned axis by axis on products of static sizes (size-1 axes skipped,
symbolic sizes must match one to one): a block ``[a] -> [a]`` is a union, ``[H·D] -> [H, D]``
(or back) a factorisation of the single axis, ``[a, b] -> [c, d]`` two factorisations of one
pseudo space that the solver refines. Target entries that state an axis's size are
``"shape"`` uses of that axis; ``-1``/``0`` entries follow by themselves; an entry computed at
run time blocks its axis. Expand broadcasts size-1 axes (new spaces) and keeps the others.
"""

from __future__ import annotations

import math

from ._channel_rules import Relations
from ._channel_view import Op

__all__ = ["SHAPE_RULES", "complete_shape"]


def _mono(d) -> tuple[int, tuple[str, ...]] | None:
    """A size as a monomial ``coef · sym1 · sym2...`` (``"12*batch"`` -> ``(12, ("batch",))``)."""
    if isinstance(d, int):
        return d, ()
    if not isinstance(d, str):
        return None
    coef, syms = 1, []
    for part in d.split("*"):
        part = part.strip()
        if part.isdigit():
            coef *= int(part)
        else:
            syms.append(part)
    return coef, tuple(sorted(syms))


def _mul(a, b):
    return a[0] * b[0], tuple(sorted(a[1] + b[1]))


def _div(a, b):
    """``a / b`` as a monomial, or ``None`` when ``b`` does not divide ``a``."""
    if b[0] == 0 or a[0] % b[0]:
        return None
    rest = list(a[1])
    for sym in b[1]:
        if sym not in rest:
            return None
        rest.remove(sym)
    return a[0] // b[0], tuple(rest)


def _token(m) -> int | str:
    return m[0] if not m[1] else "*".join(([str(m[0])] if m[0] != 1 else []) + list(m[1]))


def _align(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Blocks of axes with equal (symbolic) products, size-1 axes skipped, or ``None``."""
    ma = [(k, _mono(d)) for k, d in enumerate(a) if d != 1]
    mb = [(k, _mono(d)) for k, d in enumerate(b) if d != 1]
    if any(m is None for _, m in ma + mb):
        return None
    blocks, i, j = [], 0, 0
    while i < len(ma) and j < len(mb):
        left, right, x, y = [ma[i][0]], [mb[j][0]], ma[i][1], mb[j][1]
        i, j = i + 1, j + 1
        while x != y:
            grow_left = x[0] < y[0] if not x[1] and not y[1] else _div(y, x) is not None
            if grow_left and i < len(ma):
                x, i = _mul(x, ma[i][1]), i + 1
                left.append(ma[i - 1][0])
            elif not grow_left and j < len(mb) and (not x[1] and not y[1] or _div(x, y)):
                y, j = _mul(y, mb[j][1]), j + 1
                right.append(mb[j - 1][0])
            else:
                return None
        blocks.append((left, right))
    return blocks if i == len(ma) and j == len(mb) else None


def _complete(r: Relations, src: tuple, out: str, target) -> tuple | None:
    """The output shape of a reshape with unknown axes, from its target entries."""
    have = r.view.shapes.get(out)
    if target is None or (have is not None and (None not in have or len(have) != len(target))):
        return have
    tokens, free = [], None
    for j, e in enumerate(target):
        if e.follow is not None:
            shape = r.view.shapes.get(e.follow[0])
            tokens.append(shape[e.follow[1]] if shape and -len(shape) <= e.follow[1] < len(shape)
                          else None)
        elif e.value == -1:
            free = j
            tokens.append(None)
        elif e.value == 0:
            tokens.append(src[j] if j < len(src) else None)
        else:
            tokens.append(e.value)
    others = [_mono(t) for t in tokens if t is not None]
    sources = [_mono(d) for d in src]
    if free is not None and len(others) == len(tokens) - 1 and None not in others + sources:
        rest = (1, ())
        for m in sources:
            rest = _mul(rest, m)
        for m in others:
            rest = _div(rest, m) if rest is not None else None
        tokens[free] = _token(rest) if rest is not None else None
    merged = tuple(h if h is not None else t for h, t in zip(have or tokens, tokens))
    r.view.shapes[out] = merged
    return merged


def _reshape(r: Relations, op: Op) -> None:
    x, out = op.ins[0], op.outs[0]
    src = r.view.shapes.get(x)
    dst = _complete(r, src, out, op.attrs.get("target")) if src else r.view.shapes.get(out)
    blocks = None if src is None or dst is None or not isinstance(x, str) else _align(src, dst)
    if blocks is None:
        r.block_all([x, out], f"{op.source} {op.name}: reshape {src} -> {dst} not understood")
        return
    for k, (left, right) in enumerate(blocks):
        ls, rs = [r.space(x, i) for i in left], [r.space(out, j) for j in right]
        if len(ls) == 1 and len(rs) == 1:
            r.union(ls[0], rs[0])
        elif len(ls) == 1 or len(rs) == 1:
            flat, parts = (ls[0], rs) if len(ls) == 1 else (rs[0], ls)
            r.facs.append((flat, parts))
        else:
            flat = r.pseudo("reshape", op.name, k, size=math.prod(r.size(s) for s in ls))
            r.facs.extend([(flat, ls), (flat, rs)])
    target = op.attrs.get("target")
    if target is not None and len(target) == len(dst):
        for j, entry in enumerate(target):
            r.shape_use(r.space(out, j), entry, op)


def _expand(r: Relations, op: Op) -> None:
    src, dst = r.spaces(op.ins[0]), r.spaces(op.outs[0])
    if src is None or dst is None:
        r.block_all([op.ins[0], op.outs[0]], f"{op.source} {op.name}: shapes not understood")
        return
    for i, s in enumerate(src):
        r.union(s, dst[i + len(dst) - len(src)])
    target = op.attrs.get("target") or []
    for i, entry in enumerate(target):
        j = i + len(dst) - len(target)
        if 0 <= j < len(dst) and entry.value != -1:
            r.shape_use(dst[j], entry, op)


def _transpose(r: Relations, op: Op) -> None:
    src, dst, perm = r.spaces(op.ins[0]), r.spaces(op.outs[0]), op.attrs.get("perm")
    if src is None or dst is None or perm is None or len(perm) != len(dst):
        r.block_all([op.ins[0], op.outs[0]], f"{op.source} {op.name}: shapes not understood")
        return
    for j, p in enumerate(perm):
        r.union(src[p], dst[j])


def _broadcast_shape(shapes: list[tuple]) -> tuple | None:
    rank, found = max(len(s) for s in shapes), []
    for k in range(1, rank + 1):
        tokens = {s[-k] for s in shapes if len(s) >= k} - {1}
        known = tokens - {None}
        found.append(next(iter(known)) if len(known) == 1 else (1 if not tokens else None))
    return tuple(reversed(found))


def complete_shape(r: Relations, op: Op) -> None:
    """Fill unknown output axes (exports leave them after run-time reshapes) from the inputs
    of element-wise ops, transposes and products; reshapes complete from their targets."""
    if op.type not in ("unary", "binary", "transpose", "matmul", "softmax") or not op.outs:
        return
    have = r.view.shapes.get(op.outs[0])
    if have is not None and None not in have:
        return
    ins = [r.view.shapes.get(x) if isinstance(x, str) else getattr(x, "shape", None)
           for x in op.ins if x is not None]
    if not ins or any(s is None for s in ins):
        return
    if op.type in ("unary", "softmax"):
        guess = ins[0]
    elif op.type == "transpose":
        perm = op.attrs.get("perm")
        guess = tuple(ins[0][p] for p in perm) if perm and len(perm) == len(ins[0]) else None
    elif op.type == "binary":
        guess = _broadcast_shape(ins)
    else:
        a, b = ins[:2]
        ok = min(len(a), len(b)) >= 2
        guess = _broadcast_shape([a[:-2], b[:-2]]) + (a[-2], b[-1]) if ok else None
    if guess is None or (have is not None and len(have) != len(guess)):
        return
    for out in op.outs if op.type == "unary" else op.outs[:1]:
        now = r.view.shapes.get(out) or guess
        if len(now) == len(guess):
            r.view.shapes[out] = tuple(h if h is not None else g for h, g in zip(now, guess))


SHAPE_RULES = {"reshape": _reshape, "expand": _expand, "transpose": _transpose}

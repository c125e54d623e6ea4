"""Bind symbolic dimensions to integers for the cost model.

A symbolic dim is an FX ``SymInt`` (its sympy expression over symbols such as ``s0``) or an
ONNX ``dim_param`` string (``"batch"``, ``"seq"``, ``"seq + 1"``, ``"2*s0"``). Both resolve
through the same user mapping ``dims`` (symbol name → int). ONNX strings are parsed with a
small ``ast`` evaluator (names, integers, ``+ - * // / %``, ``max``/``min``), never ``eval``:
a model file is untrusted input.

Symbols that appear in the graph's *input* shapes must be bound (the caller raises
:class:`~graphpress.graph.errors.UnsupportedGraphError` naming them). A dim that cannot be
resolved anywhere else (an anonymous ONNX dim, ``unk__3`` from shape inference, an unbacked FX
symbol) makes that value's shape unknown: it then counts 0 bytes and 0 FLOPs.
"""

from __future__ import annotations

import ast
import logging
import math
import operator
from collections.abc import Iterable, Mapping

from .errors import UnsupportedGraphError

__all__ = ["Unbound", "DimBinder", "symbols_of"]

logger = logging.getLogger(__name__)

_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Div: lambda a, b: math.ceil(a / b) if a % b else a // b,
}
_CALLS = {"max": max, "min": min, "Max": max, "Min": min, "floor": math.floor, "ceiling": math.ceil}


class Unbound(Exception):
    """A dimension names symbols that ``dims`` does not bind (internal signal)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)
        super().__init__(", ".join(sorted(self.names)))


class DimBinder:
    """Resolve FX ``SymInt`` / ONNX dims to ints with the user's ``dims`` mapping."""

    def __init__(self, dims: Mapping[str, int] | None) -> None:
        self.dims = {str(k): int(v) for k, v in (dims or {}).items()}
        for name, value in self.dims.items():
            if value < 0:
                raise UnsupportedGraphError(
                    f"dims[{name!r}] = {value} is negative; bind every symbolic dim to a size >= 0"
                )

    # FX ---------------------------------------------------------------------------------------
    def fx_dim(self, dim: object) -> int:
        """An ``int`` or ``SymInt`` as an int; raises :class:`Unbound` naming missing symbols."""
        if isinstance(dim, int):
            return dim
        expr = getattr(getattr(dim, "node", None), "expr", None)
        if expr is None:
            raise Unbound([str(dim)])
        if getattr(expr, "is_number", False):
            return int(expr)
        free = {str(s): s for s in expr.free_symbols}
        missing = [name for name in free if name not in self.dims]
        if missing:
            raise Unbound(missing)
        return int(expr.xreplace({s: self.dims[name] for name, s in free.items()}))

    def fx_shape(self, shape: Iterable[object]) -> tuple[int, ...]:
        return tuple(self.fx_dim(d) for d in shape)

    # ONNX -------------------------------------------------------------------------------------
    def onnx_dim(self, dim: object) -> int:
        """An ONNX dim (int, ``SymbolicDim`` or its string) as an int; raises :class:`Unbound`."""
        if isinstance(dim, int):
            return dim
        text = getattr(dim, "value", dim)
        if text is None:
            raise Unbound(["?"])
        text = str(text)
        if text in self.dims:
            return self.dims[text]
        return _evaluate(text, self.dims)

    def onnx_shape(self, shape: Iterable[object]) -> tuple[int, ...]:
        return tuple(self.onnx_dim(d) for d in shape)


def symbols_of(dim: object) -> frozenset[str]:
    """The symbol names a dim mentions (empty for a static dim)."""
    if isinstance(dim, int):
        return frozenset()
    expr = getattr(getattr(dim, "node", None), "expr", None)
    if expr is not None:
        return frozenset(str(s) for s in expr.free_symbols)
    text = getattr(dim, "value", dim)
    if text is None:
        return frozenset()
    try:
        tree = ast.parse(str(text), mode="eval")
    except SyntaxError:
        return frozenset([str(text)])
    return frozenset(
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id not in _CALLS
    )


def _evaluate(text: str, dims: Mapping[str, int]) -> int:
    """Evaluate an ONNX dim_param expression over bound names (no ``eval``)."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise Unbound([text]) from None
    missing: set[str] = set()

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in dims:
                missing.add(node.id)
                return 1
            return dims[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if right == 0 and isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
                return 0
            return int(_BINOPS[type(node.op)](left, right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _CALLS and not node.keywords):
            return int(_CALLS[node.func.id](*(walk(a) for a in node.args)))
        raise Unbound([text])

    value = walk(tree)
    if missing:
        raise Unbound(missing)
    return value

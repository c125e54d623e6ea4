"""The IR-free view that the channel rules read: normalised ops over keyed values.

An :class:`Op` has a normalised ``type`` (``"linear"``, ``"binary"``, ``"reshape"``... see
:mod:`._channel_rules`), inputs that are value keys, :class:`Const` (a stored constant as the
op sees it) or ``None``, output keys and plain attributes. Value shapes are tuples of ``int``
(static), ``str`` (a symbolic dimension) or ``None`` (unknown). The per-IR adapters
(:mod:`._channel_fx`, :mod:`._channel_onnx`) only read op types, attributes and shapes; a
transpose of a constant is looked through (``Const.perm``) so that rules see one weight layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Const", "Op", "View", "Entry", "build_view"]

Dim = int | str | None


@dataclass(frozen=True)
class Const:
    """A stored constant as an op reads it: ``shape`` is the visible shape and visible axis
    ``i`` is stored axis ``perm[i]``; ``reader`` is the node that reads the stored tensor
    (a transpose between them is that node)."""

    tensor: str
    reader: str
    shape: tuple[int, ...]
    perm: tuple[int, ...]

    def stored_axis(self, axis: int) -> int:
        return self.perm[axis % len(self.perm)]


@dataclass(frozen=True)
class Entry:
    """One entry of a reshape/expand target: its value (``None``: computed at run time) and
    where it is stored: ``tensor``/``pos`` of a constant read by ``reader`` (``tensor`` is
    ``""`` for an FX size list, then ``pos`` is the position in ``reader``'s argument).
    ``follow`` = ``(key, axis)`` when the entry is read at run time from that value's shape
    (ONNX ``Shape``/``Slice``/``Gather``/``Concat`` chains, FX ``sym_size``)."""

    value: int | None
    reader: str = ""
    tensor: str = ""
    pos: int = 0
    follow: tuple[str, int] | None = None


@dataclass
class Op:
    name: str
    type: str
    ins: list = field(default_factory=list)  # str key | Const | None
    outs: list[str] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    source: str = ""  # the IR's own op name, for messages


@dataclass
class View:
    ops: list[Op]
    shapes: dict[str, tuple[Dim, ...] | None]
    inputs: list[str]
    outputs: list[str]
    order: dict[str, int] = field(default_factory=dict)  # every node name, in graph order

    def rank(self, key: str) -> int | None:
        shape = self.shapes.get(key)
        return None if shape is None else len(shape)


def build_view(graph) -> View:
    """The normalised view of an FX ``GraphModule`` or an ``onnx_ir.Model``."""
    from .errors import UnsupportedGraphError
    from .kind import is_canonical_fx, kind

    if kind(graph) == "fx":  # kind() raises UnsupportedGraphError for anything else
        from ._channel_fx import fx_view

        if not is_canonical_fx(graph):
            raise UnsupportedGraphError(
                "channel_groups reads aten-level FX graphs (torch.export); this GraphModule "
                "calls modules or methods: re-capture it with graphpress.graph.capture(model, args)")
        return fx_view(graph)
    from ._channel_onnx import onnx_view

    return onnx_view(graph)

"""The IR-free view that the channel rules read: normalised ops over keyed values.

An :class:`Op` has a normalised ``type`` (``"linear"``, ``"binary"``, ``"reshape"``... see
:mod:`._channel_rules`), inputs that are value keys, :class:`Const` (a stored constant as the
op sees it) or ``None``, output keys and plain attributes. Value shapes are tuples of ``int``
(static), ``str`` (a symbolic dimension) or ``None`` (unknown). The per-IR adapters
(:mod:`._channel_fx`, :mod:`._channel_onnx`) only read op types, attributes and shapes; a
transpose of a constant is looked through (``Const.perm``) so that rules see one weight layout.

Quantized weights are looked through too: a dequantized integer constant (ONNX
``DequantizeLinear``, FX ``quantized_decomposed.dequantize_per_*``, the operands of
``DynamicQuantizeMatMul``) is a :class:`Const` of its integer codes (``storage="int"``) whose
per-channel scales and zero points are :class:`Companion` constants sliced with it along the
quantization axis; a ``MatMulNBits`` weight (or the FX decode chain of ``quantize-weights``) is
a :class:`Const` of its packed codes with the logical ``[N, K]`` shape (``storage="nbits"``),
which the pruning shrinkers slice as a whole (codes, scales, zero points, shape attributes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Companion", "Const", "Op", "View", "Entry", "build_view"]

Dim = int | str | None


@dataclass(frozen=True)
class Companion:
    """A constant sliced together with a dequantized :class:`Const` (a per-channel scale or
    zero point): along visible ``axis`` of the main constant it holds one entry per channel,
    on its own stored axis ``stored``; ``reader`` is the node that reads it."""

    tensor: str
    reader: str
    axis: int
    stored: int


@dataclass(frozen=True)
class Const:
    """A stored constant as an op reads it: ``shape`` is the visible shape and visible axis
    ``i`` is stored axis ``perm[i]``; ``reader`` is the node that reads the stored tensor
    (a transpose between them is that node). ``storage``: ``""`` (float), ``"int"``
    (integer codes dequantized on the way, ``companions`` hold the per-channel scales/zero
    points) or ``"nbits"`` (packed ``MatMulNBits`` blocks; ``shape`` is the logical ``[N, K]``
    and ``reader`` the node that owns codes, scales and zero points)."""

    tensor: str
    reader: str
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    companions: tuple[Companion, ...] = ()
    storage: str = ""

    def stored_axis(self, axis: int) -> int:
        return self.perm[axis % len(self.perm)]

    def reversed(self) -> Const:
        """The same constant read with its visible axes reversed (a 2-D weight as ``[N, K]``
        instead of ``[K, N]``); companions follow their axis."""
        last = len(self.shape) - 1
        companions = tuple(Companion(c.tensor, c.reader, last - c.axis, c.stored)
                           for c in self.companions)
        return Const(self.tensor, self.reader, self.shape[::-1], self.perm[::-1], companions,
                     self.storage)


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

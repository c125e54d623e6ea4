"""The input patches a 2-D convolution multiplies with its weight, for the least-squares refit.

A convolution ``y = W ⋆ x + b`` with ``groups = 1`` is a linear layer on patches: with
``P = unfold(pad(x))`` (one row per output position, ``C·kh·kw`` columns ordered channel-major,
like ``W.reshape(O, C·kh·kw)``), ``y = P·W_flatᵀ + b``. Removing input channel ``c`` removes its
``kh·kw`` columns, so :mod:`._reconstruct` refits a convolution exactly like a linear layer on
the Gram of its patches. :class:`ConvGeometry` is read from an FX ``conv2d``/``convolution``
node or an ONNX ``Conv`` (explicit pads or ``auto_pad`` ``NOTSET``/``VALID``); anything else
(transposed, grouped, 1-D/3-D, ``same`` padding by name) is not a site.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from torch import fx

__all__ = ["ConvGeometry", "conv_geometry"]

_aten = torch.ops.aten


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel, stride, dilation (``(h, w)`` each) and pads ``(top, left, bottom, right)``."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]

    @property
    def taps(self) -> int:
        """Weights per input channel: ``kh·kw``."""
        return self.kernel[0] * self.kernel[1]

    def patches(self, x: np.ndarray) -> np.ndarray:
        """``[N·L, C·kh·kw]`` patch rows of an ``[N, C, H, W]`` input."""
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        top, left, bottom, right = self.pads
        t = torch.nn.functional.pad(t, (left, right, top, bottom))
        cols = torch.nn.functional.unfold(t, self.kernel, dilation=self.dilation,
                                          stride=self.stride)  # [N, C·kh·kw, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()


def _pair(value) -> tuple[int, int] | None:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) for v in values) or len(values) not in (1, 2):
        return None
    return (values[0], values[-1])


def _fx_geometry(node: fx.Node, kernel: tuple[int, int]) -> ConvGeometry | None:
    args = list(node.args) + [None] * 9
    if node.target is _aten.conv2d.default:
        stride, padding, dilation, groups = args[3], args[4], args[5], args[6]
    elif node.target is _aten.convolution.default:
        if args[6]:  # transposed
            return None
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    else:
        return None
    if groups not in (None, 1):
        return None
    stride, padding, dilation = (_pair(v if v is not None else d) for v, d in
                                 ((stride, 1), (padding, 0), (dilation, 1)))
    if stride is None or padding is None or dilation is None:
        return None
    return ConvGeometry(kernel, stride, dilation, (padding[0], padding[1]) * 2)


def _onnx_geometry(node: ir.Node, kernel: tuple[int, int]) -> ConvGeometry | None:
    attrs = node.attributes
    if node.op_type != "Conv" or attrs.get_int("group", 1) != 1:
        return None
    auto = attrs.get_string("auto_pad", "NOTSET")
    if auto not in ("NOTSET", "VALID"):
        return None
    stride = tuple(attrs.get_ints("strides", None) or (1, 1))
    dilation = tuple(attrs.get_ints("dilations", None) or (1, 1))
    pads = tuple(attrs.get_ints("pads", None) or (0, 0, 0, 0)) if auto == "NOTSET" else (0,) * 4
    if len(stride) != 2 or len(dilation) != 2 or len(pads) != 4:
        return None
    return ConvGeometry(kernel, stride, dilation, pads)  # ONNX pads: h_begin, w_begin, h_end, w_end


def conv_geometry(node, weight: np.ndarray) -> ConvGeometry | None:
    """The geometry of a 2-D, ungrouped, non-transposed convolution reading ``weight``
    (``[O, C, kh, kw]``), else ``None``."""
    if weight.ndim != 4:
        return None
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    if isinstance(node, fx.Node):
        return _fx_geometry(node, kernel)
    return _onnx_geometry(node, kernel)

"""Fake quantization with a straight-through estimator, written as aten nodes of an FX graph.

For a tensor ``x`` on an integer grid ``[qmin, qmax]`` with scale ``s`` and zero point ``z``
(broadcast to ``x``), the emitted nodes compute

    v = x.detach() / s            (x·(1/s) where the decomposed quantize ops do, ``inverse``)
    c = clamp(round(v) + z, qmin, qmax)                                  (the integer codes)
    x̂ = (c − z)·s + (x − x.detach())·m,    m = [qmin ≤ round(v) + z ≤ qmax]

The second term is exactly zero in value (``x − x.detach()`` is ``0``), so ``x̂`` equals what
the quantized graph computes bit for bit, while its gradient is the straight-through estimator
``∂x̂/∂x = m`` (``ste="identity"``: ``m = 1``, BitNet's estimator).

With a learned scale (``lsq_grad = g``) the scale enters as ``s' = s.detach() + (g·s −
(g·s).detach())`` (value ``s``, gradient scaled by ``g``) and the rounding as ``r = round(v) +
(v − v.detach())`` (value ``round(v)``, gradient 1), which gives LSQ's gradient
``∂x̂/∂s = g·(round(v) − v)`` inside the grid and ``g·(qmin − z)`` / ``g·(qmax − z)`` outside;
``s`` is clamped to the smallest normal float first so it never reaches 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from graphpress.graph.fx import mark

__all__ = ["PREPARE_PASS", "Builder", "Grid", "fake_quant"]

logger = logging.getLogger(__name__)

#: Provenance of every node ``prepare_qat`` creates.
PREPARE_PASS = "prepare-qat"
_aten = torch.ops.aten
_TINY = float(torch.finfo(torch.float32).tiny)


class Builder:
    """Creates marked nodes in ``gm``'s graph at the current insertion point."""

    def __init__(self, gm: fx.GraphModule, pass_name: str = PREPARE_PASS) -> None:
        self.gm, self.graph, self.pass_name = gm, gm.graph, pass_name

    def __call__(self, op: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return mark(self.graph.call_function(op, args, kwargs), self.pass_name)

    def detach(self, node: fx.Node) -> fx.Node:
        return self(_aten.detach.default, node)

    def attribute(self, name: str, tensor: torch.Tensor, *, parameter: bool,
                  pass_name: str | None = None) -> fx.Node:
        """Register ``tensor`` under a free name derived from ``name``; its ``get_attr`` node
        (marked with ``pass_name``, default the builder's)."""
        base = name.replace(".", "_")
        attr, index = base, 1
        while hasattr(self.gm, attr):
            attr, index = f"{base}_{index}", index + 1
        if parameter:
            self.gm.register_parameter(attr, nn.Parameter(tensor, requires_grad=True))
        else:
            self.gm.register_buffer(attr, tensor)
        return mark(self.graph.get_attr(attr), pass_name or self.pass_name)


@dataclass(frozen=True)
class Grid:
    """The integer grid and gradient of one fake quantization."""

    qmin: int
    qmax: int
    ste: Literal["clipped", "identity"] = "clipped"
    lsq_grad: float | None = None  # LSQ gradient scale g; None: the scale does not train
    inverse: bool = False  # v = x·(1/s) (quantized_decomposed) instead of x/s


def fake_quant(b: Builder, x: fx.Node, scale: fx.Node | float, zero: fx.Node | float | None,
               grid: Grid) -> tuple[fx.Node, fx.Node, fx.Node | float]:
    """``(x̂, codes c, effective scale)`` of ``x`` (module docstring); ``zero=None`` is 0."""
    xd = b.detach(x)
    if grid.lsq_grad is not None:
        if not isinstance(scale, fx.Node):
            raise TypeError("a learned scale must be a graph node")
        scale = b(_aten.clamp.default, scale, _TINY)
        scaled = b(_aten.mul.Tensor, scale, grid.lsq_grad)
        scale = b(_aten.add.Tensor, b.detach(scale),
                  b(_aten.sub.Tensor, scaled, b.detach(scaled)))
    if isinstance(scale, fx.Node):
        v = (b(_aten.mul.Tensor, xd, b(_aten.reciprocal.default, scale)) if grid.inverse
             else b(_aten.div.Tensor, xd, scale))
    else:  # a Python float scale: exactly quantize_per_tensor's input * (1.0 / scale)
        v = b(_aten.mul.Tensor, xd, 1.0 / scale)
    r = b(_aten.round.default, v)
    if grid.lsq_grad is not None:
        r = b(_aten.add.Tensor, r, b(_aten.sub.Tensor, v, b.detach(v)))
    u = r if zero is None else b(_aten.add.Tensor, r, zero)
    codes = b(_aten.clamp.default, u, grid.qmin, grid.qmax)
    centred = codes if zero is None else b(_aten.sub.Tensor, codes, zero)
    value = b(_aten.mul.Tensor, centred, scale)
    passed = b(_aten.sub.Tensor, x, xd)  # 0 in value, gradient 1
    if grid.ste == "clipped":
        inside = b(_aten.logical_and.default, b(_aten.ge.Scalar, u, grid.qmin),
                   b(_aten.le.Scalar, u, grid.qmax))
        passed = b(_aten.mul.Tensor, passed, inside)
    return b(_aten.add.Tensor, value, passed), codes, scale


def lsq_grad_scale(per_scale: int, qmax: int, zero_mean: float) -> float:
    """LSQ's ``g = 1/√(N·Q_P)``: ``N`` values share a scale, ``Q_P = qmax − z̄`` (≥ 1)."""
    positive = max(float(qmax) - zero_mean, 1.0)
    return 1.0 / (max(per_scale, 1) * positive) ** 0.5

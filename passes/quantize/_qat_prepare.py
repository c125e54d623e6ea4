"""The rewrites of ``prepare_qat``: each quantized site becomes a float master weight (or the
activation itself) followed by fake quantization (``_qat_emit``), with a record of what
``convert_qat`` needs to rebuild the original structure.

Master weights start at the dequantized values ``(q − z)·s``, so the prepared graph computes
what the quantized one does; ternary weights in absmean mode start where their recomputed
scale is the stored one (``_qat_ternary``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from graphpress.graph.fx import get_tensor

from ._blockwise import BlockQuant
from ._qat_emit import Builder, Grid, fake_quant, lsq_grad_scale
from ._qat_sites import ActivationSite, AffineSite, BlockSite
from ._qat_ternary import absmean_scale, ternary_master

__all__ = ["AffineRecord", "ActivationRecord", "BlockRecord", "rewrite", "origin_of"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_qd = torch.ops.quantized_decomposed
_SUFFIXES = ("_qdq_q", "_qdyn_q", "_weights_codes", "_ternary_codes")


@dataclass(frozen=True)
class AffineRecord:
    """An int8 weight: codes node, effective scale (attribute if fixed, node if learned, float
    per tensor), zero point (attribute / int / None) and the dequantize call to rebuild."""

    op: Any
    pass_name: str
    codes: str
    codes_attr: str
    codes_dtype: torch.dtype
    scale: str | float
    scale_attr: str | None
    learned: bool
    zero_point: str | int | None
    rest: tuple
    kwargs: tuple


@dataclass(frozen=True)
class ActivationRecord:
    """A static activation Q/DQ pair: input node, scale (float or node), zero point, grid."""

    pass_name: str
    input: str
    scale: str | float
    zero_point: int
    qmin: int
    qmax: int
    dtype: torch.dtype


@dataclass(frozen=True)
class BlockRecord:
    """A block-wise weight: codes ``[N, n_blocks, B]`` and scale ``[N, n_blocks|1, 1]`` nodes."""

    pass_name: str
    origin: str
    codes: str
    scale: str
    zero_points: str | None
    bits: int
    block_size: int
    k: int
    dtype: torch.dtype


Record = AffineRecord | ActivationRecord | BlockRecord


def origin_of(attr: str) -> str:
    """The weight an attribute was made from: ``0_weight_qdq_q`` → ``0_weight``."""
    for suffix in _SUFFIXES:
        if attr.endswith(suffix) and len(attr) > len(suffix):
            return attr[: -len(suffix)]
    return attr


def rewrite(b: Builder, site: Any, learn_scales: bool) -> tuple[fx.Node, Record]:
    """The fake-quant node replacing ``site`` and its record (nodes inserted at ``b``'s point)."""
    if isinstance(site, AffineSite):
        return _affine(b, site, learn_scales)
    if isinstance(site, ActivationSite):
        return _activation(b, site, learn_scales)
    return _block(b, site, learn_scales)


def _affine(b: Builder, site: AffineSite, learn: bool) -> tuple[fx.Node, Record]:
    gm, d = b.gm, site.node
    origin = origin_of(str(site.codes.target))
    with torch.no_grad():  # the master starts at the dequantized weight, computed by d itself
        w0 = d.target(*[get_tensor(gm, a) if isinstance(a, fx.Node) else a for a in d.args],
                      **d.kwargs).float()
    master = b.attribute(f"{origin}.qat.weight", w0.clone(), parameter=True)
    per_channel = d.target is _qd.dequantize_per_channel.default
    if per_channel:  # (q, scales, zero_points | None, axis, qmin, qmax, dtype)
        _, scale_node, zero_node, axis, qmin, qmax = d.args[:6]
        scales = get_tensor(gm, scale_node)
        shape = [1] * w0.dim()
        shape[axis] = -1
        source = (b.attribute(f"{origin}.qat.scale", scales.detach().float().clone(),
                              parameter=True) if learn else scale_node)
        scale = b(_aten.reshape.default, source, shape)
        zero = None if zero_node is None else b(_aten.reshape.default, zero_node, shape)
        zero_mean = 0.0 if zero_node is None else float(get_tensor(gm, zero_node).float().mean())
        per_scale, scale_attr = w0.numel() // max(scales.numel(), 1), str(scale_node.target)
        zero_record = None if zero_node is None else str(zero_node.target)
    else:  # (q, scale, zero_point, qmin, qmax, dtype) with Python scalars
        _, value, zero_int, qmin, qmax = d.args[:5]
        scale = (b.attribute(f"{origin}.qat.scale", torch.tensor(float(value)), parameter=True)
                 if learn else float(value))
        zero = zero_record = int(zero_int)
        zero_mean, per_scale, scale_attr = float(zero_int), w0.numel(), None
    grid = Grid(int(qmin), int(qmax), "clipped",
                lsq_grad_scale(per_scale, int(qmax), zero_mean) if learn else None, inverse=True)
    out, codes_node, effective = fake_quant(b, master, scale, zero, grid)
    # convert reads a learned scale from its effective node, a fixed one from where it was
    recorded = effective.name if learn else (scale_attr if per_channel else effective)
    record = AffineRecord(d.target, site.pass_name, codes_node.name, str(site.codes.target),
                          get_tensor(gm, site.codes).dtype, recorded, scale_attr, learn,
                          zero_record, tuple(d.args[3:]), tuple(d.kwargs.items()))
    return out, record


def _activation(b: Builder, site: ActivationSite, learn: bool) -> tuple[fx.Node, Record]:
    x, value, zero, qmin, qmax, dtype = site.quant.args[:6]
    if learn:
        scale = b.attribute(f"{x.name}.qat.act_scale", torch.tensor(float(value)), parameter=True)
        grad = lsq_grad_scale(_features(x), int(qmax), float(zero))
    else:
        scale, grad = float(value), None
    out, _, effective = fake_quant(b, x, scale, int(zero), Grid(int(qmin), int(qmax), "clipped",
                                                                 grad, inverse=True))
    name = effective.name if isinstance(effective, fx.Node) else effective
    return out, ActivationRecord(site.pass_name, x.name, name, int(zero), int(qmin), int(qmax),
                                 dtype)


def _features(x: fx.Node) -> int:
    """Values per sample of ``x`` (all but the first axis), from ``torch.export``'s example;
    symbolic sizes count as 1."""
    shape = list(getattr(x.meta.get("val"), "shape", None) or ())
    count = 1
    for size in shape[1:] if len(shape) > 1 else shape:
        try:
            count *= int(size)
        except Exception:  # a SymInt without a hint raises several types
            continue
    return max(count, 1)


def _block(b: Builder, site: BlockSite, learn: bool) -> tuple[fx.Node, Record]:
    gm = b.gm
    scales = get_tensor(gm, site.scales).detach().float()
    n, n_blocks = scales.shape[:2]
    zeros = None if site.zero_points is None else get_tensor(gm, site.zero_points)
    packed = get_tensor(gm, site.codes).numpy().reshape(n, n_blocks, -1)
    bq = BlockQuant(None, scales[..., 0].numpy(), None if zeros is None else zeros[..., 0].numpy(),
                    site.bits, site.block_size, site.k, packed=packed)
    absmean = site.ternary and not learn
    per_row = absmean and n_blocks > 1 and bool((scales == scales[:, :1]).all())
    w0 = (ternary_master(bq, scales, per_row) if absmean
          else torch.from_numpy(bq.dequantize()))
    origin = origin_of(str(site.codes.target))
    master = b.attribute(f"{origin}.qat.weight", w0, parameter=True)
    width = n_blocks * site.block_size
    padded = (b(_aten.constant_pad_nd.default, master, [0, width - site.k], 0.0)
              if width != site.k else master)
    w3 = b(_aten.reshape.default, padded, [n, n_blocks, site.block_size])
    if absmean:  # BitNet b1.58: γ from the master weight every step, identity STE
        scale = absmean_scale(b, master, w3, site.k, site.block_size, per_row)
        zero, grid = 2.0, Grid(1, 3, "identity")
    else:
        # fixed scales and zero points move to new names (same tensors, marked with the
        # quantization pass so distillation keeps them frozen): convert_qat rebuilds the
        # original names
        scale = (b.attribute(f"{origin}.qat.scale", scales.clone(), parameter=True) if learn
                 else b.attribute(f"{origin}.qat.scales", get_tensor(gm, site.scales),
                                  parameter=False, pass_name=site.pass_name))
        zero = None if zeros is None else b.attribute(
            f"{origin}.qat.zero_points", zeros, parameter=False, pass_name=site.pass_name)
        zero = (float(1 << (site.bits - 1)) if zero is None else
                b(_aten._to_copy.default, zero, dtype=torch.float32))
        zero_mean = float(1 << (site.bits - 1)) if zeros is None else float(zeros.float().mean())
        qmin, qmax = (1, 3) if site.ternary else (0, (1 << site.bits) - 1)
        grid = Grid(qmin, qmax, "clipped",
                    lsq_grad_scale(site.block_size, qmax, zero_mean) if learn else None)
    out3, codes, effective = fake_quant(b, w3, scale, zero, grid)
    out = b(_aten.reshape.default, out3, [n, width])
    if width != site.k:
        out = b(_aten.slice.Tensor, out, 1, 0, site.k)
    if site.dtype != torch.float32:
        out = b(_aten._to_copy.default, out, dtype=site.dtype)
    record = BlockRecord(site.pass_name, origin, codes.name, effective.name,
                         None if zeros is None else str(zero.args[0].target),
                         site.bits, site.block_size, site.k, site.dtype)
    return out, record

"""BitNet b1.58 absmean ternary for QAT: the scale recomputed from the master weight.

Every forward pass computes ``γ = fp16(mean|W|)`` per block of ``B`` inputs (the last block
counts its ``K mod B`` real entries only), or per row when the quantized graph stores one scale
per row (``quantize-ternary:per_channel=true``); ``γ = 1`` where the mean is 0, float16 rounding
only on float16's normal range, exactly as ``_blockwise.ternary`` stores it. ``γ`` carries no
gradient (BitNet's estimator passes the whole quantizer straight through).

Step 0 must reproduce the stored codes ``t ∈ {−1, 0, 1}`` and scales ``γ₀``. The master weight
starts at ``W₀ = t·γ₀·n/nnz`` per block (``n`` entries, ``nnz`` of them non-zero): its absmean
is ``γ₀`` (up to float32 rounding, which the float16 rounding absorbs) and
``clip(round(W₀/γ₀), −1, 1) = t`` because ``n/nnz ≥ 1``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import fx

from ._blockwise import BlockQuant
from ._qat_emit import Builder

__all__ = ["ternary_master", "absmean_scale"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten


def ternary_master(bq: BlockQuant, scales: torch.Tensor, per_row: bool) -> torch.Tensor:
    """``t·γ·n/nnz`` per block (row): its absmean is ``γ`` and it ternarizes to ``t``."""
    n, n_blocks = scales.shape[:2]
    t = torch.from_numpy(bq.q.astype(np.float32)).reshape(n, n_blocks, bq.block_size) - 2.0
    if per_row:
        nnz, count = (t != 0).sum((1, 2), keepdim=True).float(), float(bq.k)
    else:
        nnz = (t != 0).sum(-1, keepdim=True).float()
        count = torch.full((1, n_blocks, 1), float(bq.block_size))
        count[0, -1, 0] = bq.k - bq.block_size * (n_blocks - 1)
    factor = torch.where(nnz > 0, count / nnz.clamp(min=1.0), torch.ones(()))
    return (t * scales * factor).reshape(n, -1)[:, : bq.k].contiguous()


def absmean_scale(b: Builder, master: fx.Node, w3: fx.Node, k: int, block_size: int,
                  per_row: bool) -> fx.Node:
    """``γ = fp16(mean|W|)`` per block (or row), 1 where 0, without gradient."""
    a = b(_aten.abs.default, b.detach(w3))
    if per_row:
        gamma = b(_aten.div.Tensor, b(_aten.sum.dim_IntList, a, [1, 2], True), float(k))
    elif k % block_size == 0:
        gamma = b(_aten.div.Tensor, b(_aten.sum.dim_IntList, a, [-1], True),
                  float(block_size))
    else:  # the last block holds k mod B real entries: count them as padded ones
        width = -(-k // block_size) * block_size
        ones = b(_aten.constant_pad_nd.default, b(_aten.ones_like.default, b.detach(master)),
                 [0, width - k], 0.0)
        ones = b(_aten.reshape.default, ones, [-1, width // block_size, block_size])
        gamma = b(_aten.div.Tensor, b(_aten.sum.dim_IntList, a, [-1], True),
                  b(_aten.sum.dim_IntList, ones, [-1], True))
    gamma = b(_aten.where.ScalarOther, b(_aten.gt.Scalar, gamma, 0.0), gamma, 1.0)
    half = b(_aten._to_copy.default, b(_aten._to_copy.default, gamma, dtype=torch.float16),
             dtype=torch.float32)
    normal = b(_aten.logical_and.default, b(_aten.ge.Scalar, gamma, 2.0**-14),
               b(_aten.le.Scalar, gamma, 65504.0))
    return b(_aten.where.self, normal, half, gamma)

"""Slice a block-quantized weight (``MatMulNBits`` layout) by output rows or by whole blocks.

The weight ``W_nk`` ``[N, K]`` is stored as packed codes ``[N, blocks, B·bits/8]`` (or that
flattened to ``[N, blocks·B·bits/8]``), scales ``[N, blocks]`` (or ``[N·blocks]``, or
``[N, blocks, 1]`` on FX) and optional zero points, ``uint8`` packed along the blocks
(``[N, ⌈blocks·bits/8⌉]`` or flat) on ONNX, one per block otherwise. Every row ``n`` owns its
codes, scales and zero points, so keeping rows is a ``take`` on axis 0 of each. Along ``K`` a
block is quantized as a whole: only whole blocks can go, so the kept channels must be a union
of aligned blocks (``[b·B, (b+1)·B)``); then the codes, scales and zero points of the kept
blocks are taken (zero points unpacked and packed again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from graphpress.graph.errors import UnsupportedGraphError

from ..quantize._packing import pack_zero_points, unpack_zero_points

__all__ = ["NBitsArrays", "kept_blocks", "slice_nbits"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NBitsArrays:
    """The arrays of one block-quantized weight; ``packed_zero_points`` tells whether the zero
    points are packed ``uint8`` (ONNX ``MatMulNBits``) or one value per block."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    n: int
    k: int
    bits: int
    block: int
    packed_zero_points: bool

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block)


def kept_blocks(kept: np.ndarray, k: int, block: int) -> np.ndarray:
    """The blocks of ``B = block`` input channels that ``kept`` (sorted indices along ``K``)
    consists of, or :class:`UnsupportedGraphError` when it cuts through a block."""
    kept = np.asarray(kept, np.int64)
    if k % block or kept.size % block:
        raise UnsupportedGraphError(
            f"a block-quantized weight (K={k}, block_size={block}) can only lose whole blocks "
            f"of {block} input channels; {kept.size} kept channels are not whole blocks: split "
            "at multiples of block_size, or quantize after splitting")
    chunks = kept.reshape(-1, block)
    if not (np.all(chunks[:, 0] % block == 0) and np.all(np.diff(chunks, axis=1) == 1)):
        raise UnsupportedGraphError(
            f"the kept input channels of a block-quantized weight (block_size={block}) are not "
            "aligned blocks: split at multiples of block_size, or quantize after splitting")
    return chunks[:, 0] // block


def _rows_blocks(array: np.ndarray, n: int, blocks: int) -> np.ndarray:
    return array.reshape(n, blocks, -1)


def _restore(new: np.ndarray, like: np.ndarray, n: int, blocks: int) -> np.ndarray:
    """``new`` ``[n, blocks, rest]`` in the layout (rank) of the original ``like``."""
    if like.ndim == 1:
        return np.ascontiguousarray(new.reshape(-1))
    if like.ndim == 2:
        return np.ascontiguousarray(new.reshape(n, -1))
    return np.ascontiguousarray(new.reshape(n, blocks, *like.shape[2:]))


def slice_nbits(arrays: NBitsArrays, axis: int, kept: np.ndarray) -> NBitsArrays:
    """Keep rows ``kept`` (``axis = 0``) or input channels ``kept`` (``axis = 1``, whole
    aligned blocks) of the weight; every array keeps its layout."""
    a, nb = arrays, arrays.blocks
    codes = _rows_blocks(a.codes, a.n, nb)
    scales = _rows_blocks(a.scales, a.n, nb)
    zero = None
    if a.zero_points is not None:
        flat = a.zero_points.reshape(a.n, -1)
        zero = (unpack_zero_points(flat, a.bits, nb) if a.packed_zero_points
                else flat[:, :nb])[..., None]
    if axis == 0:
        rows = np.asarray(kept, np.int64)
        codes, scales = codes[rows], scales[rows]
        zero = None if zero is None else zero[rows]
        n, k = rows.size, a.k
    else:
        blocks = kept_blocks(kept, a.k, a.block)
        codes, scales = codes[:, blocks], scales[:, blocks]
        zero = None if zero is None else zero[:, blocks]
        n, k = a.n, blocks.size * a.block
    new_nb = -(-k // a.block)
    if zero is not None:
        if a.packed_zero_points:
            zero = pack_zero_points(zero[..., 0], a.bits)
        zero = _restore(zero, a.zero_points, n, new_nb).astype(a.zero_points.dtype)
    return NBitsArrays(_restore(codes, a.codes, n, new_nb), _restore(scales, a.scales, n, new_nb),
                       zero, n, k, a.bits, a.block, a.packed_zero_points)

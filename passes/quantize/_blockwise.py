"""IR-free math of block-wise weight-only quantization (round-to-nearest, ternary, packing).

A weight is handled as ``W`` of shape ``[N, K]`` (output channels × reduction axis; an ONNX
``MatMul`` weight ``[K, N]`` is transposed first). ``K`` is cut into ``n_blocks = ⌈K/B⌉``
blocks of ``B`` columns (the last is padded with zeros); every (row, block) has a scale ``s``
and an unsigned zero point ``z``, and codes ``q ∈ [0, 2^b − 1]`` dequantize as
``Ŵ = (q − z)·s``. Symmetric quantization uses ``z = 2^(b−1)`` for every block (which is the
default ORT assumes when no zero points are given) and ``s = c·absmax/(2^(b−1) − ½)``;
asymmetric uses ``s = c·(max − min)/(2^b − 1)`` and ``z = round(−c·min/s)`` (both ranges
include 0). Codes are ``clip(round(W/s) + z, 0, 2^b − 1)``. Each block tries a few clipping
ratios ``c`` and keeps the one with the smallest squared error (MSE-optimal round-to-nearest);
with centred codes ``c_i = q_i − z`` the error is ``s²·Σc² − 2s·Σc·w + Σw²``, two reductions.
Scales are rounded to float16 (where that is a normal float16) before the codes are chosen, so
they are stored in half the bytes at no extra error.

Packing follows ONNX Runtime's ``com.microsoft`` ``MatMulNBits``/``GatherBlockQuantized``:
codes are packed low bits first along ``K``, ``8/b`` codes per byte, into
``uint8 [N, n_blocks, B·b/8]``; zero points are packed the same way along the blocks into
``uint8 [N, ⌈n_blocks·b/8⌉]``.

BitNet b1.58 ternary (``ternary``): per block ``γ = mean|W|``, ``W_t = clip(round(W/γ), −1, 1)``,
``Ŵ = γ·W_t``, stored as 2-bit codes ``W_t + 2`` with the default zero point 2.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BlockQuant",
    "block_params",
    "quantize_rtn",
    "search_params",
    "round_fp16",
    "fp16_exact",
    "quantize_with",
    "ternary",
    "pack",
    "unpack",
    "pack_zero_points",
    "unpack_zero_points",
    "packed_bytes",
]

logger = logging.getLogger(__name__)

_CLIP_GRID = (1.0, 0.95, 0.9, 0.85)  # wider grids measured no better on MiniLM
_F16_MIN, _F16_MAX = 2.0**-14, 65504.0


@dataclass(frozen=True)
class BlockQuant:
    """Codes ``q`` (uint8 ``[N, n_blocks·B]``, padded), ``scales`` ``[N, n_blocks]`` float32 and
    zero points ``[N, n_blocks]`` uint8 (``None``: symmetric, all ``2^(bits−1)``)."""

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    k: int

    def dequantize(self) -> np.ndarray:
        """``Ŵ`` of shape ``[N, K]`` in float32."""
        n, kp = self.q.shape
        zp = self.zero_points if self.zero_points is not None else np.full(
            self.scales.shape, 1 << (self.bits - 1), np.uint8)
        codes = self.q.reshape(n, -1, self.block_size).astype(np.float32)
        w = (codes - zp[..., None].astype(np.float32)) * self.scales[..., None]
        return w.reshape(n, kp)[:, : self.k].astype(np.float32)


def _pad(w: np.ndarray, block_size: int) -> np.ndarray:
    k = w.shape[1]
    pad = -k % block_size
    return np.pad(w, ((0, 0), (0, pad))) if pad else w


def block_params(w: np.ndarray, bits: int, symmetric: bool, clip: float = 1.0):
    """Scale and zero point (float arrays ``[...]``) of blocks ``w`` ``[..., B]``."""
    qmax = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        absmax = np.abs(w).max(axis=-1) * clip
        scale = absmax / (half - 0.5)  # codes -half..half-1; ±absmax round into the range
        zero = np.full(scale.shape, float(half))
    else:
        lo = np.minimum(w.min(axis=-1), 0.0) * clip
        hi = np.maximum(w.max(axis=-1), 0.0) * clip
        scale = (hi - lo) / qmax
        safe = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.round(-lo / safe), 0, qmax)
    scale = np.where(scale > 0, scale, 1.0)  # an all-zero block: any scale, codes = zero
    return round_fp16(scale), zero


def round_fp16(scale: np.ndarray) -> np.ndarray:
    """``scale`` rounded to float16 wherever that is a normal float16."""
    ok = (scale >= _F16_MIN) & (scale <= _F16_MAX)
    return np.where(ok, scale.astype(np.float16).astype(scale.dtype), scale)


def fp16_exact(scales: np.ndarray) -> bool:
    """Whether every scale is exactly a float16 (then it is stored as float16)."""
    return bool(np.array_equal(scales.astype(np.float16).astype(scales.dtype), scales))


def quantize_with(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Codes of ``w`` ``[..., B]`` for per-block ``scale``/``zero`` ``[...]``."""
    q = np.round(w / scale[..., None]) + zero[..., None]
    return np.clip(q, 0, (1 << bits) - 1)


def search_params(blocks: np.ndarray, bits: int, symmetric: bool, search_clip: bool = True):
    """Per-block ``(scale, zero)`` of ``blocks`` ``[..., B]`` minimising the squared error over
    the clipping grid (``search_clip=False``: no clipping)."""
    best = None
    for clip in _CLIP_GRID if search_clip else (1.0,):
        scale, zero = block_params(blocks, bits, symmetric, clip)
        q = quantize_with(blocks, scale, zero, bits)
        err = (((q - zero[..., None]) * scale[..., None] - blocks) ** 2).sum(-1)
        if best is None:
            best = [scale, zero, err]
            continue
        better = err < best[2]
        best = [np.where(better, scale, best[0]), np.where(better, zero, best[1]),
                np.minimum(err, best[2])]
    return best[0], best[1]


def quantize_rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True,
                 search_clip: bool = True) -> BlockQuant:
    """Round-to-nearest block quantization of ``w`` ``[N, K]`` (MSE-optimal clipping)."""
    n, k = w.shape
    blocks = np.ascontiguousarray(_pad(np.asarray(w, np.float32), block_size)).reshape(
        n, -1, block_size)
    qmax, half = (1 << bits) - 1, 1 << (bits - 1)
    if symmetric:
        hi, lo = np.abs(blocks).max(-1), None
    else:
        lo, hi = np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)
    best, codes = None, np.empty_like(blocks)
    for clip in _CLIP_GRID if search_clip else (1.0,):
        scale = hi * np.float32(clip / (half - 0.5) if symmetric else clip / qmax)
        if not symmetric:
            scale = scale - lo * np.float32(clip / qmax)
        scale = round_fp16(np.where(scale > 0, scale, np.float32(1.0)))
        zero = np.full_like(scale, half) if symmetric else np.clip(
            np.round(-lo * np.float32(clip) / scale), 0, qmax)
        np.round(np.multiply(blocks, (1.0 / scale)[..., None], out=codes), out=codes)
        np.maximum(codes, -zero[..., None], out=codes)  # centred codes
        np.minimum(codes, (qmax - zero)[..., None], out=codes)
        cc = np.einsum("nbk,nbk->nb", codes, codes)
        cw = np.einsum("nbk,nbk->nb", codes, blocks)
        err = scale * scale * cc - 2.0 * scale * cw  # + Σw², the same for every clip
        if best is None:
            best = (err, scale, zero)
        else:
            better = err < best[0]
            best = tuple(np.where(better, new, old) for new, old in zip((err, scale, zero), best))
    _, scale, zero = best
    np.round(np.multiply(blocks, (1.0 / scale)[..., None], out=codes), out=codes)
    np.add(codes, zero[..., None], out=codes)
    np.minimum(np.maximum(codes, 0, out=codes), qmax, out=codes)
    return BlockQuant(
        q=codes.reshape(n, -1).astype(np.uint8), scales=scale.astype(np.float32),
        zero_points=None if symmetric else zero.astype(np.uint8),
        bits=bits, block_size=block_size, k=k,
    )


def ternary(w: np.ndarray, block_size: int, per_channel: bool = False) -> BlockQuant:
    """BitNet b1.58 absmean ternary quantization of ``w`` ``[N, K]`` as 2-bit blocks."""
    n, k = w.shape
    w64 = np.asarray(w, np.float64)
    blocks = _pad(w64, block_size).reshape(n, -1, block_size)
    if per_channel:
        gamma = np.repeat(np.abs(w64).mean(axis=1, keepdims=True), blocks.shape[1], axis=1)
    else:  # mean over the real (unpadded) entries of each block
        counts = np.full(blocks.shape[1], block_size, np.float64)
        counts[-1] = k - block_size * (blocks.shape[1] - 1)
        gamma = np.abs(blocks).sum(-1) / counts
    gamma = round_fp16(np.where(gamma > 0, gamma, 1.0))
    t = np.clip(np.round(blocks / gamma[..., None]), -1, 1)
    return BlockQuant(q=(t + 2).reshape(n, -1).astype(np.uint8), scales=gamma.astype(np.float32),
                      zero_points=None, bits=2, block_size=block_size, k=k)


def pack(q: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Pack codes ``[N, n_blocks·B]`` into ``uint8 [N, n_blocks, B·bits/8]`` (low bits first)."""
    per = 8 // bits
    n = q.shape[0]
    groups = q.astype(np.uint8).reshape(n, -1, per)
    out = np.zeros(groups.shape[:-1], np.uint8)
    for i in range(per):
        out |= (groups[..., i] << (bits * i)).astype(np.uint8)
    return out.reshape(n, -1, block_size * bits // 8)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[N, n_blocks·B]`` of ``packed`` ``uint8 [N, n_blocks, blob]`` (inverse of pack)."""
    per, mask = 8 // bits, (1 << bits) - 1
    flat = packed.reshape(packed.shape[0], -1)
    codes = np.stack([(flat >> (bits * i)) & mask for i in range(per)], axis=-1)
    return codes.reshape(packed.shape[0], -1).astype(np.uint8)


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Zero points ``[N, n_blocks]`` packed along the blocks: ``uint8 [N, ⌈n_blocks·bits/8⌉]``."""
    per = 8 // bits
    n, nb = zero_points.shape
    padded = np.pad(zero_points.astype(np.uint8), ((0, 0), (0, -nb % per)))
    groups = padded.reshape(n, -1, per)
    out = np.zeros(groups.shape[:-1], np.uint8)
    for i in range(per):
        out |= (groups[..., i] << (bits * i)).astype(np.uint8)
    return out


def unpack_zero_points(packed: np.ndarray, bits: int, n_blocks: int) -> np.ndarray:
    per, mask = 8 // bits, (1 << bits) - 1
    codes = np.stack([(packed >> (bits * i)) & mask for i in range(per)], axis=-1)
    return codes.reshape(packed.shape[0], -1)[:, :n_blocks].astype(np.uint8)


def packed_bytes(n: int, k: int, bits: int, block_size: int, symmetric: bool,
                 scale_bytes: int = 4) -> int:
    """Bytes of the quantized form of an ``[N, K]`` weight (codes, scales, zero points)."""
    nb = -(-k // block_size)
    zp = 0 if symmetric else n * -(-nb * bits // 8)
    return n * nb * block_size * bits // 8 + n * nb * scale_bytes + zp

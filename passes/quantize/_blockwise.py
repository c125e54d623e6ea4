"""IR-free math of block-wise weight-only quantization (round-to-nearest, ternary, packing).

A weight is handled as ``W`` of shape ``[N, K]`` (output channels × reduction axis; an ONNX
``MatMul`` weight ``[K, N]`` is transposed first). ``K`` is cut into ``n_blocks = ⌈K/B⌉``
blocks of ``B`` columns (the last is padded with zeros); every (row, block) has a scale ``s``
and an unsigned zero point ``z``, and codes ``q ∈ [0, 2^b − 1]`` dequantize as
``Ŵ = (q − z)·s``. Symmetric quantization uses ``z = 2^(b−1)`` for every block (which is the
default ORT assumes when no zero points are given) and ``s = c·absmax/(2^(b−1) − ½)``;
asymmetric uses ``s = c·(max − min)/(2^b − 1)`` and ``z = round(−c·min/s)`` (both ranges
include 0). Codes are ``clip(round(W/s) + z, 0, 2^b − 1)``. Each block tries a few clipping
ratios ``c`` and keeps the one with the smallest squared error ``Σ(c_i·s − w_i)²`` (centred
codes ``c_i = q_i − z``; MSE-optimal round-to-nearest). Scales are rounded to float16 (where
that is a normal float16) before the codes are chosen, so they are stored in half the bytes at
no extra error. ``quantize_rtn`` works on ``Wᵀ`` ``[K, N]`` in cache-sized chunks: a block is
``B`` consecutive rows there, so its reductions run elementwise over rows (numpy reduces a
short last axis ~20× slower), and an ONNX ``MatMul`` weight is read as stored, without a copy.

Packing into ORT's layouts lives in ``_packing``.

BitNet b1.58 ternary (``ternary``): per block ``γ = mean|W|``, ``W_t = clip(round(W/γ), −1, 1)``,
``Ŵ = γ·W_t``, stored as 2-bit codes ``W_t + 2`` with the default zero point 2.
"""

from __future__ import annotations

import logging

import numpy as np

from ._packing import pack, unpack

__all__ = [
    "BlockQuant",
    "block_params",
    "quantize_rtn",
    "search_params",
    "round_fp16",
    "fp16_exact",
    "quantize_with",
    "ternary",
]

logger = logging.getLogger(__name__)

_CLIP_GRID = (1.0, 0.95, 0.9, 0.85)  # wider grids measured no better on MiniLM
_F16_MIN, _F16_MAX = 2.0**-14, 65504.0
_CHUNK = 1 << 18  # values per chunk of quantize_rtn: its buffers stay in a core's L2 cache


class BlockQuant:
    """Codes ``q`` (uint8 ``[N, n_blocks·B]``, padded), ``scales`` ``[N, n_blocks]`` float32 and
    zero points ``[N, n_blocks]`` uint8 (``None``: symmetric, all ``2^(bits−1)``).

    Made from codes ``q`` or (``q=None``) from ``packed`` codes (``uint8 [N, n_blocks,
    B·bits/8]``, see :func:`pack`); the other form is computed on first use and kept.
    """

    __slots__ = ("_q", "_packed", "scales", "zero_points", "bits", "block_size", "k")

    def __init__(self, q: np.ndarray | None, scales: np.ndarray, zero_points: np.ndarray | None,
                 bits: int, block_size: int, k: int, *, packed: np.ndarray | None = None) -> None:
        if q is None and packed is None:
            raise ValueError("BlockQuant needs codes q or packed codes")
        self._q, self._packed = q, packed
        self.scales, self.zero_points = scales, zero_points
        self.bits, self.block_size, self.k = bits, block_size, k

    @property
    def q(self) -> np.ndarray:
        if self._q is None:
            self._q = unpack(self._packed, self.bits)
        return self._q

    def packed(self) -> np.ndarray:
        """The codes packed as ``uint8 [N, n_blocks, B·bits/8]``."""
        if self._packed is None:
            self._packed = pack(self._q, self.bits, self.block_size)
        return self._packed

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
    if scale.dtype != np.float32:
        return np.where(ok, scale.astype(np.float16).astype(scale.dtype), scale)
    # the float16 cast on its normal range is round-half-even of the low 13 mantissa bits;
    # as integer ops it is ~2× faster than numpy's cast (checked equal on every such float32)
    u = scale.view(np.uint32)
    return np.where(ok, ((u + (0x0FFF + ((u >> 13) & 1))) & np.uint32(0xFFFFE000)).view(
        np.float32), scale)


def fp16_exact(scales: np.ndarray) -> bool:
    """Whether every scale is exactly a float16 (then it is stored as float16)."""
    if scales.dtype == np.float32 and scales.size and (
            _F16_MIN <= scales.min() and scales.max() <= _F16_MAX):  # normal float16 range:
        return not (scales.view(np.uint32) & 0x1FFF).any()  # exact iff 13 low mantissa bits are 0
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
    """Round-to-nearest block quantization of ``w`` ``[N, K]`` (MSE-optimal clipping).

    Chunks of ``Wᵀ`` (at most ``_CHUNK`` values, so they stay in cache) are quantized and
    packed there; only the packed codes are transposed back (``BlockQuant.q`` unpacks them).
    """
    w = np.asarray(w)
    n, k = w.shape
    n_blocks, per = -(-k // block_size), 8 // bits
    kp = n_blocks * block_size
    packed = np.empty((n, kp // per), np.uint8)
    scales = np.empty((n, n_blocks), np.float32)
    zeros = None if symmetric else np.empty((n, n_blocks), np.uint8)
    rows = max(1, -(-n // max(1, -(-n * kp // _CHUNK))))  # equal chunks of ≤ ~_CHUNK values
    direct = kp == k and w.dtype == np.float32 and w.strides[0] <= w.strides[1]  # Wᵀ rows
    buf = None if direct else np.zeros((kp, rows), np.float32)  # rows k.. stay 0: the padding
    codes, acc = np.empty((kp, rows), np.float32), np.empty((kp // per, rows), np.float32)
    for r0 in range(0, n, rows):
        r = min(rows, n - r0)
        if direct:
            x = w[r0:r0 + r].T
        else:
            x = buf[:, :r]
            for s in range(0, r, 64):  # a transposed copy is ~2× faster in narrow strips
                np.copyto(x[:k, s:s + 64], w[r0 + s:r0 + min(s + 64, r)].T, casting="unsafe")
        scale, zero, c = _rtn_chunk(x.reshape(n_blocks, block_size, r), bits, symmetric,
                                    search_clip, codes[:, :r].reshape(n_blocks, block_size, r))
        c = c.reshape(kp // per, per, r)  # byte j of a column holds codes per·j ... per·j+per−1
        byte = c[:, per - 1]
        for i in range(per - 2, -1, -1):  # Horner: Σ c_i·2^(bits·i), exact in float32
            byte = np.add(np.multiply(byte, 1 << bits, out=acc[:, :r]), c[:, i], out=acc[:, :r])
        np.copyto(packed[r0:r0 + r].T, byte, casting="unsafe")
        scales[r0:r0 + r] = scale.T
        if zeros is not None:
            zeros[r0:r0 + r] = zero.T
    return BlockQuant(None, scales, zeros, bits, block_size, k,
                      packed=packed.reshape(n, n_blocks, block_size * bits // 8))


def _rtn_chunk(blocks: np.ndarray, bits: int, symmetric: bool, search_clip: bool,
               codes: np.ndarray):
    """``(scale, zero, codes)`` of ``blocks`` ``[n_blocks, B, r]`` (a block is axis 1); the
    clip with the smallest ``Σ(c·s − w)²`` wins (``c·s − w`` is exact in float32, so the
    float32 sum decides as a float64 one would, up to true near-ties)."""
    hi, lo = blocks.max(1), blocks.min(1)
    if symmetric:
        hi, lo = np.maximum(hi, -lo), None  # max |w|, exactly
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    best = None
    for clip in _CLIP_GRID if search_clip else ():
        scale, zero = _clipped_params(hi, lo, clip, bits)
        _codes(blocks, scale, zero, bits, codes, centred=True)
        np.subtract(np.multiply(codes, scale[:, None], out=codes), blocks, out=codes)
        err = np.einsum("bkr,bkr->br", codes, codes)
        if best is None:
            best = (err, scale, zero)
        else:
            better = err < best[0]
            best = tuple(None if old is None else np.where(better, new, old)
                         for new, old in zip((err, scale, zero), best))
    _, scale, zero = best if best else (None, *_clipped_params(hi, lo, 1.0, bits))
    return scale, zero, _codes(blocks, scale, zero, bits, codes, centred=False)


def _clipped_params(hi: np.ndarray, lo: np.ndarray | None, clip: float, bits: int):
    """Scale and zero point (``None``: symmetric) for clipping ratio ``clip``."""
    qmax, half = (1 << bits) - 1, 1 << (bits - 1)
    if lo is None:
        scale = hi * np.float32(clip / (half - 0.5))
    else:
        scale = hi * np.float32(clip / qmax) - lo * np.float32(clip / qmax)
    scale = round_fp16(np.where(scale > 0, scale, np.float32(1.0)))
    zero = None if lo is None else np.clip(np.round(-lo * np.float32(clip) / scale), 0, qmax)
    return scale, zero


def _codes(blocks, scale, zero, bits: int, out: np.ndarray, centred: bool) -> np.ndarray:
    """Codes ``clip(round(w/s) + z, 0, qmax)`` into ``out``, minus ``z`` if ``centred``
    (``zero`` ``None``: ``z = 2^(b−1)``)."""
    qmax, half = (1 << bits) - 1, 1 << (bits - 1)
    np.round(np.multiply(blocks, (1.0 / scale)[:, None], out=out), out=out)
    if not centred:
        np.add(out, half if zero is None else zero[:, None], out=out)
        return np.clip(out, 0, qmax, out=out)
    if zero is None:
        return np.clip(out, -half, half - 1, out=out)
    return np.minimum(np.maximum(out, -zero[:, None], out=out), (qmax - zero)[:, None], out=out)


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

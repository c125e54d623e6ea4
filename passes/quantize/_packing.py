"""Packing of block-quantized codes into ONNX Runtime's ``com.microsoft`` layouts.

``MatMulNBits``/``GatherBlockQuantized``: codes are packed low bits first along ``K``, ``8/b``
codes per byte, into ``uint8 [N, n_blocks, B·b/8]``; zero points are packed the same way along
the blocks into ``uint8 [N, ⌈n_blocks·b/8⌉]``. ``packed_bytes`` is the size of that form.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack", "unpack", "pack_zero_points", "unpack_zero_points", "packed_bytes"]


def pack(q: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Pack codes ``[N, n_blocks·B]`` into ``uint8 [N, n_blocks, B·bits/8]`` (low bits first)."""
    per, n = 8 // bits, q.shape[0]
    codes = np.asarray(q, np.uint8).reshape(n, -1)
    out = codes[:, per - 1::per].astype(np.uint8)
    for i in range(per - 2, -1, -1):  # Horner, in place
        np.left_shift(out, bits, out=out)
        np.bitwise_or(out, codes[:, i::per], out=out, casting="unsafe")
    return out.reshape(n, -1, block_size * bits // 8)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[N, n_blocks·B]`` of ``packed`` ``uint8 [N, n_blocks, blob]`` (inverse of pack)."""
    per, mask = 8 // bits, (1 << bits) - 1
    flat = packed.reshape(packed.shape[0], int(np.prod(packed.shape[1:])))
    codes = np.stack([(flat >> (bits * i)) & mask for i in range(per)], axis=-1)
    return codes.reshape(flat.shape[0], flat.shape[1] * per).astype(np.uint8)


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

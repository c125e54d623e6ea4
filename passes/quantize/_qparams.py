"""IR-free quantization math on numpy arrays (shared by the static, dynamic and weight passes).

Affine quantization of a real range ``[lo, hi]`` to the integers ``[qmin, qmax]``:

* the range is widened to contain 0 (so zero padding and ReLU zeros are exact):
  ``lo ← min(lo, 0)``, ``hi ← max(hi, 0)``;
* asymmetric: ``scale = (hi − lo) / (qmax − qmin)``, ``zero_point = round(qmin − lo / scale)``
  clipped to ``[qmin, qmax]``;
* symmetric: ``scale = max(|lo|, |hi|) / ((qmax − qmin) / 2)``, ``zero_point`` = the middle
  (0 for signed types, 128 for uint8);
* ``q = clip(round_half_even(x / scale) + zero_point, qmin, qmax)``,
  ``x̂ = (q − zero_point) · scale`` (ONNX ``QuantizeLinear``/``DequantizeLinear`` semantics).

Symmetric int8 weights use the restricted range ``[−127, 127]`` so that ``−w`` quantizes to
``−q``. Per-channel weights use one scale per slice along ``axis`` (the output channels).

SmoothQuant (Xiao et al., 2023) moves activation outliers into the weights of ``Y = X·W``
(``W`` of shape ``[K, N]``): ``s_j = max|X_j|^α / max|W_j|^(1−α)`` for each input channel
``j``; ``X' = X·diag(s)⁻¹`` and ``W' = diag(s)·W`` give the same product in exact arithmetic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

__all__ = [
    "QRANGE",
    "QParams",
    "activation_qparams",
    "quantize_weight",
    "quantize",
    "dequantize",
    "fake_quantize",
    "smooth_scales",
    "range_is_absurd",
]

logger = logging.getLogger(__name__)

#: Integer range of each quantized type.
QRANGE: dict[str, tuple[int, int]] = {
    "uint8": (0, 255),
    "int8": (-128, 127),
    "int16": (-32768, 32767),
}

_TINY = np.float32(1e-12)


@dataclass(frozen=True)
class QParams:
    """Scale and zero point (scalars, or 1-D arrays for per-channel) of one quantized tensor."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # of ``dtype``
    dtype: str
    axis: int | None = None


def _qparams(lo: np.ndarray, hi: np.ndarray, dtype: str, symmetric: bool, restricted: bool) -> QParams:
    qmin, qmax = QRANGE[dtype]
    if restricted and dtype != "uint8":
        qmin = -qmax
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if symmetric:
        amax = np.maximum(-lo, hi)
        scale = amax / ((qmax - qmin) / 2)
        zero = np.full(np.shape(scale), (qmin + qmax + 1) // 2 if dtype == "uint8" else 0)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.round(qmin - lo / safe), qmin, qmax)
    scale = np.where(scale > _TINY, scale, 1.0).astype(np.float32)
    return QParams(scale, zero.astype(dtype), dtype)


def activation_qparams(lo: float, hi: float, dtype: str = "uint8", *, symmetric: bool = False) -> QParams:
    """Per-tensor parameters of an activation with calibrated range ``[lo, hi]``."""
    if dtype not in QRANGE:
        raise ValueError(f"unknown quantized type {dtype!r}; use one of {', '.join(QRANGE)}")
    return _qparams(np.float64(lo), np.float64(hi), dtype, symmetric, restricted=False)


def quantize_weight(
    weight: np.ndarray, *, axis: int | None, symmetric: bool = True, dtype: str = "int8"
) -> tuple[np.ndarray, QParams]:
    """Quantize a constant weight, per channel along ``axis`` (``None``: per tensor)."""
    w = np.asarray(weight, np.float32)
    if axis is None:
        lo, hi = np.float64(w.min(initial=0.0)), np.float64(w.max(initial=0.0))
    else:
        axis = axis % w.ndim
        others = tuple(i for i in range(w.ndim) if i != axis)
        lo, hi = w.min(axis=others), w.max(axis=others)
    params = _qparams(lo, hi, dtype, symmetric, restricted=symmetric)
    params = QParams(params.scale, params.zero_point, dtype, axis)
    return quantize(w, params), params


def _broadcast(array: np.ndarray, params: QParams, ndim: int) -> np.ndarray:
    if params.axis is None or np.ndim(array) == 0:
        return array
    shape = [1] * ndim
    shape[params.axis] = -1
    return np.reshape(array, shape)


def quantize(x: np.ndarray, params: QParams) -> np.ndarray:
    """``clip(round_half_even(x / scale) + zero_point)`` as ``params.dtype``."""
    qmin, qmax = QRANGE[params.dtype]
    scale = _broadcast(params.scale, params, np.ndim(x))
    zero = _broadcast(params.zero_point.astype(np.float64), params, np.ndim(x))
    return np.clip(np.rint(np.asarray(x, np.float64) / scale) + zero, qmin, qmax).astype(params.dtype)


def dequantize(q: np.ndarray, params: QParams) -> np.ndarray:
    """``(q − zero_point) · scale`` as float32."""
    scale = _broadcast(params.scale, params, np.ndim(q))
    zero = _broadcast(params.zero_point.astype(np.float32), params, np.ndim(q))
    return ((q.astype(np.float32) - zero) * scale).astype(np.float32)


def fake_quantize(x: np.ndarray, params: QParams) -> np.ndarray:
    """Quantize then dequantize (what a Q/DQ pair computes)."""
    return dequantize(quantize(x, params), params)


def smooth_scales(
    act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float, *, floor: float = 1e-5
) -> np.ndarray:
    """SmoothQuant's ``s_j = max|X_j|^α / max|W_j|^(1−α)`` per input channel (float32)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    a = np.maximum(np.asarray(act_absmax, np.float64), floor)
    w = np.maximum(np.asarray(weight_absmax, np.float64), floor)
    s = a**alpha / w ** (1.0 - alpha)
    return np.clip(s, floor, 1.0 / floor).astype(np.float32)


def range_is_absurd(lo: float, hi: float, *, ratio: float = 1e4, limit: float = 1e6) -> bool:
    """Whether a calibrated range is meaningless for 8-bit steps: non-finite, huge, or one
    side ``ratio`` times the other (an additive ``-3.4e38`` mask next to ordinary scores)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return True
    if max(abs(lo), abs(hi)) >= limit:
        return True
    small, large = sorted((abs(lo), abs(hi)))
    return large >= ratio * max(small, 1.0)

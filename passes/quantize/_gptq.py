"""IR-free calibrated block quantization: GPTQ (with act-order) and AWQ-style scale search.

Both see a layer ``y = x·Wᵀ`` (``W`` ``[N, K]``) through statistics of its input ``x`` streamed
over calibration batches (:class:`InputStats`): ``H = 2·XᵀX/n`` (``K×K``), the mean ``|x|`` per
input channel and a bounded sample of rows.

**GPTQ** (Frantar et al. 2022) quantizes the columns of ``W`` one at a time and spreads each
column's error over the columns not yet quantized so that ``‖XŴᵀ − XWᵀ‖²`` stays small. With
``λ = 0.01·mean(diag H)``, ``H ← H + λI`` and ``U`` the *upper* Cholesky factor of ``H⁻¹``
(``H⁻¹ = UᵀU``), column ``j`` is quantized to ``q_j`` and the error ``e = (w_j − q_j)/U_jj``
updates ``W_:,j+1: −= e·U_j,j+1:`` (within a lazy batch of 128 columns; the batch's errors
``E`` update the rest at once: ``W_:,rest −= E·U_batch,rest``). Act-order permutes the columns
by descending ``diag H`` first (and un-permutes the codes at the end). Weights that are
exactly zero (a sparsified layer) keep code = zero point, so they dequantize to exactly 0;
the error of holding them at zero is spread over the remaining columns like any other (as
SparseGPT does with its mask). A block's scale/zero
point is chosen when the first of its columns comes up, from the current (error-updated)
values of all its columns, so the scales follow the contiguous blocks ORT's ``MatMulNBits``
expects whatever the order.

**AWQ** (Lin et al. 2023) protects salient input channels: ``s = mean|x|^α`` (normalised by
``√(max s·min s)``), ``W' = W·diag(s)`` is quantized and ``x' = x/s`` at run time, so
``y ≈ (x/s)·Q(W·diag(s))ᵀ``. ``α ∈ {0, 0.1, …, 1}`` minimises the output error on the sampled
rows for all layers sharing the input together; ``α = 0`` is plain round-to-nearest.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ._blockwise import BlockQuant, quantize_rtn, quantize_with, search_params

__all__ = ["InputStats", "gptq", "awq_scales", "output_error"]

logger = logging.getLogger(__name__)


class InputStats:
    """Running ``XᵀX``, row count, ``Σx``, ``Σ|x|`` and a sample of at most ``max_rows`` rows."""

    def __init__(self, k: int, *, max_rows: int = 2048, need_hessian: bool = True) -> None:
        self.xtx = np.zeros((k, k)) if need_hessian else None
        self.sum = np.zeros(k)
        self.abs_sum = np.zeros(k)
        self.rows = 0
        self.max_rows = max_rows
        self.sample: list[np.ndarray] = []
        self._sampled = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, self.abs_sum.shape[0])
        x = x[np.isfinite(x).all(axis=1)]
        if self.xtx is not None:
            self.xtx += x.T @ x
        self.sum += x.sum(axis=0)
        self.abs_sum += np.abs(x).sum(axis=0)
        self.rows += x.shape[0]
        room = self.max_rows - self._sampled
        if room > 0 and x.shape[0]:
            step = max(1, x.shape[0] // max(1, min(room, self.max_rows // 4)))
            take = x[::step][:room]
            self.sample.append(take.astype(np.float32))
            self._sampled += take.shape[0]

    @property
    def hessian(self) -> np.ndarray:
        return 2.0 * self.xtx / max(self.rows, 1)

    def augmented_gram(self) -> np.ndarray:
        """``Σ x̃x̃ᵀ`` over the rows, ``x̃ = [x; 1]``: ``[[XᵀX, Σx], [Σxᵀ, n]]``, ``(K+1)²``."""
        if self.xtx is None:
            raise ValueError("InputStats(need_hessian=False) keeps no XᵀX")
        k = self.sum.shape[0]
        gram = np.empty((k + 1, k + 1))
        gram[:k, :k], gram[:k, k], gram[k, :k], gram[k, k] = (self.xtx, self.sum, self.sum,
                                                              self.rows)
        return gram

    @property
    def abs_mean(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)

    def rows_sample(self) -> np.ndarray:
        return np.concatenate(self.sample) if self.sample else np.zeros((0, self.abs_sum.shape[0]))


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int, block_size: int, symmetric: bool = True,
         *, act_order: bool = True, damp: float = 0.01, lazy: int = 128) -> BlockQuant:
    """GPTQ codes/scales of ``w`` ``[N, K]`` for input Hessian ``hessian`` ``[K, K]``."""
    n, k = w.shape
    h = np.array(hessian, np.float64)
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0  # inputs never active: nothing to compensate, plain rounding
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    pos = np.argsort(perm)
    work = np.array(w, np.float64)[:, perm]
    pruned = work == 0  # exact zeros (a sparsified weight) stay zero: code = zero point
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    lower = torch.linalg.cholesky(torch.from_numpy(h))  # H = LLᵀ, H⁻¹ = L⁻ᵀL⁻¹
    inv_lower = torch.linalg.solve_triangular(lower, torch.eye(k, dtype=lower.dtype), upper=False)
    upper = torch.linalg.cholesky(inv_lower.T @ inv_lower, upper=True).numpy()  # H⁻¹ = UᵀU
    n_blocks = -(-k // block_size)
    scales, zeros = np.ones((n, n_blocks)), np.zeros((n, n_blocks))
    have = np.zeros(n_blocks, bool)
    codes = np.zeros((n, k))
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1, err1, u1 = work[:, i1:i2].copy(), np.zeros((n, i2 - i1)), upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = perm[i1 + i] // block_size
            if not have[g]:  # first column of block g: choose its scales now
                cols = pos[g * block_size: min((g + 1) * block_size, k)]
                inside = (cols >= i1) & (cols < i2)
                values = np.where(inside, w1[:, np.clip(cols - i1, 0, i2 - i1 - 1)], work[:, cols])
                values = np.where(pruned[:, cols], 0.0, values)
                s, z = search_params(values[:, None, :], bits, symmetric)
                scales[:, g], zeros[:, g], have[g] = s[:, 0], z[:, 0], True
            col = w1[:, i]
            s, z = scales[:, g].astype(np.float32).astype(np.float64), zeros[:, g]
            q = np.where(pruned[:, i1 + i], z, quantize_with(col[:, None], s, z, bits)[:, 0])
            err = (col - (q - z) * s) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            err1[:, i] = err
            codes[:, i1 + i] = q
        work[:, i2:] -= err1 @ upper[i1:i2, i2:]
    codes = codes[:, pos]  # back to the original column order
    pad = n_blocks * block_size - k
    fill = zeros[:, -1:].repeat(pad, axis=1)  # padded columns dequantize to exactly 0
    return BlockQuant(
        q=np.concatenate([codes, fill], axis=1).astype(np.uint8),
        scales=scales.astype(np.float32),
        zero_points=None if symmetric else zeros.astype(np.uint8),
        bits=bits, block_size=block_size, k=k,
    )


def awq_scales(weights: list[np.ndarray], stats: InputStats, bits: int, block_size: int,
               symmetric: bool = True, grid: int = 10) -> tuple[np.ndarray, float, float]:
    """``(s, α, relative error)`` of the best activation-aware scaling for ``weights``
    (``[N_i, K]`` each, all fed by the same input)."""
    x = stats.rows_sample()
    mean = np.maximum(stats.abs_mean, 1e-8)
    refs = [x @ w.T for w in weights]
    norm = sum(float((r**2).sum()) for r in refs) or 1.0
    best = (np.ones_like(mean), 0.0, np.inf)
    for alpha in np.linspace(0.0, 1.0, grid + 1):
        s = mean**alpha
        s = s / np.sqrt(s.max() * s.min())
        err = 0.0
        for w, ref in zip(weights, refs):
            deq = quantize_rtn(w * s[None, :], bits, block_size, symmetric,
                              search_clip=False).dequantize()
            err += float(((((x / s) @ deq.T) - ref) ** 2).sum())
        if err < best[2]:
            best = (s, float(alpha), err)
    return best[0], best[1], best[2] / norm


def output_error(x_stats: InputStats, w: np.ndarray, bq: BlockQuant, s) -> float:
    """Relative layer output error ``‖XŴᵀ − XWᵀ‖/‖XWᵀ‖`` on the sampled calibration rows."""
    x = x_stats.rows_sample()
    ref = x @ w.T.astype(np.float64)
    deq = bq.dequantize().astype(np.float64)
    got = (x / s) @ deq.T if s is not None else x @ deq.T
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))

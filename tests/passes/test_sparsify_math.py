"""IR-free math of ``sparsify``: masks (magnitude, global, N:M, Wanda), storage bytes, and which
quantizers keep the zeros exact."""

from __future__ import annotations

import numpy as np
import pytest

from graphpress.passes.quantize._blockwise import quantize_rtn
from graphpress.passes.quantize._gptq import gptq
from graphpress.passes.quantize._qparams import dequantize, quantize_weight
from graphpress.passes.quantize.dynamic import quantize_int8
from graphpress.passes.sparsify._masks import (
    ActivationStats,
    global_masks,
    importance,
    layer_mask,
    nm_mask,
    parse_pattern,
    relative_error,
)
from graphpress.passes.sparsify._storage import nm_valid, smallest, storage_bytes


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_exactly_n_largest_of_every_group(rng, n, m):
    score = rng.random((16, 64))
    keep = nm_mask(score, n, m)
    groups_keep = keep.reshape(16, -1, m)
    assert (groups_keep.sum(axis=-1) == n).all()
    groups = score.reshape(16, -1, m)
    kept_min = np.where(groups_keep, groups, np.inf).min(axis=-1)
    dropped_max = np.where(groups_keep, -np.inf, groups).max(axis=-1)
    assert (kept_min > dropped_max).all()  # the n largest of each group


@pytest.mark.parametrize("k,tail_kept", [(10, 2), (11, 2), (9, 1)])
def test_nm_mask_pads_k_that_is_not_a_multiple_of_m(rng, k, tail_kept):
    keep = nm_mask(rng.random((5, k)), 2, 4)
    assert keep.shape == (5, k)
    assert (keep[:, : k // 4 * 4].reshape(5, -1, 4).sum(-1) == 2).all()
    assert (keep[:, k // 4 * 4:].sum(axis=1) == tail_kept).all()  # min(N, K mod M)
    assert nm_valid(keep, 2, 4)


def test_layer_and_row_masks_zero_the_exact_count(rng):
    score = rng.random((30, 40))
    keep = layer_mask(score, 0.37)
    assert (~keep).sum() == round(0.37 * 1200)
    assert score[~keep].max() < score[keep].min()
    rows = layer_mask(score, 0.25, per_row=True)
    assert ((~rows).sum(axis=1) == 10).all()
    assert layer_mask(score, 0.0).all()


def test_ties_still_give_the_exact_count():
    keep = layer_mask(np.ones((8, 8)), 0.5)
    assert (~keep).sum() == 32


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_global_threshold_hits_the_overall_sparsity(rng, sparsity):
    scores = [rng.random((13, 17)) * 0.1, rng.random((40, 9)), rng.random((7, 31)) * 3]
    masks = global_masks(scores, sparsity)
    total = sum(s.size for s in scores)
    zeros = sum(int((~k).sum()) for k in masks)
    assert abs(zeros - sparsity * total) <= 1  # within one element
    per_layer = [1 - k.mean() for k in masks]
    assert per_layer[0] > per_layer[1] > per_layer[2]  # one threshold: small layers pruned more
    kept = np.concatenate([s[k] for s, k in zip(scores, masks)])
    dropped = np.concatenate([s[~k] for s, k in zip(scores, masks)])
    assert dropped.max() <= kept.min()


def test_global_normalized_compares_relative_scores(rng):
    base = rng.random((20, 20))
    masks = global_masks([base * 0.01, base * 100.0], 0.5, normalize=True)
    assert np.array_equal(masks[0], masks[1])  # same shape of scores: same mask whatever scale


def test_wanda_differs_from_magnitude_and_lowers_output_error(rng):
    n, k = 32, 64
    w = rng.normal(size=(n, k))
    col_scale = np.exp(rng.uniform(-2.5, 2.5, size=k))  # input features of different norms
    x = rng.normal(size=(512, k)) * col_scale
    stats = ActivationStats(k)
    for chunk in np.split(x, 4):
        stats.update(chunk.reshape(2, -1, k))  # any leading shape
    np.testing.assert_allclose(stats.norms, np.linalg.norm(x, axis=0), rtol=1e-10)
    assert stats.rows == 512
    magnitude = layer_mask(importance(w), 0.5)
    wanda = layer_mask(importance(w, stats.norms), 0.5)
    assert (magnitude != wanda).sum() > 0.1 * w.size
    err_mag = relative_error(w, w * magnitude, x)
    err_wanda = relative_error(w, w * wanda, x)
    assert err_wanda < 0.7 * err_mag
    for n_, m_ in [(2, 4)]:  # and for N:M
        e_mag = relative_error(w, w * nm_mask(importance(w), n_, m_), x)
        e_wanda = relative_error(w, w * nm_mask(importance(w, stats.norms), n_, m_), x)
        assert e_wanda < e_mag


def test_relative_error_without_rows_is_the_weight_error(rng):
    w = rng.normal(size=(4, 6))
    w_hat = w.copy()
    w_hat[0] = 0
    assert relative_error(w, w_hat) == pytest.approx(np.linalg.norm(w[0]) / np.linalg.norm(w))
    assert relative_error(w, w_hat, np.zeros((0, 6))) == relative_error(w, w_hat)


@pytest.mark.parametrize("bad", ["2:2", "4:2", "0:4", "two:four", "2-4", "structured"])
def test_parse_pattern_rejects(bad):
    with pytest.raises(ValueError, match="N:M"):
        parse_pattern(bad)


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)


def test_storage_formulas():
    keep = np.tile([True, False, True, False], (4, 2))  # [4, 8], 2:4, nnz 16
    sizes = storage_bytes(keep, 4, (2, 4))
    assert sizes == {
        "dense": 4 * 8 * 4,
        "csr": 16 * (4 + 2) + 5 * 4,  # values + int16 columns + int32 row pointers
        "bitmask": 16 * 4 + 4,  # values + 32 bits
        "nm-index": 16 * 4 + 4,  # 16 values + 16 two-bit indices
        "nm-combinatorial": 16 * 4 + 3,  # 8 groups x 3 bits (C(4,2) = 6)
    }
    assert smallest(sizes) == ("nm-combinatorial", 67)
    eight = storage_bytes(np.tile([True] * 4 + [False] * 4, (2, 2)), 2, (4, 8))
    assert eight["nm-combinatorial"] == 16 * 2 + 4  # 4 groups x 7 bits (C(8,4) = 70) = 28 bits
    assert eight["nm-index"] == 16 * 2 + 6  # 16 three-bit indices = 48 bits


def test_storage_wide_rows_use_int32_indices_and_dense_wins_when_nothing_is_pruned():
    keep = np.zeros((1, 40000), bool)
    keep[0, :10] = True
    assert storage_bytes(keep, 4)["csr"] == 10 * 8 + 2 * 4
    sizes = storage_bytes(np.ones((8, 8), bool), 4)
    assert smallest(sizes) == ("dense", 256)
    assert smallest(storage_bytes(layer_mask(np.random.default_rng(1).random((64, 64)), 0.98),
                                  4))[0] == "csr"
    assert smallest(storage_bytes(layer_mask(np.random.default_rng(1).random((64, 64)), 0.5),
                                  4))[0] == "bitmask"


def test_storage_rejects_a_mask_that_is_not_nm():
    with pytest.raises(ValueError, match="not 2:4"):
        storage_bytes(np.ones((2, 8), bool), 4, (2, 4))


@pytest.fixture
def sparse_w(rng):
    w = rng.normal(size=(48, 64)).astype(np.float32)
    keep = nm_mask(importance(w), 2, 4)
    return np.where(keep, w, 0).astype(np.float32), keep


@pytest.mark.parametrize("symmetric", [True, False])
def test_block_rtn_keeps_zeros(sparse_w, symmetric):
    w, keep = sparse_w
    for bits in (4, 8):
        deq = quantize_rtn(w, bits, 32, symmetric).dequantize()
        assert (deq[~keep] == 0).all()


@pytest.mark.parametrize("symmetric,dtype", [(True, "int8"), (False, "uint8")])
def test_per_channel_int8_keeps_zeros(sparse_w, symmetric, dtype):
    w, keep = sparse_w
    q, params = quantize_weight(w, axis=0, symmetric=symmetric, dtype=dtype)
    assert (dequantize(q, params)[~keep] == 0).all()
    for sym in (True, False):  # quantize-dynamic's int8 (weights K x N, per column)
        q8, scale, zero = quantize_int8(w.T, axis=1, symmetric=sym)
        zp = np.zeros_like(scale, np.int8) if zero is None else zero
        assert (q8[~keep.T] == np.broadcast_to(zp, q8.shape)[~keep.T]).all()


def test_gptq_keeps_zeros_and_still_beats_rtn(sparse_w, rng):
    """GPTQ's error feedback would move zeros on correlated inputs; it holds exact zeros at
    the zero point instead (SparseGPT-style) and still has lower output error than RTN."""
    from graphpress.passes.quantize._blockwise import quantize_rtn

    w, keep = sparse_w
    x = rng.normal(size=(256, 64)) @ rng.normal(size=(64, 64))  # correlated input features
    deq = gptq(w, 2 * x.T @ x / 256, 4, 32, True, act_order=True).dequantize()
    assert (deq[~keep] == 0).all()
    rtn = quantize_rtn(w, 4, 32, True).dequantize()
    assert (rtn[~keep] == 0).all()
    assert np.linalg.norm(x @ (deq - w).T) < np.linalg.norm(x @ (rtn - w).T)

"""Tests of calibration: range methods on known distributions, streaming, robustness to mask
values, FX/ONNX agreement, default targets, save/load and stale-table checks, real MiniLM."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from graphpress.export import to_onnx
from graphpress.graph import capture
from graphpress.graph.errors import PreconditionError
from graphpress.passes._histogram import Accumulator
from graphpress.passes.calibrate import (
    CalibrationFileError,
    CalibrationTable,
    activation_targets,
    calibrate,
)

F, I64 = TensorProto.FLOAT, TensorProto.INT64
F32_MIN = float(np.finfo(np.float32).min)


def linear_model(h, width: int = 4):
    """``y = x @ W``: ``x`` (a graph input) is the only default target."""
    weight = np.random.default_rng(1).normal(size=(width, 3)).astype(np.float32)
    return h.make_onnx([helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [("x", F, ["n", width])], [("y", F, ["n", 3])], {"w": weight})


def feed(data: np.ndarray, pieces: int) -> list[dict[str, np.ndarray]]:
    return [{"x": chunk.astype(np.float32)} for chunk in np.array_split(data, pieces)]


def attention_model(h):
    """A transformer-like block: projections, scores, float-min additive mask, softmax, output."""
    d, gen = 8, np.random.default_rng(2)
    weights = {f"w{k}": gen.normal(size=(d, d)).astype(np.float32) for k in "qkvo"}
    weights |= {"one": np.array(1.0, np.float32), "neg": np.array(F32_MIN, np.float32),
                "scale": np.array(d**-0.5, np.float32), "axes": np.array([1], np.int64)}
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Sub", ["one", "mask"], ["inverted"]),
        helper.make_node("Mul", ["inverted", "neg"], ["mask_add"]),
        helper.make_node("Unsqueeze", ["mask_add", "axes"], ["mask_b"]),
        helper.make_node("Add", ["scaled", "mask_b"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["context"]),
        helper.make_node("MatMul", ["context", "wo"], ["out"]),
    ]
    return h.make_onnx(nodes, [("x", F, [2, 5, d]), ("mask", F, [2, 5])],
                       [("out", F, [2, 5, d])], weights)


def attention_batches(count: int = 3) -> list[dict[str, np.ndarray]]:
    mask = np.ones((2, 5), np.float32)
    mask[:, 3:] = 0  # the last two keys are padding
    gen = np.random.default_rng(3)
    return [{"x": gen.normal(size=(2, 5, 8)).astype(np.float32), "mask": mask}
            for _ in range(count)]


# ---------------------------------------------------------------- methods on known data


def test_minmax_is_exact(h):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(1000, 4)) * 3
    table = calibrate(linear_model(h), feed(data, 7))
    assert table.kind == "onnx" and table.method == "minmax" and list(table.ranges) == ["x"]
    lo, hi = table.range("x")
    assert lo == float(data.astype(np.float32).min()) and hi == float(data.astype(np.float32).max())
    assert table.stats["x"].count == data.size and table.stats["x"].nonfinite == 0


def test_percentile_of_known_distributions(h):
    rng = np.random.default_rng(0)
    gauss = rng.normal(size=(100_000, 4))
    lo, hi = calibrate(linear_model(h), feed(gauss, 10), method="percentile",
                       percentile=99.0).range("x")
    assert lo == pytest.approx(-2.5758, abs=0.03) and hi == pytest.approx(2.5758, abs=0.03)
    # non-negative data: only the top is clipped, the bottom stays at the minimum
    expo = rng.exponential(size=(100_000, 4))
    lo, hi = calibrate(linear_model(h), feed(expo, 10), method="percentile",
                       percentile=99.0).range("x")
    assert lo == pytest.approx(expo.min(), abs=1e-6) and hi == pytest.approx(np.log(100), rel=0.02)


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_entropy_and_mse_clip_heavy_tails_keep_gaussian(h, method):
    rng = np.random.default_rng(0)
    heavy = rng.standard_t(3, size=(200_000, 4))
    lo, hi = calibrate(linear_model(h), feed(heavy, 5), method=method).range("x")
    factor = {"entropy": 0.5, "mse": 0.8}[method]  # both much tighter than minmax
    assert hi < factor * heavy.max() and lo > factor * heavy.min()
    assert np.mean((heavy >= lo) & (heavy <= hi)) > 0.999
    gauss = rng.normal(size=(200_000, 4))
    lo, hi = calibrate(linear_model(h), feed(gauss, 5), method=method).range("x")
    assert np.mean((gauss >= lo) & (gauss <= hi)) > 0.9995  # nearly all mass kept
    assert hi > 3.5 and lo < -3.5


def test_mse_matches_the_analytic_optimal_clip(h):
    """Banner et al. (ACIQ): the 8-bit MSE-optimal clip is 9.89·b for Laplace(b), 3.92·σ for
    a Gaussian."""
    rng = np.random.default_rng(0)
    laplace = rng.laplace(scale=2.0, size=(200_000, 4))
    lo, hi = calibrate(linear_model(h), feed(laplace, 5), method="mse").range("x")
    assert hi == pytest.approx(9.89 * 2.0, rel=0.04) and lo == -hi
    gauss = rng.normal(scale=0.5, size=(200_000, 4))
    lo, hi = calibrate(linear_model(h), feed(gauss, 5), method="mse").range("x")
    assert hi == pytest.approx(3.92 * 0.5, rel=0.04)


def test_entropy_clips_sparse_outliers_tighter_than_minmax(h):
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.normal(size=400_000), [150.0, -120.0, 90.0, -200.0]])
    lo, hi = calibrate(linear_model(h, 1), feed(data[:, None], 4), method="entropy").range("x")
    assert -20 < lo < -3.5 and 3.5 < hi < 20


def test_with_method_recomputes_from_histograms_without_rerun(h):
    rng = np.random.default_rng(0)
    data = rng.laplace(size=(50_000, 4))
    base = calibrate(linear_model(h), feed(data, 5))
    for method, options in [("percentile", {"percentile": 99.9}), ("entropy", {}), ("mse", {})]:
        direct = calibrate(linear_model(h), feed(data, 5), method=method, **options)
        derived = base.with_method(method, **options)
        assert derived.method == method and derived.stats == base.stats
        assert derived.range("x") == pytest.approx(direct.range("x"))
    sym = base.with_method("minmax", symmetric=True).range("x")
    assert sym[0] == -sym[1] == -max(abs(data.astype(np.float32).min()), data.max().astype(np.float32))
    with pytest.raises(PreconditionError, match="unknown calibration method"):
        base.with_method("kl")
    with pytest.raises(PreconditionError, match="calibrate again"):
        base.with_method("entropy", bins=512)


# ---------------------------------------------------------------- streaming and memory


def test_streaming_equals_one_shot(h):
    rng = np.random.default_rng(0)
    data = rng.standard_t(3, size=(60_000, 4))
    model = linear_model(h)
    for method in ("minmax", "percentile", "entropy", "mse"):
        one = calibrate(model, feed(data, 1), method=method)
        many = calibrate(model, feed(data, 60), method=method)
        a, b = one.stats["x"], many.stats["x"]
        assert (a.hist_lo, a.hist_hi, a.count) == (b.hist_lo, b.hist_hi, b.count)
        assert sum(b.histogram) == pytest.approx(sum(a.histogram))
        if method == "minmax":
            assert one.range("x") == many.range("x")
        else:
            width = a.hist_hi - a.hist_lo
            assert np.allclose(one.range("x"), many.range("x"), atol=0.01 * width)


def test_histogram_memory_is_bounded_by_bins():
    rng = np.random.default_rng(0)
    acc = Accumulator(bins=256, momentum=None, axis=None, drop_above=1e30)
    for i in range(300):  # a widening range: every batch re-bins
        acc.add(rng.normal(size=1000) * (1 + i / 10))
        assert acc.hist.shape == (256,)
    assert acc.count == 300_000 and acc.hist.sum() == pytest.approx(300_000)
    assert acc.lo < -30 and acc.hi > 30


def test_moving_average_minmax(h):
    batches = [np.array([[-1.0, 2.0]]), np.array([[-3.0, 4.0]]), np.array([[-2.0, 1.0]])]
    table = calibrate(linear_model(h, 2), [{"x": b.astype(np.float32)} for b in batches],
                      momentum=0.9)
    lo, hi = -1.0, 2.0
    for b in batches[1:]:
        lo, hi = 0.9 * lo + 0.1 * b.min(), 0.9 * hi + 0.1 * b.max()
    assert table.range("x") == pytest.approx((lo, hi))
    assert (table.stats["x"].hist_lo, table.stats["x"].hist_hi) == (-3.0, 4.0)  # histogram global
    assert table.options["momentum"] == 0.9
    with pytest.raises(PreconditionError, match="momentum"):
        calibrate(linear_model(h, 2), [{"x": batches[0].astype(np.float32)}], momentum=1.5)


# ---------------------------------------------------------------- robustness


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_float_min_inf_and_nan_are_dropped_and_counted(h, method):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(20_000, 4)).astype(np.float32)
    data[::50, 0] = F32_MIN  # additive attention mask values
    data[1, 1], data[2, 2], data[3, 3] = np.inf, -np.inf, np.nan
    table = calibrate(linear_model(h), [{"x": data}], method=method)
    lo, hi = table.range("x")
    stats = table.stats["x"]
    assert stats.nonfinite == 400 + 3 and stats.count == data.size - 403
    assert -6 < lo < -2 and 2 < hi < 6


def test_large_finite_mask_values_are_dropped_below_a_lower_threshold(h):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(5_000, 4)).astype(np.float32)
    data[::10, 2] = -1e9  # an older-style additive mask: finite, below the 1e30 default
    kept = calibrate(linear_model(h), [{"x": data}], method="entropy")
    assert kept.range("x")[0] == pytest.approx(-1e9) and kept.stats["x"].nonfinite == 0
    table = calibrate(linear_model(h), [{"x": data}], method="entropy", drop_above=1e6)
    assert table.stats["x"].nonfinite == 500 and -6 < table.range("x")[0] < -2
    assert table.options["drop_above"] == 1e6


def test_masked_scores_in_a_real_graph_get_a_sensible_range(h):
    table = calibrate(attention_model(h), attention_batches(), method="entropy",
                      targets=["masked", "scaled"])
    stats = table.stats["masked"]
    assert stats.nonfinite == 3 * 2 * 5 * 2  # batches × batch × queries × padded keys
    lo, hi = table.range("masked")
    unmasked = table.stats["scaled"]
    assert unmasked.minimum - 1e-6 <= lo < hi <= unmasked.maximum + 1e-6


# ---------------------------------------------------------------- targets and graph kinds


def test_default_targets_exclude_the_attention_mask_path(h):
    targets = activation_targets(attention_model(h))
    assert targets == ["x", "q", "kt", "probs", "v", "context"]
    table = calibrate(attention_model(h), attention_batches())
    assert all(s.nonfinite == 0 for s in table.stats.values())
    assert table.range("probs")[0] >= 0 and table.range("probs")[1] <= 1


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        hidden = torch.relu(self.fc1(x))
        attn = torch.softmax(hidden @ hidden.transpose(-1, -2), dim=-1)
        return self.fc2(attn @ hidden)


@pytest.fixture(scope="module")
def block_graphs():
    example = torch.randn(2, 6, 8)
    gm = capture(Block().eval(), (example,))
    return gm, to_onnx(gm, (example,))


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_fx_and_onnx_give_the_same_ranges(h, block_graphs, method):
    gm, model = block_graphs
    fx_before, onnx_before = h.fx_snapshot(gm), h.onnx_snapshot(model)
    data = [torch.randn(2, 6, 8) * (1 + i) for i in range(4)]
    fx_table = calibrate(gm, [(x,) for x in data], method=method)
    onnx_table = calibrate(model, [{"x": x.numpy()} for x in data], method=method)
    assert fx_table.kind == "fx" and onnx_table.kind == "onnx"
    fx_ranges = sorted(fx_table.ranges.values())
    onnx_ranges = sorted(onnx_table.ranges.values())
    assert len(fx_ranges) == len(onnx_ranges) >= 4
    assert np.allclose(fx_ranges, onnx_ranges, rtol=1e-4, atol=1e-5)
    weights = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    assert not weights & set(fx_table.ranges)
    h.assert_fx_unchanged(gm, fx_before)  # calibration never changes the graph
    assert h.onnx_snapshot(model) == onnx_before


# ---------------------------------------------------------------- files and staleness


def test_save_load_round_trip(h, tmp_path):
    table = calibrate(attention_model(h), attention_batches(), method="entropy",
                      channel_axis=-1)
    path = table.save(tmp_path / "sub" / "table.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.json"]  # no temp left
    loaded = CalibrationTable.load(path)
    assert loaded == table
    assert len(loaded.stats["q"].channel_min) == 8
    assert loaded.with_method("mse").ranges == table.with_method("mse").ranges


def test_corrupt_or_missing_file_is_a_typed_error(h, tmp_path):
    rng = np.random.default_rng(0)
    path = calibrate(linear_model(h), feed(rng.normal(size=(10, 4)), 2)).save(tmp_path / "t.json")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(CalibrationFileError, match="JSON"):
        CalibrationTable.load(path)
    document = json.loads(text)
    document["ranges"]["x"] = [1.0]
    path.write_text(json.dumps(document))
    with pytest.raises(CalibrationFileError, match="malformed"):
        CalibrationTable.load(path)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CalibrationFileError, match="format"):
        CalibrationTable.load(path)
    with pytest.raises(CalibrationFileError, match="does not exist"):
        CalibrationTable.load(tmp_path / "missing.json")


def test_stale_table_lists_missing_names(h, block_graphs):
    table = calibrate(attention_model(h), attention_batches())
    table.check(attention_model(h), ["q", "probs"])  # fresh: no error
    renamed = attention_model(h)
    for node in renamed.graph:
        if node.op_type == "Softmax":
            node.outputs[0].name = "probs.renamed"
    with pytest.raises(PreconditionError, match=r"not in the graph: probs\b"):
        table.check(renamed)
    with pytest.raises(PreconditionError, match="not in the table: masked, scaled"):
        table.check(attention_model(h), ["q", "scaled", "masked"])
    with pytest.raises(PreconditionError, match="no range for 'scaled'"):
        table.range("scaled")
    gm = block_graphs[0]
    with pytest.raises(PreconditionError, match="onnx graph but is applied to a fx graph"):
        table.check(gm)


def test_bad_arguments_are_precondition_errors(h):
    rng = np.random.default_rng(0)
    model = linear_model(h)
    batches = feed(rng.normal(size=(10, 4)), 1)
    with pytest.raises(PreconditionError, match="unknown calibration method"):
        calibrate(model, batches, method="kl")
    with pytest.raises(PreconditionError, match="percentile"):
        calibrate(model, batches, method="percentile", percentile=0)
    with pytest.raises(PreconditionError, match="nothing to calibrate"):
        calibrate(model, batches, targets=[])
    with pytest.raises(PreconditionError, match="no values named"):
        calibrate(model, batches, targets=["nope"])


def test_progress_bar_and_per_channel(h, capsys):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 5, 8)).astype(np.float32)
    data[..., 0] *= 10
    table = calibrate(attention_model(h), [{"x": data, "mask": np.ones((2, 5), np.float32)}],
                      targets=["x", "q"], progress=True, channel_axis=-1)
    stats = table.stats["x"]
    assert stats.channel_max == pytest.approx(tuple(data.reshape(-1, 8).max(0)))
    assert stats.channel_min == pytest.approx(tuple(data.reshape(-1, 8).min(0)))
    assert "calibrating" in capsys.readouterr().err


# ---------------------------------------------------------------- a real model


def test_minilm_entropy_calibration(minilm_tokenizer):
    from graphpress.data import stdlib_sentences

    model, tokenizer = minilm_tokenizer

    def encode(sentences, kind):
        enc = tokenizer(sentences, padding="max_length", max_length=32, truncation=True,
                        return_tensors=kind)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    onnx_model = to_onnx(model, (), encode(stdlib_sentences(4), "pt"))
    sentences = stdlib_sentences(8, offset=200)
    batches = [encode(sentences[i : i + 4], "np") for i in (0, 4)]
    start = time.perf_counter()
    table = calibrate(onnx_model, batches, method="entropy")
    seconds = time.perf_counter() - start
    assert seconds < 20
    assert len(table.ranges) >= 6 * 6  # every layer's MatMul inputs
    for name, (lo, hi) in table.ranges.items():
        assert np.isfinite([lo, hi]).all() and lo <= hi and max(-lo, hi) < 1e3, name
        assert table.stats[name].nonfinite == 0, name
    table.check(onnx_model)

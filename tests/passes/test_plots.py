"""Per-layer plots: valid, decodable, deterministic, bounded PNGs drawn only from data that exists."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from graphpress.passes._plots import (
    MAX_LINES,
    error_curve_png,
    layer_bars_png,
    layer_plots,
    metric_value,
    spectra_png,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows(n: int, seed: int = 0) -> list[dict]:
    """Rows as a low-rank pass reports them: real SVD spectra and weight-error curves."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w = rng.standard_normal((24, 16)) @ np.diag(np.geomspace(1, 1e-3, 16))
        s = np.linalg.svd(w, compute_uv=False)
        ranks = np.arange(1, 17)
        errors = np.sqrt(np.maximum(np.sum(s**2) - np.cumsum(s**2), 0) / np.sum(s**2))
        rank = 4 + i % 5
        rows.append(
            {
                "layer": f"encoder.layer.{i}.intermediate.dense",
                "shape": (24, 16),
                "rank": rank,
                "max_rank": 16,
                "params_before": 24 * 16,
                "params_after": rank * (24 + 16),
                "output_error": float(errors[rank - 1]),
                "spectrum": s.tolist(),
                "error_curve": [[r * 40 / 384, e] for r, e in zip(ranks, errors)],
            }
        )
    return rows


def _image(png: bytes) -> np.ndarray:
    assert png.startswith(PNG_SIGNATURE)
    return matplotlib.image.imread(io.BytesIO(png), format="png")


def _assert_picture(png: bytes) -> np.ndarray:
    """Decodes to an RGB(A) image of a plausible size with real content (many colours)."""
    image = _image(png)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert 200 <= image.shape[0] <= 1100 and 500 <= image.shape[1] <= 1000
    colours = np.unique(image[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 20 and image[..., :3].std() > 0.05
    return image


def test_each_plot_is_a_decodable_non_trivial_png():
    rows = _rows(3)
    for png in (spectra_png(rows), error_curve_png(rows), layer_bars_png(rows, "output_error"),
                layer_bars_png(rows, "rank/max_rank")):
        _assert_picture(png)


def test_output_is_deterministic_and_spectra_are_normalised():
    rows = _rows(3)
    assert spectra_png(rows) == spectra_png(_rows(3))
    assert error_curve_png(rows) == error_curve_png(_rows(3))
    # sigma_i / sigma_1: scaling a weight (hence its spectrum) changes nothing on the plot
    scaled = [{**row, "spectrum": [10.0 * v for v in row["spectrum"]]} for row in rows]
    assert spectra_png(scaled) == spectra_png(rows)
    # the chosen rank is drawn: another rank gives another picture
    moved = [{**row, "rank": row["rank"] + 3} for row in rows]
    assert spectra_png(moved) != spectra_png(rows)
    # curves are sorted by params fraction before drawing
    shuffled = [{**row, "error_curve": row["error_curve"][::-1]} for row in rows]
    assert error_curve_png(shuffled) == error_curve_png(rows)


def test_many_layers_keep_the_picture_bounded():
    few, many = _rows(3), _rows(120)
    for draw in (spectra_png, error_curve_png):
        png = draw(many)
        assert _image(png).shape == _image(draw(few)).shape  # fixed size; colour bar, no legend
        assert len(png) < 400_000
    # beyond MAX_LINES curves an evenly spaced subset is drawn (first and last included)
    drawn = {round(k) for k in np.linspace(0, 119, MAX_LINES)}
    hidden = min(set(range(120)) - drawn)
    flat = {"spectrum": [1.0] * 16, "rank": 2}
    base = spectra_png(many)
    assert spectra_png([*many[:hidden], {**many[hidden], **flat}, *many[hidden + 1:]]) == base
    assert spectra_png([{**many[0], **flat}, *many[1:]]) != base
    bars = _image(layer_bars_png(many, "output_error"))
    assert bars.shape[0] <= 1100 and bars.shape[1] <= 1000


def test_layer_plots_draw_only_what_the_rows_hold():
    rows = _rows(2)
    assert [name for name, _, _ in layer_plots(rows)] == [
        "spectra", "error-curve", "output-error", "rank"
    ]
    sparse = [{"layer": "fc1", "sparsity": 0.5, "output_error": 0.01}, {"layer": "fc2", "sparsity": 0.75}]
    assert [name for name, _, _ in layer_plots(sparse)] == ["output-error", "sparsity"]
    ranks_only = [{"layer": "fc1", "rank": 8}]
    assert [name for name, _, _ in layer_plots(ranks_only)] == ["rank"]
    assert layer_plots([{"layer": "fc1", "shape": "8x8"}]) == []
    with pytest.raises(ValueError, match="spectrum"):
        spectra_png(sparse)
    with pytest.raises(ValueError, match="error_curve"):
        error_curve_png(sparse)
    with pytest.raises(ValueError, match="'rank'"):
        layer_bars_png(sparse, "rank")


def test_metric_value_reads_numbers_and_ratios_only():
    row = {"layer": "x", "rank": np.int64(8), "max_rank": 32, "flag": True, "err": float("nan"),
           "zero": 0, "name": "8"}
    assert metric_value(row, "rank") == 8.0 and isinstance(metric_value(row, "rank"), float)
    assert metric_value(row, "rank/max_rank") == 0.25
    for metric in ("flag", "err", "name", "missing", "rank/zero", "rank/missing"):
        assert metric_value(row, metric) is None, metric


def test_bad_series_are_skipped_not_fatal():
    rows = _rows(2)
    rows.append({"layer": "broken", "spectrum": [0.0, 0.0], "error_curve": [[1, 2, 3]], "rank": 1})
    rows.append({"layer": "text", "spectrum": "not numbers", "error_curve": [[0.5, float("nan")]]})
    assert spectra_png(rows) == spectra_png(rows[:2])
    assert error_curve_png(rows) == error_curve_png(rows[:2])


def test_rendering_leaves_matplotlib_global_state_alone():
    plots_file = Path(__file__).resolve().parents[2] / "passes" / "_plots.py"
    code = (
        "import sys, importlib.util, matplotlib\n"
        "backend = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
        f"spec = importlib.util.spec_from_file_location('plots', {str(plots_file)!r})\n"
        "plots = importlib.util.module_from_spec(spec); spec.loader.exec_module(plots)\n"
        "spectra_png = plots.spectra_png\n"
        "png = spectra_png([{'layer': 'a', 'spectrum': [3.0, 2.0, 1.0], 'rank': 2}])\n"
        "assert png.startswith(b'\\x89PNG')\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
        "assert dict.__getitem__(matplotlib.rcParams, 'backend') == backend, 'backend changed'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

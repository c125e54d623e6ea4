"""Per-layer plots as PNG bytes: singular value spectra, error vs compression, per-layer bars.

Pure functions on the per-layer rows of a pass (``PassResult.layers``):

- **Spectra**: for each layer the normalised singular values ``s_i / s_1`` (i = 1..min(m, n))
  on a log axis; the chosen rank r is the marked point ``(r, s_r / s_1)`` — everything right
  of it was dropped.
- **Error vs compression**: each layer's ``error_curve`` pairs ``(p, e)`` with p the fraction
  of the dense layer's parameters kept and e the relative error; the chosen point is
  ``p* = params_after / params_before`` with its error read off the curve (linear
  interpolation), so the marker sits on the curve it belongs to.
- **Bars**: one bar per layer of a metric, or of a ratio ``"a/b"`` of two (``rank/max_rank``).

Rendering uses matplotlib's object API (``Figure`` + ``FigureCanvasAgg``): no pyplot, no
backend switch, no figure registry, so nothing changes in the caller's matplotlib state.
Output is deterministic (fixed size and DPI, layers in report order, no Software tag) and
bounded: at most ``MAX_LINES`` curves (an evenly spaced subset, said in the title), a legend
up to ``MAX_LEGEND`` entries (else a colour bar of the layer's position), names on at most
``MAX_LABELLED_BARS`` bars (else one filled step curve over the layer positions).
"""

from __future__ import annotations

import io
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

__all__ = ["spectra_png", "error_curve_png", "layer_bars_png", "layer_plots", "metric_value"]

logger = logging.getLogger(__name__)

Rows = Sequence[Mapping[str, Any]]

MAX_LINES = 32
MAX_LEGEND = 10
MAX_LABELLED_BARS = 40
DPI = 100
_NAME_CHARS = 36


def metric_value(row: Mapping[str, Any], metric: str) -> float | None:
    """``row[metric]`` as a finite float, or ``row[a] / row[b]`` for ``metric="a/b"``; else None."""
    if "/" in metric:
        top, bottom = (metric_value(row, part) for part in metric.split("/", 1))
        return top / bottom if top is not None and bottom else None
    value = row.get(metric)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def layer_plots(rows: Rows) -> list[tuple[str, str, bytes]]:
    """Every plot whose data exists in ``rows``, as ``(plot name, title, png)``."""
    plots = []
    if any(_spectrum(row) is not None for row in rows):
        plots.append(("spectra", "Singular value spectra", spectra_png(rows)))
    if any(_curve(row) is not None for row in rows):
        plots.append(("error-curve", "Error vs parameters kept", error_curve_png(rows)))
    rank = "rank/max_rank" if _has(rows, "rank/max_rank") else "rank"
    for metric in ("output_error", "sparsity", rank):
        if _has(rows, metric):
            name = metric.split("/")[0].replace("_", "-")
            plots.append((name, f"{_label(metric)} per layer", layer_bars_png(rows, metric)))
    return plots


def spectra_png(rows: Rows) -> bytes:
    """Normalised singular values of each layer (log y), the chosen rank marked."""
    curves = [(row, s) for row in rows if (s := _spectrum(row)) is not None]
    if not curves:
        raise ValueError("no row has a 'spectrum' (a list of singular values) to plot")
    fig, ax = _figure()
    shown, colours = _subset(len(curves))
    for i in shown:
        row, s = curves[i]
        x = np.arange(1, s.size + 1)
        keep = s > 0  # zeros have no place on a log axis
        ax.plot(x[keep], s[keep], color=colours[i], lw=1.2, label=_short(row["layer"]))
        rank = metric_value(row, "rank")
        if rank is not None and 1 <= rank <= s.size and s[int(rank) - 1] > 0:
            ax.plot(rank, s[int(rank) - 1], "o", color=colours[i], ms=5, mec="black", mew=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("σ_i / σ_1")
    ax.set_title(f"Singular value spectra, ● chosen rank{_note(len(shown), len(curves))}")
    _key(fig, ax, len(shown), len(curves))
    return _png(fig)


def error_curve_png(rows: Rows) -> bytes:
    """Each layer's relative error against the fraction of parameters kept, chosen point marked."""
    curves = [(row, c) for row in rows if (c := _curve(row)) is not None]
    if not curves:
        raise ValueError("no row has an 'error_curve' ([params_fraction, error] pairs) to plot")
    fig, ax = _figure()
    shown, colours = _subset(len(curves))
    for i in shown:
        row, curve = curves[i]
        ax.plot(curve[:, 0], curve[:, 1], color=colours[i], lw=1.2, label=_short(row["layer"]))
        chosen = metric_value(row, "params_after/params_before")
        if chosen is not None:
            error = float(np.interp(chosen, curve[:, 0], curve[:, 1]))
            ax.plot(chosen, error, "o", color=colours[i], ms=5, mec="black", mew=0.6)
    ax.set_xlabel("parameters kept (fraction of the dense layer)")
    ax.set_ylabel("relative error")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Error vs compression, ● chosen point{_note(len(shown), len(curves))}")
    _key(fig, ax, len(shown), len(curves))
    return _png(fig)


def layer_bars_png(rows: Rows, metric: str) -> bytes:
    """One bar per layer of ``metric`` (a row key, or ``"a/b"`` for a ratio of two keys)."""
    bars = [(row["layer"], v) for row in rows if (v := metric_value(row, metric)) is not None]
    if not bars:
        raise ValueError(f"no row has a numeric {metric!r} to plot")
    names, values = zip(*bars)
    n = len(values)
    if n <= MAX_LABELLED_BARS:
        fig, ax = _figure(height=min(max(1.0 + 0.24 * n, 2.4), 10.6))
        y = np.arange(n)
        ax.barh(y, values, color="#3b75af", height=0.7)
        ax.set_yticks(y, [_short(name) for name in names], fontsize=8)
        ax.invert_yaxis()  # first layer on top, as in the table
        ax.set_xlabel(_label(metric))
        ax.grid(True, axis="x", alpha=0.3)
    else:  # too many to name: one step curve over the layers' positions
        fig, ax = _figure()
        ax.stairs(values, np.arange(n + 1) + 0.5, fill=True, color="#3b75af")
        ax.set_xlim(0.5, n + 0.5)
        ax.set_xlabel("layer (position in the report)")
        ax.set_ylabel(_label(metric))
        ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"{_label(metric)} per layer ({n} layers)")
    return _png(fig)


def _has(rows: Rows, metric: str) -> bool:
    return any(metric_value(row, metric) is not None for row in rows)


def _label(metric: str) -> str:
    return " / ".join(part.replace("_", " ") for part in metric.split("/"))


def _spectrum(row: Mapping[str, Any]) -> np.ndarray | None:
    """The row's singular values over the largest, or None if it has no usable spectrum."""
    s = _floats(row.get("spectrum"))
    if s is None or s.ndim != 1 or s.size == 0 or not s[0] > 0:
        return None
    return s / s[0]


def _curve(row: Mapping[str, Any]) -> np.ndarray | None:
    """The row's error curve as an (k, 2) array sorted by params fraction, or None."""
    c = _floats(row.get("error_curve"))
    if c is None or c.ndim != 2 or c.shape[1] != 2:
        return None
    c = c[np.isfinite(c).all(axis=1)]
    return c[np.argsort(c[:, 0], kind="stable")] if len(c) else None


def _floats(value: Any) -> np.ndarray | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _subset(count: int) -> tuple[list[int], list[Any]]:
    """Which of ``count`` curves to draw (evenly spaced, at most MAX_LINES) and their colours."""
    if count <= MAX_LINES:
        shown = list(range(count))
    else:
        shown = sorted({round(k) for k in np.linspace(0, count - 1, MAX_LINES)})
    if count <= MAX_LEGEND:
        palette = colormaps["tab10"]
        return shown, [palette(i % 10) for i in range(count)]
    palette = colormaps["viridis"]
    return shown, [palette(i / max(count - 1, 1)) for i in range(count)]


def _note(shown: int, total: int) -> str:
    return "" if shown == total else f"\n({shown} of {total} layers, evenly spaced)"


def _key(fig: Figure, ax: Any, shown: int, total: int) -> None:
    """A legend for a few layers; a colour bar of the layer's position for many."""
    if total <= MAX_LEGEND:
        ax.legend(loc="upper right", fontsize=7, framealpha=0.85)
        return
    mappable = ScalarMappable(Normalize(1, total), colormaps["viridis"])
    fig.colorbar(mappable, ax=ax, label="layer (position in the report)")


def _short(name: str) -> str:
    return name if len(name) <= _NAME_CHARS else "…" + name[-(_NAME_CHARS - 1) :]


def _figure(width: float = 7.5, height: float = 4.2) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas; no global backend involved
    return fig, fig.add_subplot()


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()

"""Per-layer rows of a pass (``PassResult.layers``) as text and HTML tables and as JSON.

A row is ``{"layer": name, metric: scalar, ..., series: [...]}``. The tables show ``layer``
then every key holding a scalar in some row (int, float, str, bool, or a short int tuple
shown as a shape ``768×384``), in order of first appearance; series (``spectrum``,
``error_curve``) are left to the plots and the JSON. Text shows at most ``TEXT_ROWS`` rows,
HTML at most ``HTML_ROWS``, each saying how many it left out. A :class:`LayerPlot` is one PNG
drawn from a pass's rows (``passes/_plots.py``); the HTML embeds it as a ``data:`` URI.
"""

from __future__ import annotations

import base64
import html
import logging
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TEXT_ROWS",
    "HTML_ROWS",
    "LayerPlot",
    "number",
    "layer_text",
    "layer_html",
    "layers_section",
    "plain",
]

logger = logging.getLogger(__name__)

TEXT_ROWS = 40
HTML_ROWS = 1000

Rows = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class LayerPlot:
    """One PNG drawn from the per-layer rows of the pass at ``index`` (from 1) in the run."""

    index: int
    pass_name: str
    plot: str  # "spectra", "error-curve", "output-error", "sparsity", "rank"
    title: str
    png: bytes

    @property
    def filename(self) -> str:
        """``<pass-index>-<pass-name>-<plot>.png``."""
        return f"{self.index}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', self.pass_name)}-{self.plot}.png"

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def number(value: float) -> str:
    """Compact number: 4 significant digits for fractions, k/M/G for large integers."""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    value = int(value)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def cell(value: Any) -> str | None:
    """A scalar metric as table text; None for a series (not a table cell)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Real):
        return number(float(value)) if value == value else "nan"
    if isinstance(value, (list, tuple)) and 0 < len(value) <= 4:
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
            return "×".join(str(int(v)) for v in value)
    return None


def _cells(rows: Rows, limit: int) -> tuple[list[str], list[list[str]]]:
    columns = {"layer": None}
    for row in rows:
        columns.update((k, None) for k, v in row.items() if cell(v) is not None)
    names = list(columns)
    return names, [[cell(row.get(c, "")) or "" for c in names] for row in rows[:limit]]


def layer_text(rows: Rows) -> list[str]:
    """Fixed-width lines: header, rule, one line per layer (at most ``TEXT_ROWS``)."""
    columns, cells = _cells(rows, TEXT_ROWS)
    table = [columns, *cells]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if len(rows) > TEXT_ROWS:
        lines.append(
            f"... {len(rows) - TEXT_ROWS} more layers (the JSON and HTML reports have all)"
        )
    return lines


def layer_html(rows: Rows) -> str:
    """``<table class="layers">`` of at most ``HTML_ROWS`` rows, every text escaped."""
    esc = html.escape
    columns, cells = _cells(rows, HTML_ROWS)
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in cells)
    more = len(rows) - len(cells)
    note = f'<p class="note">{more} more layers in the JSON report</p>' if more > 0 else ""
    return (
        f'<table class="layers"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}'
    )


def layers_section(title: str, rows: Rows, figures: Sequence[LayerPlot]) -> str:
    """HTML for one pass: heading, layer table, then its plots as ``data:`` URI images."""
    esc = html.escape
    images = "".join(
        f'<figure><img src="{p.data_uri()}" alt="{esc(p.title)}"><figcaption>'
        f"{esc(p.title)}</figcaption></figure>"
        for p in figures
    )
    return (
        f"<h2>{esc(title)} ({len(rows)} layers)</h2>"
        f'{layer_html(rows)}<div class="plots">{images}</div>'
    )


def plain(value: Any) -> Any:
    """JSON-ready copy: mappings become dicts, tuples lists, numpy scalars/arrays Python values."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return plain(value.tolist())
    return value

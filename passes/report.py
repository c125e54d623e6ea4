"""The report of an ``optimize()`` run: one row per pass, printable, JSON- and HTML-serialisable.

Each row holds the pass spec, whether it modified the graph, nodes/params/bytes before and
after, wall seconds, the pass's own stats and its per-layer rows (``PassResult.layers``). The
compression ratio of the whole run is ``bytes_before / bytes_after`` of the first and last
rows (r = uncompressed / compressed).

The text table adds, per pass with layers, their scalar metrics (``passes/_layers.py``); JSON
carries every row with its series (spectrum, error curve). ``to_html`` writes one
self-contained page (inline CSS, inline SVG, PNG plots as ``data:`` URIs, no script, nothing
fetched): the pass table, the ratio, per pass with layers a layer table and its plots
(``passes/_plots.py``, drawn once per report), the before→after diff and the drawn graph.
Every piece of text goes through ``html.escape``; ``save_html`` and ``save_plots`` write
atomically.
"""

from __future__ import annotations

import html
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graphpress.graph.analysis import Measure
from graphpress.graph.html import to_svg
from graphpress.graph.kind import Graph, kind
from graphpress.graph.printing import diff, summary

from ._layers import LayerPlot, layer_text, layers_section, plain
from ._layers import number as _num

__all__ = ["LayerPlot", "PassRecord", "Report"]

logger = logging.getLogger(__name__)

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.changed td.changed { color: #0a6b2d; font-weight: bold; }
pre { background: #fafafa; border: 1px solid #ddd; padding: 0.6em; overflow-x: auto; }
.diff .add { color: #0a6b2d; } .diff .del { color: #a31515; } .diff .mod { color: #8a5a00; }
.graph { overflow: auto; border: 1px solid #ddd; max-height: 80vh; }
figure { display: inline-block; margin: 0.6em 0.6em 0 0; } img { max-width: 100%; }
"""


@dataclass(frozen=True)
class PassRecord:
    """What one pass did to the graph."""

    name: str
    spec: str
    modified: bool
    before: Measure
    after: Measure
    seconds: float
    stats: Mapping[str, float] = field(default_factory=dict)
    layers: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class Report:
    """Per-pass records of one run, in order."""

    records: tuple[PassRecord, ...] = ()
    kind: str = ""

    @property
    def compression_ratio(self) -> float:
        """Bytes of constants before the first pass divided by bytes after the last."""
        if not self.records:
            return 1.0
        if self.records[-1].after.bytes == 0:
            return float("inf") if self.records[0].before.bytes else 1.0
        return self.records[0].before.bytes / self.records[-1].after.bytes

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "compression_ratio": self.compression_ratio,
            "seconds": self.seconds,
            "passes": [
                {**asdict(r), "layers": [plain(row) for row in r.layers]} for r in self.records
            ],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def table(self) -> str:
        """A fixed-width text table, one line per pass, then the layers of passes that have them."""
        header = ("pass", "changed", "nodes", "params", "bytes", "seconds", "stats")
        rows = [header]
        for r in self.records:
            stats = ", ".join(f"{k}={_num(v)}" for k, v in r.stats.items())
            rows.append(
                (
                    r.spec,
                    "yes" if r.modified else "no",
                    f"{r.before.nodes}→{r.after.nodes}",
                    f"{_num(r.before.params)}→{_num(r.after.params)}",
                    f"{_bytes(r.before.bytes)}→{_bytes(r.after.bytes)}",
                    f"{r.seconds:.3f}",
                    stats,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"compression ratio {self.compression_ratio:.2f}x in {self.seconds:.2f} s")
        for index, r in enumerate(self.records, 1):
            if r.layers:
                lines += ["", f"layers of pass {index} {r.spec} ({len(r.layers)}):"]
                lines += ["  " + line for line in layer_text(r.layers)]
        return "\n".join(lines)

    def plots(self) -> tuple[LayerPlot, ...]:
        """PNG plots of every pass that reported layers (drawn on first use, then kept)."""
        cached = self.__dict__.get("_plots")
        if cached is None:
            from ._plots import layer_plots  # matplotlib only loads when plots are drawn

            cached = tuple(
                LayerPlot(index, r.name, plot, title, png)
                for index, r in enumerate(self.records, 1)
                if r.layers
                for plot, title, png in layer_plots(r.layers)
            )
            object.__setattr__(self, "_plots", cached)  # a cache, not state: fields unchanged
        return cached

    def save_plots(self, folder: str | os.PathLike) -> list[Path]:
        """Write each of :meth:`plots` to ``folder/<filename>`` atomically; the paths written."""
        folder = Path(folder)
        written = []
        for plot in self.plots():
            folder.mkdir(parents=True, exist_ok=True)
            written.append(_write_atomic(folder / plot.filename, plot.png))
        return written

    def __str__(self) -> str:
        return self.table()

    def to_html(
        self, before: Graph | None = None, after: Graph | None = None, *, plots: bool = True
    ) -> str:
        """One self-contained HTML page: pass table, ratio, per-layer tables and plots (none
        with ``plots=False``), diff (both graphs given), drawing."""
        esc = html.escape
        head = "".join(f"<th>{h}</th>" for h in _HEADER)
        parts = [
            f'<h1>graphpress report</h1><p class="ratio">{esc(self.kind or "?")} graph, '
            f"{len(self.records)} passes in {self.seconds:.2f} s; compression ratio "
            f"<b>{self.compression_ratio:.2f}x</b></p>",
            f'<h2>Passes</h2><table class="passes"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(_html_row(r) for r in self.records)}</tbody></table>",
        ]
        drawn_plots = self.plots() if plots else ()
        for index, r in enumerate(self.records, 1):
            if r.layers:
                figures = [p for p in drawn_plots if p.index == index]
                parts.append(layers_section(f"Layers of pass {index}: {r.spec}", r.layers, figures))
        if after is not None:
            text = esc(str(summary(after, before)))
            parts.append(f'<h2>Summary</h2><pre class="summary">{text}</pre>')
        if before is not None and after is not None:
            if kind(before) != kind(after):
                note = f"no diff: before is {kind(before)}, after is {kind(after)}"
                parts.append(f'<h2>Diff</h2><p class="note">{esc(note)}</p>')
            else:
                lines = "\n".join(
                    f'<span class="{_DIFF_CLASS[tag]}">{esc(text)}</span>'
                    for tag, text in diff(before, after).lines()
                )
                parts.append(f'<h2>Diff</h2><pre class="diff">{lines}</pre>')
        drawn, which = (after, "after") if after is not None else (before, "before")
        if drawn is not None:
            parts.append(f'<h2>Graph ({which})</h2><div class="graph">{to_svg(drawn)}</div>')
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>graphpress report</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(parts)
            + "\n</body></html>\n"
        )

    def save_html(
        self,
        path: str | os.PathLike,
        before: Graph | None = None,
        after: Graph | None = None,
        *,
        plots: bool = True,
    ) -> Path:
        """Write :meth:`to_html` to ``path`` atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return _write_atomic(path, self.to_html(before, after, plots=plots).encode("utf-8"))


def _write_atomic(path: Path, data: bytes) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.debug("wrote %s", path)
    return path


_HEADER = ("pass", "changed", "nodes", "params", "bytes", "seconds", "stats")
_DIFF_CLASS = {"+": "add", "-": "del", "~": "mod", " ": "head"}


def _html_row(r: PassRecord) -> str:
    esc = html.escape
    stats = ", ".join(f"{k}={_num(v)}" for k, v in r.stats.items())
    cells = (
        f'<td class="spec">{esc(r.spec)}</td>',
        f'<td class="changed">{"yes" if r.modified else "no"}</td>',
        f'<td class="num">{r.before.nodes}→{r.after.nodes}</td>',
        f'<td class="num">{esc(_num(r.before.params))}→{esc(_num(r.after.params))}</td>',
        f'<td class="num">{esc(_bytes(r.before.bytes))}→{esc(_bytes(r.after.bytes))}</td>',
        f'<td class="num">{r.seconds:.3f}</td>',
        f'<td class="stats">{esc(stats)}</td>',
    )
    return f'<tr class="{"changed" if r.modified else "same"}">{"".join(cells)}</tr>'


def _bytes(value: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value}B"

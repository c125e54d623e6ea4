"""The report of an ``optimize()`` run: one row per pass, printable, JSON- and HTML-serialisable.

Each row holds the pass spec, whether it modified the graph, nodes/params/bytes before and
after, wall seconds and the pass's own stats. The compression ratio of the whole run is
``bytes_before / bytes_after`` of the first and last rows (r = uncompressed / compressed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from graphpress.graph.analysis import Measure

__all__ = ["PassRecord", "Report"]


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


@dataclass(frozen=True)
class Report:
    """Per-pass records of one run, in order."""

    records: tuple[PassRecord, ...] = ()
    kind: str = ""

    @property
    def compression_ratio(self) -> float:
        """Bytes of constants before the first pass divided by bytes after the last."""
        if not self.records or self.records[-1].after.bytes == 0:
            return 1.0
        return self.records[0].before.bytes / self.records[-1].after.bytes

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.records)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "compression_ratio": self.compression_ratio,
            "seconds": self.seconds,
            "passes": [asdict(r) for r in self.records],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def table(self) -> str:
        """A fixed-width text table, one line per pass."""
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
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _num(value: float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    value = int(value)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _bytes(value: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value}B"

"""JSON file format of a calibration table.

``{"format": "graphpress.calibration", "version": 1, "kind", "method", "options",
"ranges": {name: [lo, hi]}, "stats": {name: {ValueStats fields}}}``. Saving writes a temporary
file in the target folder and renames it over the target (``os.replace`` is atomic), so a
crash never leaves a half-written table. Loading validates the structure and raises
:class:`CalibrationFileError` with the path and what is wrong.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from graphpress.graph.errors import GraphpressError

__all__ = ["CalibrationFileError", "save_table", "load_table"]

logger = logging.getLogger(__name__)

FORMAT, VERSION = "graphpress.calibration", 1


class CalibrationFileError(GraphpressError):
    """A calibration table file is missing, not JSON, or not a graphpress calibration table."""


def save_table(table: Any, path: str | Path) -> Path:
    path = Path(path)
    document = {
        "format": FORMAT,
        "version": VERSION,
        "kind": table.kind,
        "method": table.method,
        "options": dict(table.options),
        "ranges": {name: [lo, hi] for name, (lo, hi) in table.ranges.items()},
        "stats": {name: _finite(asdict(stats)) for name, stats in table.stats.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(document, stream, allow_nan=False)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    logger.debug("saved calibration table of %d values to %s", len(table.ranges), path)
    return path


def load_table(table_cls: type, stats_cls: type, path: str | Path) -> Any:
    path = Path(path)

    def fail(why: str) -> CalibrationFileError:
        return CalibrationFileError(
            f"{path} is not a usable calibration table: {why}; re-create it with "
            "calibrate(...).save(path)"
        )

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationFileError(f"calibration table {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise fail(f"cannot be read as JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise fail(f"its 'format' is not {FORMAT!r}")
    if document.get("version") != VERSION:
        raise fail(f"version {document.get('version')!r} is not {VERSION}")
    try:
        ranges = {str(k): _pair(v) for k, v in document["ranges"].items()}
        stats = {str(k): _stats(stats_cls, v) for k, v in document["stats"].items()}
        kind, method = str(document["kind"]), str(document["method"])
        options = dict(document["options"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise fail(f"a field is missing or malformed ({type(exc).__name__}: {exc})") from None
    if kind not in ("fx", "onnx"):
        raise fail(f"kind {kind!r} is neither 'fx' nor 'onnx'")
    if set(ranges) != set(stats):
        raise fail("its ranges and stats name different values")
    return table_cls(kind, method, ranges, stats, options)


def _finite(fields: dict) -> dict:
    """Per-channel extremes of a channel that saw no finite value are NaN; JSON gets null."""
    for key in ("channel_min", "channel_max"):
        if fields.get(key) is not None:
            fields[key] = [v if math.isfinite(v) else None for v in fields[key]]
    return fields


def _pair(value: Any) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"range {value!r} is not a finite (lo, hi) with lo <= hi")
    return lo, hi


def _stats(stats_cls: type, fields: dict) -> Any:
    def floats(v):
        return None if v is None else tuple(math.nan if x is None else float(x) for x in v)

    return stats_cls(
        name=str(fields["name"]),
        count=int(fields["count"]),
        minimum=float(fields["minimum"]),
        maximum=float(fields["maximum"]),
        nonfinite=int(fields["nonfinite"]),
        histogram=floats(fields["histogram"]),
        hist_lo=float(fields["hist_lo"]),
        hist_hi=float(fields["hist_hi"]),
        channel_min=floats(fields.get("channel_min")),
        channel_max=floats(fields.get("channel_max")),
    )

"""Drawing a graph: Graphviz dot text and a self-contained SVG that needs no Graphviz.

Both start from the read-only networkx view of :func:`to_networkx` (operators, inputs,
outputs, the constants a pass created and, on request, all constants) and color each node
by the pass that created it (its ``graphpress.pass`` mark); original nodes stay white. The
SVG uses a simple layered layout: a node's row is its depth, the longest path from a source,
computed in graph order (which is topological); within a row nodes are ordered by the mean
column of their producers (one barycenter sweep from the top), ties broken by graph order.
Big graphs stay bounded: at most ``max_nodes`` nodes (the first in graph order) and
``max_per_row`` per row are drawn, and a note says how many were left out.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Iterable

import networkx as nx

from .analysis import to_networkx
from .kind import Graph, kind

__all__ = ["to_dot", "to_svg", "pass_colors"]

logger = logging.getLogger(__name__)

PROVENANCE = "graphpress.pass"
PALETTE = (
    "#8dd3c7", "#fdb462", "#bebada", "#fb8072", "#80b1d3",
    "#b3de69", "#fccde5", "#ffffb3", "#bc80bd", "#ccebc5",
)
ROLE_FILL = {"op": "#ffffff", "input": "#dbe9f6", "output": "#f6dbdb", "const": "#eeeeee"}
_W, _H, _GAP_X, _GAP_Y, _MARGIN, _TOP = 150, 32, 14, 34, 10, 52


def _marks(graph: Graph) -> dict[str, str]:
    """Provenance by node key of :func:`to_networkx`."""
    if kind(graph) == "fx":
        return {n.name: n.meta[PROVENANCE] for n in graph.graph.nodes if PROVENANCE in n.meta}
    g = graph.graph
    found = {f"const:{k}": v.metadata_props.get(PROVENANCE) for k, v in g.initializers.items()}
    for index, node in enumerate(g):
        found[f"node:{node.name or f'{node.op_type}_{index}'}"] = node.metadata_props.get(PROVENANCE)
    return {k: v for k, v in found.items() if v}


def pass_colors(names: Iterable[str]) -> dict[str, str]:
    """A fixed color per pass name (sorted names take the palette in order)."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted(set(names)))}


def _view(graph: Graph, constants: bool) -> tuple[nx.DiGraph, list[str], dict[str, str]]:
    view, marks = to_networkx(graph), _marks(graph)
    keys = [k for k, role in view.nodes(data="kind") if constants or role != "const" or k in marks]
    return view, keys, marks


def _label(view: nx.DiGraph, key: str) -> tuple[str, str]:
    prefix, sep, rest = key.partition(":")
    name = rest if sep and prefix in ("node", "const", "input", "output") else key
    data = view.nodes[key]
    return name, data["op"] if data["kind"] == "op" else data["kind"]


def _dot_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: Graph, *, constants: bool = False) -> str:
    """Graphviz dot text of ``graph``, nodes filled by provenance (render with ``dot -Tsvg``)."""
    view, keys, marks = _view(graph, constants)
    colors = pass_colors(marks.values())
    lines = [
        "digraph graphpress {",
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
    ]
    lines += [f"  // {color}: created by {name}" for name, color in colors.items()]
    for key in keys:
        name, op = _label(view, key)
        mark = marks.get(key)
        fill = colors[mark] if mark else ROLE_FILL[view.nodes[key]["kind"]]
        tip = f"{name}: {op}" + (f" (by {mark})" if mark else "")
        label = name + "\n" + op
        lines.append(
            f"  {_dot_str(key)} [label={_dot_str(label)}, fillcolor={_dot_str(fill)}, "
            f"tooltip={_dot_str(tip)}];"
        )
    kept = set(keys)
    lines += [f"  {_dot_str(u)} -> {_dot_str(v)};" for u, v in view.edges if u in kept and v in kept]
    lines.append("}")
    return "\n".join(lines)


def _short(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def to_svg(
    graph: Graph, *, max_nodes: int = 400, max_per_row: int = 40, constants: bool = False
) -> str:
    """An inline ``<svg>`` drawing of ``graph`` (layered layout, bounded size, no Graphviz)."""
    view, keys, marks = _view(graph, constants)
    colors = pass_colors(marks.values())
    total, keys = len(keys), keys[:max_nodes]
    order = {k: i for i, k in enumerate(keys)}
    depth: dict[str, int] = {}
    rows: dict[int, list[str]] = {}
    for key in keys:  # graph order is topological: producers come first
        depth[key] = 1 + max((depth[p] for p in view.predecessors(key) if p in depth), default=-1)
        rows.setdefault(depth[key], []).append(key)
    cols = min(max((len(r) for r in rows.values()), default=1), max_per_row)
    pos: dict[str, tuple[float, float]] = {}
    hidden: dict[int, int] = {}
    for row_index, d in enumerate(sorted(rows)):
        row = rows[d]

        def bary(k: str) -> tuple[float, int]:
            xs = [pos[p][0] for p in view.predecessors(k) if p in pos]
            return (sum(xs) / len(xs) if xs else float("inf"), order[k])

        row.sort(key=bary)
        if len(row) > max_per_row:
            hidden[row_index], row = len(row) - (max_per_row - 1), row[: max_per_row - 1]
        slots = len(row) + (1 if row_index in hidden else 0)
        offset = _MARGIN + (cols - slots) * (_W + _GAP_X) / 2
        y = _TOP + row_index * (_H + _GAP_Y)
        for i, key in enumerate(row):
            pos[key] = (offset + i * (_W + _GAP_X), y)
        if row_index in hidden:
            pos[f"more:{row_index}"] = (offset + len(row) * (_W + _GAP_X), y)
    width = 2 * _MARGIN + cols * (_W + _GAP_X)
    height = _TOP + len(rows) * (_H + _GAP_Y) + _MARGIN
    esc = html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="graphpress-graph" width="{width:.0f}" '
        f'height="{height}" viewBox="0 0 {width:.0f} {height}" font-family="sans-serif" '
        'font-size="10">',
        '<defs><marker id="gp-arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#888"/></marker></defs>',
    ]
    legend = [("original", ROLE_FILL["op"])] + [(f"by {n}", c) for n, c in colors.items()]
    x = _MARGIN
    for text, fill in legend:
        out.append(
            f'<rect x="{x}" y="6" width="12" height="12" fill="{fill}" stroke="#666"/>'
            f'<text x="{x + 16}" y="16">{esc(text)}</text>'
        )
        x += 24 + 7 * len(text)
    drawn = len(pos) - len(hidden)
    note = f"{drawn} of {total} nodes drawn" + (
        f"; showing the first {len(keys)} in graph order" if total > len(keys) else ""
    ) + (f"; {sum(hidden.values())} hidden in wide rows" if hidden else "")
    out.append(f'<text class="note" x="{_MARGIN}" y="36" fill="#555">{esc(note)}</text>')
    for u, v in view.edges:
        if u in pos and v in pos:
            (x1, y1), (x2, y2) = pos[u], pos[v]
            x1, x2, y1 = x1 + _W / 2, x2 + _W / 2, y1 + _H
            out.append(
                f'<path d="M{x1:.0f},{y1:.0f} C{x1:.0f},{y1 + 17:.0f} {x2:.0f},{y2 - 17:.0f} '
                f'{x2:.0f},{y2:.0f}" fill="none" stroke="#999" marker-end="url(#gp-arrow)"/>'
            )
    for key, (x, y) in pos.items():
        if key.startswith("more:"):
            count = hidden[int(key[5:])]
            name, op, fill, tip = f"… {count} more", "", "#f4f4f4", f"{count} nodes not drawn"
        else:
            name, op = _label(view, key)
            mark = marks.get(key)
            fill = colors[mark] if mark else ROLE_FILL[view.nodes[key]["kind"]]
            tip = f"{name}: {op}" + (f" (by {mark})" if mark else "")
        out.append(
            f'<g class="node"><title>{esc(tip)}</title>'
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{_W}" height="{_H}" rx="5" fill="{fill}" '
            f'stroke="#555"/><text x="{x + _W / 2:.0f}" y="{y + 13:.0f}" text-anchor="middle">'
            f'{esc(_short(name))}</text><text x="{x + _W / 2:.0f}" y="{y + 26:.0f}" '
            f'text-anchor="middle" fill="#444">{esc(_short(op))}</text></g>'
        )
    out.append("</svg>")
    logger.debug("drew %d of %d nodes", drawn, total)
    return "\n".join(out)

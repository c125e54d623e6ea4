"""Memory estimate of one inference: weights + peak live activations + KV cache.

``weights`` are the constants at their stored size (:attr:`CostTable.param_bytes`, equal to
``measure(g).bytes``); ``activations_peak`` is :func:`peak_live_bytes` over the whole graph
(graph inputs included, views sharing their base's storage); the KV cache of a decoder is

    kv_cache = 2 (K and V) · layers · kv_heads · head_dim · bytes_per_element · batch · seq

Rules:

1. ``batch``/``seq`` are the two dims of the first integer input of rank 2 (``input_ids``).
   A static graph is costed at its captured shape; asking for another size raises (capture
   or export with dynamic shapes instead). A symbolic dim is bound: ``batch`` to dim 0's
   symbol, ``seq`` to dim 1's (FX ``s0``-style or ONNX ``dim_param``).
2. ``layers``, ``kv_heads``, ``head_dim`` and the cache element size default to what the
   attention layers show (``_attention.py``, ``_attention_onnx.py``); explicit values win.
3. ``kv_cache=None`` (auto) counts a cache only when the attention is causal (a decoder);
   ``True`` always counts one (raising if the geometry is unknown), ``False`` never. The
   captured graph's own inputs/outputs are activations: a graph that already takes
   ``past_key_values`` as inputs counts them there too.
4. :func:`kv_cache_by_node` splits the same cache by attention node (each node's own
   ``2 · kv_heads · head_dim · bytes · batch · seq``, the common geometry filling what a node
   does not show), so a pipeline stage can count the share its layers keep.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from ._attention import attention_sites, summarize
from ._dims import DimBinder, Unbound, symbols_of
from .costs import node_costs, peak_live_bytes
from .errors import UnsupportedGraphError
from .kind import Graph, kind

__all__ = ["MemoryEstimate", "estimate_memory", "kv_cache_bytes", "kv_cache_by_node",
           "human_bytes"]

logger = logging.getLogger(__name__)

_DEFAULT_CACHE_BYTES = 4  # float32, when no attention node shows the key dtype


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one inference (module doc) and the geometry they were computed from."""

    weights: int
    activations_peak: int
    kv_cache: int | None
    total: int
    batch: int | None = None
    seq: int | None = None
    layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    cache_bytes: int | None = None
    causal: bool = False
    dims: Mapping[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["dims"] = dict(self.dims)
        return data

    def format(self) -> str:
        at = f" at batch {self.batch}, seq {self.seq}" if self.batch is not None else ""
        rows = [f"memory{at}:", _row("weights", self.weights, "constants at stored size"),
                _row("activations", self.activations_peak, "peak of live values")]
        if self.kv_cache is not None:
            rows.append(_row("kv cache", self.kv_cache,
                             f"2 × {self.layers} layers × {self.kv_heads} kv heads × "
                             f"{self.head_dim} head dim × {self.cache_bytes} B × batch × seq"))
        else:
            why = "causal attention found but not counted" if self.causal else \
                "no causal attention found; kv_cache=True counts one"
            rows.append(f"  {'kv cache':<12} {'-':>10}  ({why})")
        rows.append(_row("total", self.total, ""))
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.format()


def kv_cache_bytes(
    *, layers: int, kv_heads: int, head_dim: int, batch: int, seq: int, bytes_per_element: int
) -> int:
    """``2 · layers · kv_heads · head_dim · bytes_per_element · batch · seq``."""
    return 2 * layers * kv_heads * head_dim * bytes_per_element * batch * seq


def estimate_memory(
    graph: Graph,
    *,
    batch: int | None = None,
    seq: int | None = None,
    dims: Mapping[str, int] | None = None,
    kv_cache: bool | None = None,
    layers: int | None = None,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    cache_bytes: int | None = None,
) -> MemoryEstimate:
    """Weights, peak activations and KV cache of ``graph`` at ``batch``×``seq`` (module doc)."""
    bound = {str(k): int(v) for k, v in (dims or {}).items()}
    batch, seq = _bind_tokens(graph, batch, seq, bound)
    table = node_costs(graph, dims=bound)
    found = summarize(attention_sites(graph))
    layers = layers if layers is not None else (found.layers or None)
    kv_heads = kv_heads if kv_heads is not None else found.kv_heads
    head_dim = head_dim if head_dim is not None else found.head_dim
    cache_bytes = cache_bytes if cache_bytes is not None else (
        found.element_bytes or _DEFAULT_CACHE_BYTES)
    want = found.causal if kv_cache is None else kv_cache
    kv = None
    if want:
        unknown = [n for n, v in (("layers", layers), ("kv_heads", kv_heads),
                                  ("head_dim", head_dim), ("batch", batch), ("seq", seq))
                   if v is None]
        if unknown and kv_cache:
            raise UnsupportedGraphError(
                f"kv_cache=True needs {', '.join(unknown)}, which the graph does not show "
                f"({found.layers} attention layers found); pass them to estimate_memory"
            )
        if not unknown:
            kv = kv_cache_bytes(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                batch=batch, seq=seq, bytes_per_element=cache_bytes)
    weights, activations = table.param_bytes, peak_live_bytes(table)
    return MemoryEstimate(
        weights=weights, activations_peak=activations, kv_cache=kv,
        total=weights + activations + (kv or 0), batch=batch, seq=seq, layers=layers,
        kv_heads=kv_heads, head_dim=head_dim, cache_bytes=cache_bytes, causal=found.causal,
        dims=bound,
    )


def kv_cache_by_node(
    graph: Graph, *, dims: Mapping[str, int] | None = None, kv_cache: bool | None = None
) -> dict[str, int]:
    """KV-cache bytes per attention node (FX node name; ONNX node name, else ``<op>_<index>``
    as in the cost table) at the graph's ``[batch, seq]`` (its static shape or ``dims``).

    Empty when no cache is counted (Rule 3: ``kv_cache=None`` counts one for causal
    attention only) or when batch, seq or a layer's geometry is unknown.
    """
    sites = attention_sites(graph)
    found = summarize(sites)
    if not sites or not (found.causal if kv_cache is None else kv_cache):
        return {}
    batch, seq = _bind_tokens(graph, None, None, {str(k): int(v) for k, v in (dims or {}).items()})
    shares = {}
    for site in sites:
        heads = site.kv_heads if site.kv_heads is not None else found.kv_heads
        dim = site.head_dim if site.head_dim is not None else found.head_dim
        size = site.element_bytes or found.element_bytes or _DEFAULT_CACHE_BYTES
        if None in (heads, dim, batch, seq):
            logger.debug("no KV cache share for %s: geometry or batch/seq unknown", site.node)
            continue
        shares[site.node] = kv_cache_bytes(layers=1, kv_heads=heads, head_dim=dim, batch=batch,
                                           seq=seq, bytes_per_element=size)
    return shares


def _token_dims(graph: Graph) -> tuple[str, list[object]] | None:
    """The name and raw dims of the first integer input of rank 2."""
    if kind(graph) == "fx":
        for node in graph.graph.nodes:
            val = node.meta.get("val")
            if (node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() == 2
                    and not val.dtype.is_floating_point and not val.dtype.is_complex
                    and val.dtype != torch.bool):
                return node.name, list(val.shape)
        return None
    for value in graph.graph.inputs:
        dtype = value.dtype
        if (value.shape is not None and len(value.shape) == 2 and dtype is not None
                and dtype.is_integer()):
            return value.name, list(value.shape)
    return None


def _bind_tokens(graph: Graph, batch: int | None, seq: int | None,
                 bound: dict[str, int]) -> tuple[int | None, int | None]:
    found = _token_dims(graph)
    if found is None:
        if batch is not None or seq is not None:
            raise UnsupportedGraphError(
                "batch/seq need an integer [batch, seq] input (token ids) and the graph has "
                "none; bind its symbolic dims with dims={...} instead"
            )
        return None, None
    name, raw = found
    resolved: list[int | None] = []
    unbound: list[tuple[str, str]] = []
    for what, asked, dim in (("batch", batch, raw[0]), ("seq", seq, raw[1])):
        if isinstance(dim, int):
            if asked is not None and asked != dim:
                raise UnsupportedGraphError(
                    f"input {name!r} has a static {what} of {dim} (shape {raw}); it cannot be "
                    f"costed at {what}={asked}: capture or export it with dynamic shapes "
                    f"(torch.export.Dim) or leave {what} unset"
                )
            resolved.append(dim)
            continue
        symbols = symbols_of(dim)
        symbol = str(getattr(dim, "value", dim))
        if asked is None:
            binder = DimBinder(bound)
            try:
                resolved.append(binder.fx_dim(dim) if kind(graph) == "fx" else binder.onnx_dim(dim))
            except Unbound:
                resolved.append(None)
                unbound.append((what, symbol))
            continue
        if symbols != {symbol}:
            raise UnsupportedGraphError(
                f"the {what} dim of input {name!r} is the expression {symbol!r}; bind its "
                f"symbols with dims={{...}} instead of {what}="
            )
        if bound.get(symbol, asked) != asked:
            raise UnsupportedGraphError(
                f"{what}={asked} contradicts dims[{symbol!r}]={bound[symbol]}; give one value"
            )
        bound[symbol] = asked
        resolved.append(asked)
    if unbound:
        listed = ", ".join(f"{what} ({symbol!r})" for what, symbol in unbound)
        asks = " and ".join(f"{what}=N" for what, _ in unbound)
        raise UnsupportedGraphError(
            f"input {name!r} has symbolic {listed}; pass {asks} (or bind the symbols "
            "with dims={...})"
        )
    return resolved[0], resolved[1]


def human_bytes(count: int) -> str:
    """``1.5 MiB``-style size."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def _row(label: str, count: int, note: str) -> str:
    tail = f"  ({note})" if note else ""
    return f"  {label:<12} {human_bytes(count):>10}{tail}"

"""Numerical parity between two runnable forms of a model.

Each side is an eager ``nn.Module``, an ``fx.GraphModule`` (both called as ``m(**inputs)`` or
``m(*inputs)`` under ``torch.no_grad``; a module captured with keyword inputs also takes them
positionally, in captured order), an ``onnx_ir.Model``, ``onnx.ModelProto``, bytes or a
path to an ``.onnx`` file (run in ONNX Runtime via :func:`graphpress.export.ort.session`,
inputs fed by name, or zipped with the graph's input names when positional). Outputs are
flattened with ``torch.utils._pytree.tree_leaves`` (Hugging Face ``ModelOutput`` included,
``None`` fields dropped) and compared pairwise in order.

Per output, in float64: ``max_abs = max|c - r|``; ``max_rel = max_abs / max|r|`` (relative to
the reference's scale, so it stays finite where ``r`` crosses zero); ``cosine`` of the
flattened vectors (1 when both are zero). Integer and bool outputs are compared exactly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from graphpress.graph.errors import ExportError

from .ort import session

__all__ = ["Parity", "OutputParity", "check_parity"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputParity:
    """Agreement of one output pair; ``exact`` is set for integer/bool outputs only."""

    index: int
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    cosine: float
    exact: bool | None = None

    def ok(self, atol: float, cosine_min: float) -> bool:
        if self.exact is not None:
            return self.exact
        return self.max_abs <= atol and self.cosine >= cosine_min


@dataclass(frozen=True)
class Parity:
    """Worst case over all outputs (max of errors, min of cosines) plus the per-output list."""

    max_abs: float
    max_rel: float
    cosine: float
    per_output: list[OutputParity]

    def ok(self, atol: float = 1e-4, cosine_min: float = 0.9999) -> bool:
        """True if every output is within ``atol`` and ``cosine_min`` (ints: exactly equal)."""
        return all(o.ok(atol, cosine_min) for o in self.per_output)

    def __str__(self) -> str:
        inexact = sum(o.exact is False for o in self.per_output)
        ints = f", {inexact} integer output(s) differ" if inexact else ""
        return (
            f"parity over {len(self.per_output)} output(s): max_abs={self.max_abs:.3g} "
            f"max_rel={self.max_rel:.3g} cosine={self.cosine:.9f} (1-cos={1 - self.cosine:.2g}){ints}"
        )


def check_parity(
    reference: Any,
    candidate: Any,
    inputs: Mapping[str, Any] | Sequence[Any],
    *,
    providers: str | Sequence[str] = "auto",
) -> Parity:
    """Run both sides on ``inputs`` and compare their outputs; see the module docstring."""
    ref = _run(reference, inputs, providers)
    cand = _run(candidate, inputs, providers)
    if len(ref) != len(cand):
        raise ExportError(
            f"reference has {len(ref)} outputs but candidate has {len(cand)}; compare models "
            "with the same outputs (e.g. call the eager model with use_cache=False)"
        )
    per_output = [_compare(i, r, c) for i, (r, c) in enumerate(zip(ref, cand))]
    if not per_output:
        raise ExportError("the models returned no tensor outputs; nothing to compare")
    return Parity(
        max_abs=max(o.max_abs for o in per_output),
        max_rel=max(o.max_rel for o in per_output),
        cosine=min(o.cosine for o in per_output),
        per_output=per_output,
    )


def _run(model: Any, inputs: Mapping[str, Any] | Sequence[Any], providers: Any) -> list:
    if isinstance(model, torch.nn.Module):
        return _run_torch(model, inputs)
    if isinstance(model, (ir.Model, onnx.ModelProto, bytes, bytearray, str, os.PathLike)):
        return session(model, providers).run(inputs)
    raise ExportError(
        f"cannot run a {type(model).__name__}; pass an nn.Module, fx.GraphModule, "
        "onnx_ir.Model or a path to an .onnx file"
    )


def _run_torch(model: torch.nn.Module, inputs: Mapping[str, Any] | Sequence[Any]) -> list:
    def tensor(value: Any) -> Any:
        return torch.from_numpy(value) if isinstance(value, np.ndarray) else value

    inputs = _match_capture(model, inputs)
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            out = model(**{k: tensor(v) for k, v in inputs.items()})
        else:
            values = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
            out = model(*(tensor(v) for v in values))
    leaves = [x for x in tree_leaves(out) if isinstance(x, (torch.Tensor, np.ndarray, int, float))]
    return [
        x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in leaves
    ]


def _match_capture(model: torch.nn.Module, inputs: Any) -> Any:
    """A ``torch.export`` module only takes inputs the way it was captured; adapt or explain."""
    spec = getattr(model, "_in_spec", None)
    if not isinstance(model, fx.GraphModule) or spec is None or spec.num_children != 2:
        return inputs
    n_args, names = spec.child(0).num_children, list(spec.child(1).context or [])
    if not isinstance(inputs, Mapping) and n_args == 0 and names:
        values = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        if len(values) == len(names):  # positional, like ONNX: zip with the captured names
            return dict(zip(names, values))
    if isinstance(inputs, Mapping) and not names and n_args:
        raise ExportError(
            f"this GraphModule was captured with {n_args} positional argument(s) and takes no "
            "keyword inputs; pass the inputs as a tuple in forward()'s order"
        )
    return inputs


def _compare(index: int, ref: np.ndarray, cand: np.ndarray) -> OutputParity:
    ref, cand = np.asarray(ref), np.asarray(cand)
    if ref.shape != cand.shape:
        raise ExportError(
            f"output {index}: reference has shape {ref.shape} but candidate {cand.shape}; "
            "the models do not compute the same thing (check the export's inputs and outputs)"
        )
    exact_kind = ref.dtype.kind in "biu" and cand.dtype.kind in "biu"
    r, c = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
    same = (r == c) | (np.isnan(r) & np.isnan(c))  # equal infinities and NaNs agree
    diff = np.nan_to_num(np.where(same, 0.0, np.abs(c - r)), nan=np.inf)
    max_abs = float(diff.max()) if diff.size else 0.0
    finite = np.isfinite(r) & np.isfinite(c)
    scale = float(np.abs(r[finite]).max()) if finite.any() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    rf, cf = r[finite], c[finite]
    norms = float(np.linalg.norm(rf) * np.linalg.norm(cf))
    if not same[~finite].all():
        cosine = 0.0  # a NaN or infinity on one side only
    elif norms > 0:
        cosine = float(np.clip(np.dot(rf, cf) / norms, -1.0, 1.0))
    else:
        cosine = 1.0 if max_abs == 0 else 0.0
    exact = bool(np.array_equal(ref, cand)) if exact_kind else None
    return OutputParity(index, tuple(ref.shape), max_abs, max_rel, cosine, exact)

"""The pass contract: ``Pass`` (configuration + template method) and ``PassResult``.

A pass is a frozen dataclass holding configuration only; per-run state lives in locals.
Calling it runs the template: kind check → ``requires`` → ``run_fx``/``run_onnx`` →
``ensures`` (only if the graph changed). Passes mutate the graph they are given in place and
return it in the result; ``optimize()`` is what copies the caller's graph first.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from graphpress.graph.errors import (
    GraphpressError,
    PassSpecError,
    PostconditionError,
    PreconditionError,
    UnsupportedGraphError,
    VerificationError,
)
from graphpress.graph.kind import Graph, kind

__all__ = [
    "Pass",
    "PassResult",
    "GraphpressError",
    "PassSpecError",
    "PostconditionError",
    "PreconditionError",
    "UnsupportedGraphError",
    "VerificationError",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    """What a pass did: the (same) graph, whether it changed, and numbers worth reporting.

    ``layers`` holds one row per rewritten layer: ``"layer"`` (its name, required), scalar
    metrics (``rank``, ``energy_kept``, ``params_before``, ``output_error``, ``sparsity``...)
    and optional series (``spectrum``: singular values, descending; ``error_curve``:
    ``[params_fraction, relative_error]`` pairs). The report tabulates and plots them.
    """

    graph: Graph
    modified: bool
    stats: Mapping[str, float] = field(default_factory=dict)
    layers: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        rows = tuple(dict(row) for row in self.layers)  # private copies, any iterable accepted
        for i, row in enumerate(rows):
            if not isinstance(row.get("layer"), str):
                raise PostconditionError(
                    f"PassResult.layers[{i}] has no 'layer' name (got keys {sorted(row)}); "
                    "every per-layer row needs 'layer': str"
                )
        object.__setattr__(self, "layers", rows)


@dataclass(frozen=True)
class Pass(abc.ABC):
    """A named, configured, in-place transformation of an FX GraphModule or an onnx_ir Model."""

    name: ClassVar[str]
    supports: ClassVar[frozenset[str]] = frozenset({"fx", "onnx"})
    #: True for passes that need calibration batches (``optimize(..., calibration=...)``).
    needs_calibration: ClassVar[bool] = False
    #: True for passes that use calibration when given (``run_*`` get ``calibration=None``
    #: otherwise), e.g. to choose a better algorithm.
    accepts_calibration: ClassVar[bool] = False

    def __call__(self, graph: Graph, *, calibration: Any = None) -> PassResult:
        graph_kind = kind(graph)
        self.check_kind(graph_kind)
        if self.needs_calibration and calibration is None:
            raise PreconditionError(
                f"pass {self.name!r} needs calibration data: call optimize(graph, passes, "
                "calibration=batches)"
            )
        self.requires(graph)
        if graph_kind == "fx":
            result = self.run_fx(graph, **self._calibration_kwargs(calibration))
        else:
            result = self.run_onnx(graph, **self._calibration_kwargs(calibration))
        if result.graph is not graph:
            raise PostconditionError(
                f"pass {self.name!r} returned a different graph object; passes work in place"
            )
        if result.modified:
            self.ensures(graph)
        return result

    def check_kind(self, graph_kind: str) -> None:
        """Raise :class:`UnsupportedGraphError` if this pass cannot run on ``graph_kind``."""
        if graph_kind in self.supports:
            return
        hint = (
            "export the model to ONNX first (graphpress.export.to_onnx)"
            if "onnx" in self.supports
            else "capture the PyTorch model instead (graphpress.graph.capture)"
        )
        raise UnsupportedGraphError(
            f"pass {self.name!r} supports {', '.join(sorted(self.supports))} graphs, not "
            f"{graph_kind}; {hint}"
        )

    def _calibration_kwargs(self, calibration: Any) -> dict[str, Any]:
        wanted = self.needs_calibration or self.accepts_calibration
        return {"calibration": calibration} if wanted else {}

    def requires(self, graph: Graph) -> None:  # noqa: B027 (optional hook)
        """Raise :class:`PreconditionError` with a reason if the pass cannot run on ``graph``."""

    def ensures(self, graph: Graph) -> None:  # noqa: B027 (optional hook)
        """Raise :class:`PostconditionError` if the rewritten graph breaks a promise."""

    def run_fx(self, gm, **kwargs: Any) -> PassResult:
        raise UnsupportedGraphError(f"pass {self.name!r} has no FX implementation")

    def run_onnx(self, model, **kwargs: Any) -> PassResult:
        raise UnsupportedGraphError(f"pass {self.name!r} has no ONNX implementation")

    def spec(self) -> str:
        """The string spec that rebuilds this pass (``name:key=value,...``, non-defaults only)."""
        from .registry import to_spec

        return to_spec(self)

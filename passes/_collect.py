"""Stream intermediate values of a graph over calibration batches, in bounded memory.

Calibration, sensitivity analysis, GPTQ Hessians and AWQ statistics all need the values that
flow through a graph on real inputs. :func:`collect` computes them batch by batch and hands
each array to a consumer, so callers keep running statistics (histograms, ``XᵀX``) instead of
storing activations.

* FX: a ``torch.fx.Interpreter`` runs the graph and reports the outputs of the named nodes.
* ONNX: a structural copy of the model exposes the named values as extra graph outputs and runs
  in ONNX Runtime (CPU). With many targets the outputs are split into chunks of
  ``chunk_size`` values, one session per chunk, so at most one chunk's activations of one
  batch are alive at a time (the batches are re-run per chunk).

A batch is a tuple of tensors/arrays (positional inputs), a dict ``{input_name: array}``, or
for an FX graph captured with both an ``(args_tuple, kwargs_dict)`` pair.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import fx
from tqdm.auto import tqdm

from graphpress.export.ort import session
from graphpress.graph.errors import PreconditionError
from graphpress.graph.kind import Graph, clone, kind

__all__ = ["collect", "as_batches", "call_arguments", "Consumer"]

logger = logging.getLogger(__name__)

#: ``consume(name, array)`` is called once per target value and batch.
Consumer = Callable[[str, np.ndarray], None]


def call_arguments(batch: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call a graph with one batch: a dict is keyword inputs, a pair
    ``(tuple_or_list, dict)`` is positional and keyword inputs (for graphs captured with both),
    any other tuple or list is positional inputs, a lone tensor one positional input."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if (isinstance(batch, (tuple, list)) and len(batch) == 2
            and isinstance(batch[0], (tuple, list)) and isinstance(batch[1], Mapping)):
        return tuple(batch[0]), dict(batch[1])
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def as_batches(batches: Any) -> list[Any]:
    """Materialise ``batches`` (an iterable of tuples/dicts, or one dict) into a list."""
    if isinstance(batches, Mapping):
        return [batches]
    try:
        items = list(batches)
    except TypeError:
        raise PreconditionError(
            f"calibration batches must be an iterable of tuples or dicts, got "
            f"{type(batches).__name__}"
        ) from None
    if not items:
        raise PreconditionError("calibration got no batches; pass at least one input batch")
    for item in items:
        if not isinstance(item, (tuple, list, Mapping)):
            raise PreconditionError(
                "each calibration batch must be a tuple of inputs or a {input_name: array} "
                f"dict, got {type(item).__name__}"
            )
    return items


def collect(
    graph: Graph,
    batches: Iterable[Any],
    names: Sequence[str],
    consume: Consumer,
    *,
    chunk_size: int = 64,
    progress: bool = False,
) -> None:
    """Call ``consume(name, array)`` for every value in ``names`` on every batch."""
    items = as_batches(batches)
    if kind(graph) == "fx":
        _collect_fx(graph, items, set(names), consume, progress)
    else:
        _collect_onnx(graph, items, list(dict.fromkeys(names)), consume, chunk_size, progress)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, targets: set[str], consume: Consumer) -> None:
        super().__init__(gm)
        self.targets, self.consume = targets, consume

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node.name in self.targets and isinstance(value, torch.Tensor):
            self.consume(node.name, value.detach().float().cpu().numpy())
        return value


def _collect_fx(gm, items, targets, consume, progress) -> None:
    known = {n.name for n in gm.graph.nodes}
    missing = sorted(targets - known)
    if missing:
        raise PreconditionError(f"the FX graph has no nodes named {missing[:10]}")
    recorder = _Recorder(gm, targets, consume)
    in_spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "in_spec", None)
    with torch.inference_mode():
        for batch in tqdm(items, desc="calibrating", disable=not progress, leave=False):
            args, kwargs = call_arguments(batch)
            args = tuple(torch.as_tensor(a) if isinstance(a, np.ndarray) else a for a in args)
            kwargs = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
                      for k, v in kwargs.items()}
            if in_spec is not None:
                flat = fx._pytree.tree_flatten_spec((args, kwargs), in_spec)
            else:
                flat = [*args, *kwargs.values()]
            recorder.run(*flat)


def _collect_onnx(model: ir.Model, items, names, consume, chunk_size, progress) -> None:
    inputs = [v.name for v in model.graph.inputs]
    feeds = [_feed(batch, inputs) for batch in items]
    from_inputs = [n for n in names if n in inputs]
    for feed in feeds:
        for name in from_inputs:
            consume(name, np.asarray(feed[name]))
    computed = [n for n in names if n not in inputs]
    chunks = [computed[i : i + chunk_size] for i in range(0, len(computed), chunk_size)]
    bar = tqdm(total=len(chunks) * len(feeds), desc="calibrating", disable=not progress,
               leave=False)
    for chunk in chunks:
        runner = session(_expose(model, chunk), providers="cpu")
        for feed in feeds:
            outputs = runner.run(feed)
            for name, array in zip(runner.output_names, outputs):
                if name in chunk:
                    consume(name, array)
            bar.update(1)
    bar.close()


def _feed(batch: Any, inputs: list[str]) -> dict[str, Any]:
    """ONNX feeds of one batch: positional values fill the first inputs, keywords by name."""
    args, kwargs = call_arguments(batch)
    if len(args) > len(inputs) or (not kwargs and len(args) != len(inputs)):
        raise PreconditionError(
            f"calibration batch has {len(args)} values but the model takes {len(inputs)} "
            f"inputs ({', '.join(inputs)}); pass dicts by name"
        )
    feed = {**dict(zip(inputs, args)), **kwargs}
    missing = [n for n in inputs if n not in feed]
    if missing:
        raise PreconditionError(f"calibration batch lacks model inputs {missing}")
    return {n: feed[n] for n in inputs}


def _expose(model: ir.Model, names: list[str]) -> ir.Model:
    """A structural copy of ``model`` whose outputs are exactly ``names`` (then the originals)."""
    copy = clone(model)
    values: dict[str, ir.Value] = {}
    for node in copy.graph:
        for value in node.outputs:
            values[value.name] = value
    missing = [n for n in names if n not in values]
    if missing:
        raise PreconditionError(
            f"the ONNX graph has no values named {missing[:10]}; a calibration table made for "
            "another graph, or a pass renamed them"
        )
    originals = [v for v in copy.graph.outputs if v.name not in names]
    copy.graph.outputs.clear()
    copy.graph.outputs.extend([values[n] for n in names] + originals)
    return copy

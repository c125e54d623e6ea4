"""The tensor-parallel plan for PyTorch's ``parallelize_module``.

:func:`tensor_parallel_plan` maps module paths (FX ``nn_module_stack``, ONNX ``namespace``, or
the weight's dotted name) to style names: ``colwise``/``rowwise`` for the Megatron pairs,
``vocab_rowwise`` (embedding) / ``vocab_colwise`` (LM head) and, after
``shard-sequence-parallel``, ``sequence`` for the norms of the sequence-parallel regions.
:func:`to_torch_plan` turns the names into ``ParallelStyle`` objects:

=================  ==============================================  ==========================
name               tensor parallel                                 with sequence parallel
=================  ==============================================  ==========================
``colwise``        ``ColwiseParallel()``                           ``input_layouts=Shard(d)``
``rowwise``        ``RowwiseParallel()``                           ``output_layouts=Shard(d)``
``vocab_rowwise``  ``RowwiseParallel(input_layouts=Replicate())``  ``output_layouts=Shard(d)``
``vocab_colwise``  ``ColwiseParallel(output_layouts=Replicate())`` ``input_layouts=Shard(d)``
``sequence``       —                                               ``SequenceParallel(d)``
=================  ==============================================  ==========================

(``d`` is the sequence dimension, 1 for ``[batch, seq, hidden]``.) With sequence parallelism
the row-parallel outputs stay DTensors (``use_local_output=False``), so the residual stream
between the modules is one sequence-sharded DTensor whose ``shape`` is the global one (models
that read the sequence length off an activation, like Hugging Face's rotary positions, keep
working). A module that would get two different styles (two roles inside one module) is left
out of the plan, with a debug log.
"""

from __future__ import annotations

import logging

from graphpress.export.shards import PLAN_KEY, SP_PLAN_KEY
from graphpress.graph.errors import PassSpecError
from graphpress.graph.kind import clone

from ._tp_annotate import read_plan

__all__ = ["tensor_parallel_plan", "to_torch_plan", "STYLES"]

logger = logging.getLogger(__name__)

STYLES = ("colwise", "rowwise", "vocab_rowwise", "vocab_colwise", "sequence")
_ROLE_STYLE = {"column": "colwise", "row": "rowwise", "vocab_row": "vocab_rowwise",
               "vocab_column": "vocab_colwise"}


def tensor_parallel_plan(graph, *, world_size: int | None = None) -> dict[str, str]:
    """``{module path: style name}`` from the graph's ``shard-tensor-parallel`` plan (planned
    on a copy for ``world_size``, default 2, when the graph carries none)."""
    plan = read_plan(graph, PLAN_KEY)
    if plan is None or (world_size is not None and plan["world_size"] != world_size):
        from .tensor_parallel import ShardTensorParallel

        graph = clone(graph)
        ShardTensorParallel(world_size=world_size or 2)(graph)
        plan = read_plan(graph, PLAN_KEY)
        if plan is None:
            return {}
    styles: dict[str, str] = {}
    clashes: set[str] = set()
    for node, role in plan["roles"].items():
        style, module = _ROLE_STYLE.get(role), plan["modules"].get(node)
        if style is None or not module:
            continue
        if styles.setdefault(module, style) != style:
            clashes.add(module)
    sequence = read_plan(graph, SP_PLAN_KEY)
    if sequence is not None and sequence.get("torch"):
        for module in sequence["norm_modules"]:
            if styles.setdefault(module, "sequence") != "sequence":
                clashes.add(module)
    for module in clashes:
        logger.debug("tensor_parallel_plan: %s has nodes of different roles; left out", module)
        styles.pop(module)
    return dict(sorted(styles.items()))


def to_torch_plan(plan: dict[str, str], *, sequence_dim: int = 1) -> dict[str, object]:
    """``ParallelStyle`` objects for ``parallelize_module(model, mesh, plan)``; the layouts
    are those of sequence parallelism when the plan has any ``sequence`` entry."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
    )

    unknown = sorted({s for s in plan.values() if s not in STYLES})
    if unknown:
        raise PassSpecError(f"to_torch_plan: unknown style(s) {unknown}; the styles are "
                            f"{', '.join(STYLES)}")
    if "sequence" in plan.values():
        seq = Shard(sequence_dim)
        make = {"colwise": lambda: ColwiseParallel(input_layouts=seq),
                "rowwise": lambda: RowwiseParallel(output_layouts=seq, use_local_output=False),
                "vocab_rowwise": lambda: RowwiseParallel(input_layouts=Replicate(),
                                                         output_layouts=seq,
                                                         use_local_output=False),
                "vocab_colwise": lambda: ColwiseParallel(input_layouts=seq,
                                                         output_layouts=Replicate()),
                "sequence": lambda: SequenceParallel(sequence_dim=sequence_dim)}
    else:
        make = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel,
                "vocab_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
                "vocab_colwise": lambda: ColwiseParallel(output_layouts=Replicate())}
    return {module: make[style]() for module, style in plan.items()}

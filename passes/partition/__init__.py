"""Partitioning passes: ``partition-pipeline`` (contiguous pipeline stages, annotated) and the
tensor/sequence-parallel sharding passes.

``_stage_plan.py`` is the IR-free, exact stage optimiser; ``_pipeline_costs.py`` reads node
costs and boundary sizes off ``graphpress.graph.costs``; ``graphpress.export.split_stages``
materialises the annotated stages. Importing the folder registers the passes.
"""

from __future__ import annotations

from .pipeline import PartitionPipeline
from .sequence_parallel import ShardSequenceParallel
from .shard import shard
from .tensor_parallel import ShardTensorParallel, tensor_parallel_plan, to_torch_plan

__all__ = [
    "PartitionPipeline",
    "ShardSequenceParallel",
    "ShardTensorParallel",
    "shard",
    "tensor_parallel_plan",
    "to_torch_plan",
]

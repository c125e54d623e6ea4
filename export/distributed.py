"""Run partitioned graphs on torch.distributed and ONNX Runtime.

Launching: :func:`launch` starts local ranks (tests, notebooks) and :func:`init_from_env`
joins a ``torchrun`` job. Everything else runs inside an initialised process group, on every
rank of the group it is given (default: the whole world), and returns on each rank:

========================  ===========================================  =====================
function                  runs                                         returns
========================  ===========================================  =====================
:func:`run_pipeline`      FX stages, ``torch.distributed.pipelining``  outputs on the last
                          (GPipe / 1F1B, microbatches)                 stage's rank, else None
:func:`run_pipeline_ort`  ONNX stages, one ORT session per rank,       same (numpy)
                          tensors sent with ``dist.isend``/``recv``
:func:`run_shard`         a tensor-parallel Shard: FX module with      the full outputs on
                          collectives, or ONNX segments + collectives  every rank
:func:`apply_torch_plan`  ``parallelize_module`` with a module plan    the sharded module
:func:`run_pp_tp_ort`     PP×TP on ORT: a stage = a run of segments    outputs on the last
                          of this rank's shard; :func:`pp_tp_groups`   stage's ranks
                          builds the ("pp", "tp") mesh and its groups
========================  ===========================================  =====================

:func:`validate_pipeline` needs no process group: it checks, in one process, what
``run_pipeline`` would refuse on its ranks (call it before :func:`launch` or ``torchrun``).

FX PP×TP composes the pieces: ``shard(graph, groups.tp_rank,
group_name=groups.tp_group_name)``, ``split_stages`` of the shard, then ``run_pipeline(...,
group=groups.pp_group)`` (:func:`run_pp_tp`). ONNX Runtime sessions ask for the CUDA provider
on ``device_id`` = ``LOCAL_RANK`` first and report what they got (``Session.providers``); they
run through IO binding on either device. There is no home-made transport: all communication is
torch.distributed (gloo on CPU; NCCL for CUDA tensors when the group uses it).
"""

from __future__ import annotations

import logging

from ._dist_launch import DistributedError, init_from_env, launch
from ._dist_mesh import MeshGroups, pp_tp_groups, run_pp_tp, run_pp_tp_ort, segment_stages
from ._dist_ort import rank_session, run_pipeline_ort
from ._dist_pipeline import SCHEDULES, run_pipeline, validate_pipeline
from ._dist_tp import STYLES, apply_torch_plan, run_shard, shard_sessions

__all__ = [
    "DistributedError",
    "MeshGroups",
    "SCHEDULES",
    "STYLES",
    "apply_torch_plan",
    "init_from_env",
    "launch",
    "pp_tp_groups",
    "rank_session",
    "run_pipeline",
    "run_pipeline_ort",
    "run_pp_tp",
    "run_pp_tp_ort",
    "run_shard",
    "segment_stages",
    "shard_sessions",
    "validate_pipeline",
]

logger = logging.getLogger(__name__)

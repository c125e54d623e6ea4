"""export: FX → ONNX, saving, ONNX Runtime sessions and parity checks.

``to_onnx`` turns a captured ``fx.GraphModule`` (or any ``nn.Module``) into an
``onnx_ir.Model``; ``save`` writes it atomically (external data for large weights);
``session`` builds an ONNX Runtime session (CUDA first, CPU fallback, reporting what it got);
``check_parity`` compares any two of eager / FX / ONNX; ``ort_legal`` lists ops ORT's CPU
provider cannot run. This layer imports ``graph/`` only.
"""

from __future__ import annotations

from .legality import ort_legal
from .onnx import PASS_KEY, save, to_onnx
from .ort import Session, resolve_providers, session
from .parity import OutputParity, Parity, check_parity
from .shards import Collective, Shard
from .stages import PIPELINE_KEY, STAGE_KEY, Stage, split_stages

__all__ = [
    "PASS_KEY",
    "PIPELINE_KEY",
    "STAGE_KEY",
    "Stage",
    "split_stages",
    "Collective",
    "OutputParity",
    "Parity",
    "Session",
    "Shard",
    "check_parity",
    "ort_legal",
    "resolve_providers",
    "save",
    "session",
    "to_onnx",
]

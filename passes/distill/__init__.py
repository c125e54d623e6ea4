"""distill: heal a compressed FX graph (student) by training it against the original (teacher).

``distill(teacher, student, batches, ...)`` returns a :class:`DistillResult` with a new,
trained student GraphModule and the history of losses and evaluations; see :mod:`.train`
for the loop, :mod:`.losses` for the formulas, :mod:`.features` for the automatic
teacher ↔ student pairing from pass provenance and :mod:`._trainable` for which constants
train.
"""

from __future__ import annotations

from ._trainable import QUANTIZATION_PASSES, SPARSE_PASSES, TrainableStudent, trainable_copy
from .features import FeaturePair, auto_pairs
from .train import DistillResult, distill

__all__ = [
    "distill",
    "DistillResult",
    "FeaturePair",
    "auto_pairs",
    "trainable_copy",
    "TrainableStudent",
    "QUANTIZATION_PASSES",
    "SPARSE_PASSES",
]

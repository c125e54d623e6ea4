"""Fold passes: ``fold-constants`` (constant subexpressions) and ``fold-batchnorm``.

The family is a folder (``constants.py``, ``batchnorm.py``) so each file stays short; importing
it registers both passes.
"""

from __future__ import annotations

from .batchnorm import FoldBatchNorm
from .constants import FoldConstants

__all__ = ["FoldBatchNorm", "FoldConstants"]

"""Low-rank factoring of linear layers (``factor-low-rank``).

IR-free math: decompositions in ``_svd`` (exact/randomized/activation-aware SVD), rank
selection in ``_rank``, the per-model plan in ``_plan``; native rewrites in ``_apply_onnx`` and
``_apply_fx``. Importing the folder registers the pass.
"""

from __future__ import annotations

from .factor import FactorLowRank

__all__ = ["FactorLowRank"]

"""Sparsity passes: ``sparsify`` (unstructured and N:M, optionally activation-aware).

IR-free masks and importance scores are in ``_masks.py``, compressed-storage byte accounting
in ``_storage.py``; importing the folder registers the pass.
"""

from __future__ import annotations

from .sparsify import Sparsify

__all__ = ["Sparsify"]

"""Structured pruning passes: ``prune-channels`` (remove the least important channels, neurons
and heads of every coupled group) and ``fold-pruned`` (remove structures that are already zero,
exactly).

Groups come from ``graphpress.graph.channels``; IR-free scores and selection are in
``_importance.py`` (Taylor statistics on FX in ``_taylor.py``); ``_shrink_fx.py`` and
``_shrink_onnx.py`` slice every use of a group. ``fold-pruned`` finds zero units with
``_structure.py`` and folds constant channels into consumer biases (``_fold_bias.py``) or, for
padded convolutions, into one ones-channel (``_fold_map.py``). Importing the folder registers
both passes.
"""

from __future__ import annotations

from .fold_pruned import FoldPruned
from .prune_channels import PruneChannels

__all__ = ["FoldPruned", "PruneChannels"]

"""Save and restore a distillation run atomically.

A checkpoint is one ``torch.save`` file holding the trainable student constants (by attribute
name), the feature projections, the optimiser state, the position in the data (step, epoch,
batches consumed in that epoch), the history so far, the RNG state and the run's fingerprint
(its options, the trainable names and shapes). It is written to a temporary file in the same
folder and renamed over the old one (``os.replace`` is atomic on POSIX and Windows), so an
interrupted save leaves the previous checkpoint intact. Restoring refuses a checkpoint whose
fingerprint differs: continuing another run's state would silently train something else.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphpress.graph.errors import PreconditionError

__all__ = ["RunState", "save_checkpoint", "load_checkpoint"]

logger = logging.getLogger(__name__)

_VERSION = 1


@dataclass
class RunState:
    """Where a run is: optimiser steps taken, the epoch and batches consumed in it."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(path: str | os.PathLike, *, state: RunState, student: dict[str, Any],
                    projections: dict[str, Any], optimizer: dict[str, Any],
                    fingerprint: dict[str, Any]) -> None:
    """Write the checkpoint atomically (temporary file + rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {"version": _VERSION, "fingerprint": fingerprint, "step": state.step,
               "epoch": state.epoch, "consumed": state.consumed, "history": state.history,
               "student": {k: v.detach().clone() for k, v in student.items()},
               "projections": projections, "optimizer": optimizer,
               "rng": torch.get_rng_state()}
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    logger.debug("checkpoint at step %d written to %s", state.step, target)


def load_checkpoint(path: str | os.PathLike,
                    fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved payload, ``None`` if there is no file; refuses another run's checkpoint."""
    target = Path(path)
    if not target.exists():
        return None
    try:
        payload = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise PreconditionError(f"distill: checkpoint {target} cannot be read ({exc}); delete "
                                "it to start over or pass another checkpoint path") from exc
    if not isinstance(payload, dict) or payload.get("version") != _VERSION:
        raise PreconditionError(f"distill: {target} is not a distill checkpoint (version "
                                f"{_VERSION}); delete it or pass another checkpoint path")
    saved = payload.get("fingerprint", {})
    if saved != fingerprint:
        changed = sorted(k for k in set(saved) | set(fingerprint)
                         if saved.get(k) != fingerprint.get(k))
        raise PreconditionError(f"distill: checkpoint {target} belongs to another run (differs "
                                f"in {', '.join(changed)}); use the same options and student, "
                                "or another checkpoint path")
    return payload

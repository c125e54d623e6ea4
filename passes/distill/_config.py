"""The options of ``distill``, checked once, and the fingerprint a checkpoint is bound to."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from graphpress.graph.errors import PassSpecError

__all__ = ["DistillConfig", "LOSSES", "OPTIMIZERS", "SCHEDULES"]

logger = logging.getLogger(__name__)

LOSSES = ("kd", "cosine", "mse")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class DistillConfig:
    """Every option of :func:`distill` but the graphs and the data."""

    loss: str = "kd"
    temperature: float = 4.0
    alpha: float = 0.5
    features: Any = "auto"
    feature_weight: float = 0.1
    relation: bool = False
    relation_weight: float = 1.0
    labels: str | int | Callable[[Any], tuple[Any, Any]] | None = None
    output: Callable[[Any], Any] | None = None
    epochs: int = 1
    steps: int | None = None
    lr: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int | None = None
    seed: int = 0
    checkpoint_every: int = 50
    freeze: Sequence[str] = ()
    progress: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise PassSpecError(f"distill: unknown loss={self.loss!r}; use one of {LOSSES} "
                                "('kd' for logits, 'cosine' or 'mse' for embeddings)")
        if self.optimizer not in OPTIMIZERS:
            raise PassSpecError(f"distill: unknown optimizer={self.optimizer!r}; use one of "
                                f"{OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise PassSpecError(f"distill: unknown schedule={self.schedule!r}; use one of "
                                f"{SCHEDULES} (the learning rate over the run)")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise PassSpecError(f"distill: warmup={self.warmup!r} must be an integer ≥ 0 (steps "
                                "of linear learning-rate warm-up)")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise PassSpecError(f"distill: alpha={self.alpha!r} must be in [0, 1] (the weight "
                                "of the hard-label loss; 0 distils only)")
        _positive("temperature", self.temperature)
        _positive("lr", self.lr)
        for name in ("feature_weight", "relation_weight", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise PassSpecError(f"distill: {name}={value!r} must be a number ≥ 0")
        if self.max_grad_norm is not None:
            _positive("max_grad_norm", self.max_grad_norm)
        _count("epochs", self.epochs)
        _count("checkpoint_every", self.checkpoint_every)
        for name in ("steps", "eval_every"):
            if getattr(self, name) is not None:
                _count(name, getattr(self, name))
        self._check_features()
        if not (self.labels is None or isinstance(self.labels, (str, int))
                or callable(self.labels)) or isinstance(self.labels, bool):
            raise PassSpecError(f"distill: labels={self.labels!r}: use None, a dict key, a "
                                "tuple index or a callable batch -> (inputs, labels)")
        if self.output is not None and not callable(self.output):
            raise PassSpecError("distill: output= must be a callable that picks the tensor to "
                                "distil from the model's outputs, e.g. lambda o: o.logits")
        if isinstance(self.freeze, str):
            object.__setattr__(self, "freeze", (self.freeze,))

    def _check_features(self) -> None:
        if self.features is None or self.features == "auto":
            return
        if isinstance(self.features, str) or not isinstance(self.features, Sequence):
            raise PassSpecError(f"distill: features={self.features!r}: use 'auto', None or a "
                                "list of (teacher_node, student_node) pairs")
        for pair in self.features:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise PassSpecError(f"distill: feature pair {pair!r} is not a "
                                    "(teacher_node, student_node) pair of names or fx.Nodes")

    def lr_at(self, step: int, total: int | None) -> float:
        """The learning rate of optimiser step ``step`` (0-based) of a ``total``-step run:
        ``lr·(step+1)/warmup`` during the warm-up, then with ``t = (step − warmup) / (total −
        warmup)`` constant ``lr``, ``cosine`` ``lr·½(1 + cos πt)`` or ``linear`` ``lr·(1 − t)``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant" or total is None:
            return self.lr
        t = min((step - self.warmup) / max(total - self.warmup, 1), 1.0)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * t))
        return self.lr * (1.0 - t)

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to continue this run."""
        return {"loss": self.loss, "temperature": float(self.temperature),
                "alpha": float(self.alpha), "feature_weight": float(self.feature_weight),
                "relation": bool(self.relation), "relation_weight": float(self.relation_weight),
                "lr": float(self.lr), "optimizer": self.optimizer,
                "schedule": self.schedule, "warmup": int(self.warmup),
                "weight_decay": float(self.weight_decay), "seed": int(self.seed),
                "features": "auto" if self.features == "auto" else
                None if self.features is None else
                [[_node_name(a), _node_name(b)] for a, b in self.features]}


def _node_name(node: Any) -> str:
    return node if isinstance(node, str) else getattr(node, "name", str(node))


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise PassSpecError(f"distill: {name}={value!r} must be a number > 0")


def _count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PassSpecError(f"distill: {name}={value!r} must be an integer ≥ 1")

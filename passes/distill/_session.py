"""What one distillation run trains: the trainable student copy, the tapped teacher and
student, the feature projections and the optimiser, set up from the first batch."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from graphpress.graph.errors import PreconditionError

from ._config import DistillConfig
from ._data import select_output, split_batch, to_device
from ._objective import check_outputs
from ._taps import tap
from ._trainable import trainable_copy
from .features import FeaturePair, Projections, auto_pairs, explicit_pairs

__all__ = ["Session"]

logger = logging.getLogger(__name__)


class Session:
    """Set up from ``first_batch``: output shapes checked, projections fitted on it."""

    def __init__(self, teacher: fx.GraphModule, student: fx.GraphModule, first_batch: Any,
                 config: DistillConfig) -> None:
        self.config = config
        self.trainable = trainable_copy(student, freeze=config.freeze)
        if not self.trainable.params:
            raise PreconditionError(
                "distill: the student has no trainable constant (every tensor it reads is "
                "integer, quantized, a statistic or frozen); check freeze= or train the "
                "quantized weights with quantization-aware training")
        self.device = next(iter(self.trainable.params.values())).device
        self.teacher_module = teacher
        candidates = self._candidates(teacher, self.trainable.module)
        self.teacher = tap(teacher, [pair.teacher for pair in candidates])
        self.student = tap(self.trainable.module, [pair.student for pair in candidates])
        args, kwargs, _ = to_device(split_batch(first_batch, config.labels), self.device)
        with torch.no_grad():
            teacher_out, teacher_features = self.teacher(*args, **kwargs)
            student_out, student_features = self.student(*args, **kwargs)
        check_outputs(select_output(student_out, config.output, kwargs or args),
                      select_output(teacher_out, config.output, kwargs or args), config)
        self.projections = Projections(candidates, student_features, teacher_features,
                                       strict=config.features != "auto").to(self.device)
        self.pairs: list[FeaturePair] = list(self.projections.pairs)
        self.parameters = (self.trainable.unique_parameters()
                           + list(self.projections.parameters()))
        self.optimizer = _optimizer(config, self.parameters)
        self._checked = False  # gradient reach is checked on the first update
        logger.info("distill: %d constants train (%d frozen), %d feature pairs (%d projected)",
                    len(self.trainable.params), len(self.trainable.frozen), len(self.pairs),
                    sum(1 for p in self.projections.parameters()))

    def _candidates(self, teacher: fx.GraphModule, student: fx.GraphModule) -> list[FeaturePair]:
        features = self.config.features
        if features is None or self.config.feature_weight == 0:
            return []
        if features == "auto":
            return auto_pairs(teacher, student)
        return explicit_pairs(teacher, student, features)

    def update(self, loss: torch.Tensor, lr: float) -> None:
        """One optimiser step on ``loss`` at learning rate ``lr``; sparsified weights keep
        their zeros."""
        if not loss.requires_grad:
            raise PreconditionError(
                "distill: the loss does not depend on any trainable constant (no gradient "
                "reaches them: e.g. every path runs through quantize ops); train quantized "
                "graphs with quantization-aware training")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not self._checked:
            self._checked = True
            dead = [n for n, p in self.trainable.params.items() if p.grad is None]
            if dead:
                logger.warning("distill: %d of %d trainable constants get no gradient: they "
                               "do not reach the distilled output (e.g. a pooler when token "
                               "states are distilled) or sit behind quantize ops, which need "
                               "quantization-aware training (qat=True): %s", len(dead),
                               len(self.trainable.params), ", ".join(dead[:8]))
        self.trainable.mask_gradients()
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.trainable.apply_masks()

    def fingerprint(self) -> dict[str, Any]:
        """The options plus the trainable constants and pairs this run trains."""
        return {**self.config.fingerprint(),
                "trainable": [[name, list(p.shape)] for name, p in self.trainable.params.items()],
                "pairs": [[pair.teacher, pair.student] for pair in self.pairs]}

    @torch.no_grad()
    def restore(self, saved: dict[str, Any]) -> None:
        """Load the student constants, projections and optimiser state of a checkpoint."""
        for name, value in saved["student"].items():
            self.trainable.params[name].copy_(value)
        self.projections.load_state_dict(saved["projections"])
        self.optimizer.load_state_dict(saved["optimizer"])


def _optimizer(config: DistillConfig, parameters: list[torch.nn.Parameter]) -> Any:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.lr, momentum=0.9,
                           weight_decay=config.weight_decay)

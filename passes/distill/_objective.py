"""The training objective of one batch and the evaluation metrics, from the losses.

``L = L_resp + w_f · L_feat + w_r · L_rel`` where ``L_resp`` is, with labels,
``α · CE(z_s, y) + (1 − α) · R`` and ``R`` alone without; ``R`` is ``T²·KL`` (``kd``),
``1 − cos`` (``cosine``) or the MSE (``mse``) of the distilled outputs (formulas in
:mod:`.losses`). Evaluation reports the response loss and the cosine between student and
teacher outputs (along the last axis, per vector: mean and min), plus for ``kd`` the top-1
agreement with the teacher and, with labels, the accuracy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from graphpress.graph.errors import PreconditionError

from ._config import DistillConfig
from .features import Projections
from .losses import (
    cosine_loss,
    feature_loss,
    hard_loss,
    mse_loss,
    per_vector_cosine,
    relation_loss,
    soft_kd,
)

__all__ = ["objective", "check_outputs", "metrics"]

logger = logging.getLogger(__name__)


def check_outputs(student: torch.Tensor, teacher: torch.Tensor, config: DistillConfig) -> None:
    """Refuse outputs that the chosen loss cannot compare."""
    if student.shape != teacher.shape:
        raise PreconditionError(
            f"distill: the student's output {tuple(student.shape)} and the teacher's "
            f"{tuple(teacher.shape)} differ; pass output=lambda out: ... selecting comparable "
            "tensors (logits, last_hidden_state, a pooled embedding)")
    if config.relation and student.dim() < 2:
        raise PreconditionError("distill: relation=True needs per-sample outputs [B, ...]")


def response(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
             config: DistillConfig) -> dict[str, torch.Tensor]:
    """``L_resp`` as ``{"response"}`` plus its parts ``"soft"`` and, with labels, ``"hard"``."""
    if config.loss == "kd":
        soft = soft_kd(student, teacher, config.temperature)
    elif config.loss == "cosine":
        soft = cosine_loss(student, teacher)
    else:
        soft = mse_loss(student, teacher)
    if labels is None:
        return {"response": soft}
    hard = hard_loss(student, labels)
    return {"response": config.alpha * hard + (1.0 - config.alpha) * soft, "soft": soft,
            "hard": hard}


def objective(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
              student_features: Sequence[torch.Tensor],
              teacher_features: Sequence[torch.Tensor], projections: Projections | None,
              config: DistillConfig) -> dict[str, torch.Tensor]:
    """Every term of the loss of one batch; ``"loss"`` is their weighted sum."""
    terms = response(student, teacher, labels, config)
    total = terms["response"]
    if projections is not None and projections.pairs and config.feature_weight > 0:
        mapped = [projections(i, student_features[j]) for i, j in enumerate(projections.indices)]
        targets = [teacher_features[j] for j in projections.indices]
        terms["feature"] = feature_loss(mapped, targets)
        total = total + config.feature_weight * terms["feature"]
    if config.relation:
        terms["relation"] = relation_loss(student, teacher)
        total = total + config.relation_weight * terms["relation"]
    terms["loss"] = total
    return terms


@torch.no_grad()
def metrics(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
            config: DistillConfig) -> dict[str, float]:
    """Sums over one evaluation batch: ``{name: (sum, count)}`` folded by the caller."""
    cosine = per_vector_cosine(student, teacher)
    loss = response(student, teacher, labels, config)["response"]
    row = {"loss": float(loss) * cosine.numel(),
           "cosine_sum": float(cosine.sum()), "cosine_min": float(cosine.min()),
           "vectors": float(cosine.numel())}
    if config.loss == "kd":
        width = student.shape[-1]
        row["agree"] = float((student.reshape(-1, width).argmax(-1)
                              == teacher.reshape(-1, width).argmax(-1)).sum())
    if labels is not None:
        predicted = student.reshape(-1, student.shape[-1]).argmax(-1)
        wanted = labels.reshape(-1)
        valid = wanted != -100
        row["correct"] = float((predicted[valid] == wanted[valid]).sum())
        row["labelled"] = float(valid.sum())
    return row
